"""Local anomaly synthesis (LAS) for GLASS-style training.

GLASS (Chen et al., ECCV 2024) teaches its discriminator what "not normal" looks like with synthetic
defects: regions shaped by thresholded Perlin noise (as in DRAEM) are replaced by a semi-transparent
blend of a texture image and the original image,

    aug = image * (1 - m) + m * ((1 - beta) * texture + beta * image),   beta ~ U(0.2, 0.8).

The paper takes its textures from the DTD texture dataset. DTD cannot be downloaded here, so
:func:`make_texture` generates textures procedurally instead (coloured fractal noise, stripes,
checkers and grids, granite speckle, marble) and, when other training images are given, also uses
random crops of those, rescaled, rotated and colour-shifted so that they no longer look like a normal
surface. The discriminator only needs the patches to be visibly foreign to the object, which these are.

:func:`foreground_mask` optionally keeps the synthetic defects on the object (a heuristic for objects
on plain backgrounds). Every function takes a ``numpy.random.Generator`` and uses no global random state,
so a seed reproduces the same anomalies.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage

# perlin_mask gives up on noise after this many draws and falls back to an ellipse.
_MAX_TRIES = 10
# Smallest Perlin lattice cell in pixels (see _noise_region).
_MIN_CELL = 16


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int | np.integer) else (int(size[0]), int(size[1]))


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve: smooth (C2) interpolation between lattice corners."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(size: tuple[int, int], scale: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Float32 2D Perlin (gradient) noise of shape ``size``, roughly in [-1, 1].

    ``scale`` is the number of lattice cells along (rows, columns). Sizes that are not a multiple of the
    scale are handled by drawing the noise on a slightly larger grid of whole cells and cropping it.
    """
    h, w = size
    sy, sx = max(1, int(scale[0])), max(1, int(scale[1]))
    cy, cx = -(-h // sy), -(-w // sx)  # pixels per cell, rounded up
    angles = rng.uniform(0.0, 2 * np.pi, (sy + 1, sx + 1))
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)

    # Position inside the cell, per row and per column (the grid is separable).
    ty = (np.arange(h, dtype=np.float32) % cy / cy)[:, None]
    tx = (np.arange(w, dtype=np.float32) % cx / cx)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        """Dot product of each pixel's corner gradient with the offset from that corner."""
        # Repeating the lattice per pixel is much faster than fancy indexing.
        cgy = gy[dy : dy + sy, dx : dx + sx].repeat(cy, 0).repeat(cx, 1)[:h, :w]
        cgx = gx[dy : dy + sy, dx : dx + sx].repeat(cy, 0).repeat(cx, 1)[:h, :w]
        return cgy * (ty - dy) + cgx * (tx - dx)

    uy, ux = _fade(ty), _fade(tx)
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = n00 + ux * (n01 - n00)
    bottom = n10 + ux * (n11 - n10)
    # sqrt(2) stretches the theoretical range [-1/sqrt(2), 1/sqrt(2)] to about [-1, 1], as in DRAEM.
    return (np.sqrt(2) * (top + uy * (bottom - top))).astype(np.float32)


def _noise_region(h: int, w: int, rng: np.random.Generator, threshold: float, lo: int, hi: int) -> np.ndarray:
    """Perlin noise at a random power-of-two scale per axis, randomly rotated, thresholded."""
    # Exponents in [lo, hi) as in DRAEM/GLASS, capped so that a lattice cell spans at least _MIN_CELL
    # pixels: finer noise only scatters specks over the whole image.
    cap = int(np.log2(max(1, min(h, w) // _MIN_CELL)))
    hi = max(1, min(hi, cap + 1))
    lo = max(0, min(lo, hi - 1))
    scale = (2 ** int(rng.integers(lo, hi)), 2 ** int(rng.integers(lo, hi)))
    noise = perlin_noise((h, w), scale, rng)
    # Rotation breaks the lattice's alignment with the image axes (elongated blobs at any angle).
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-90, 90), 1.0)
    noise = cv2.warpAffine(noise, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return noise > threshold


def _ellipse(h: int, w: int, rng: np.random.Generator, allowed: np.ndarray) -> np.ndarray:
    """A random ellipse centred on an allowed pixel, clipped to the allowed region (never empty)."""
    ys, xs = np.nonzero(allowed)
    k = int(rng.integers(len(ys)))
    axes = (rng.uniform(0.03, 0.12, 2) * min(h, w)).astype(int) + 2
    canvas = np.zeros((h, w), np.uint8)
    cv2.ellipse(
        canvas, (int(xs[k]), int(ys[k])), (int(axes[0]), int(axes[1])), rng.uniform(0, 180), 0, 360, 1, -1
    )
    mask = (canvas > 0) & allowed
    mask[ys[k], xs[k]] = True
    return mask


def perlin_mask(
    size: int | tuple[int, int],
    rng: np.random.Generator,
    threshold: float = 0.5,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    foreground: np.ndarray | None = None,
    min_area_fraction: float = 0.002,
) -> np.ndarray:
    """A random, never empty, bool defect-region mask of Perlin-noise blobs (DRAEM/GLASS style).

    As in GLASS, the region is one thresholded noise, or the union or intersection of two, which varies
    shapes from large blobs to thin streaks. Each noise has ``2**e`` lattice cells per axis with ``e``
    drawn from [min_scale_exp, max_scale_exp) (exclusive, as in the DRAEM/GLASS code), capped so that
    cells span at least 16 pixels. With ``foreground`` the mask is kept inside it. Draws covering less
    than ``min_area_fraction`` of the image are redrawn a few times; then an ellipse is used.
    """
    h, w = _hw(size)
    allowed = np.ones((h, w), bool) if foreground is None else foreground.astype(bool)
    if allowed.shape != (h, w):
        raise ValueError(f"foreground has shape {allowed.shape}, expected {(h, w)}")
    if not allowed.any():
        allowed = np.ones((h, w), bool)
    min_pixels = max(1, int(np.ceil(min_area_fraction * h * w)))
    for _ in range(_MAX_TRIES):
        mask = _noise_region(h, w, rng, threshold, min_scale_exp, max_scale_exp)
        how = rng.integers(3)
        if how == 1:
            mask |= _noise_region(h, w, rng, threshold, min_scale_exp, max_scale_exp)
        elif how == 2:
            mask &= _noise_region(h, w, rng, threshold, min_scale_exp, max_scale_exp)
        mask &= allowed
        if mask.sum() >= min_pixels:
            return mask
    return _ellipse(h, w, rng, allowed)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Bool HxW estimate of the object versus a plain background; all True when there is no clear split.

    A heuristic for objects on plain backgrounds (most MVTec object categories): pixels whose colour is
    far from the median border colour (Otsu threshold on that distance) are the object, cleaned up with
    morphology and hole filling. The estimate is not trusted (all True) when it covers < 5% or > 95% of
    the image, when a large part of the border itself looks like object, or when it falls apart into
    several large pieces: both signs of a patterned scene rather than an object on a plain background.
    """
    h, w = image.shape[:2]
    blurred = cv2.GaussianBlur(image, (5, 5), 0).astype(np.float32)
    b = max(2, min(h, w) // 32)
    border = np.concatenate(
        [
            blurred[:b].reshape(-1, 3),
            blurred[-b:].reshape(-1, 3),
            blurred[:, :b].reshape(-1, 3),
            blurred[:, -b:].reshape(-1, 3),
        ]
    )
    distance = np.linalg.norm(blurred - np.median(border, axis=0), axis=2)
    scaled = np.clip(distance * (255.0 / max(float(distance.max()), 1e-6)), 0, 255).astype(np.uint8)
    _, binary = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)

    everything = np.ones((h, w), bool)
    edge = np.concatenate(
        [binary[:b].ravel(), binary[-b:].ravel(), binary[:, :b].ravel(), binary[:, -b:].ravel()]
    )
    if edge.mean() > 0.2:  # the "background" is not plain
        return everything
    k = max(3, min(h, w) // 40) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    mask = ndimage.binary_fill_holes(binary > 0)
    if not 0.05 <= mask.mean() <= 0.95:
        return everything
    # One object makes one main region; many comparable pieces mean a patterned background instead.
    labels, count = ndimage.label(mask)
    largest = np.bincount(labels.ravel())[1:].max() if count else 0
    return mask if largest >= 0.8 * mask.sum() else everything


# ---------------------------------------------------------------------------------------------- textures


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random RGB colours (float32, n x 3) with clearly different brightness."""
    hue = rng.uniform(0, 180)
    hsv = np.zeros((1, n, 3), np.uint8)
    hsv[0, :, 0] = (hue + rng.uniform(-40, 40, n)) % 180  # related hues look like a real material
    hsv[0, :, 1] = rng.uniform(60, 255, n)
    values = np.linspace(30, 240, n) + rng.uniform(-20, 20, n)
    hsv[0, :, 2] = np.clip(rng.permutation(values), 0, 255)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def _colourise(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map a scalar field in [0, 1] through a colour ramp (a 256-entry lookup table)."""
    stops = np.linspace(0, 1, len(colours))
    ramp = np.linspace(0, 1, 256)
    lut = np.stack([np.interp(ramp, stops, colours[:, c]) for c in range(3)], axis=1).astype(np.uint8)
    return lut[np.clip(t * 255 + 0.5, 0, 255).astype(np.uint8)]


def _fractal(h: int, w: int, rng: np.random.Generator, base_cells: float, octaves: int) -> np.ndarray:
    """Fractal value noise in [0, 1]: upsampled random grids, each octave twice as fine and half as strong.

    Value noise from cv2.resize is much cheaper than Perlin noise and looks the same as a texture.
    """
    total = np.zeros((h, w), np.float32)
    cells, amplitude = base_cells, 1.0
    for _ in range(octaves):
        n = max(2, int(round(cells)))
        grid = rng.random((n, n)).astype(np.float32)
        total += amplitude * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        cells, amplitude = cells * 2, amplitude * 0.5
    return _normalise(total)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1], so every texture uses its whole colour ramp."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, 1e-6)


def _rotated_coords(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates along and across a random direction."""
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return xx * c + yy * s, -xx * s + yy * c


def _noise_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Coloured fractal noise, sometimes posterised into flat blotches (camouflage, stains)."""
    t = _fractal(h, w, rng, rng.uniform(3, 12), int(rng.integers(2, 5)))
    if rng.random() < 0.4:
        levels = int(rng.integers(3, 6))
        t = np.floor(t * levels * 0.999) / (levels - 1)
    return _colourise(t, _palette(rng, int(rng.integers(2, 5))))


def _stripes_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Parallel stripes or lines at a random angle and period, hard or soft, slightly wavy."""
    u, _ = _rotated_coords(h, w, rng)
    period = rng.uniform(4, 32)
    wobble = (_fractal(h, w, rng, 3, 2) - 0.5) * rng.uniform(0, 2 * period)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (u + wobble) / period)
    if rng.random() < 0.5:
        wave = (wave > rng.uniform(0.2, 0.8)).astype(np.float32)
    return _colourise(wave, _palette(rng, 2))


def _checker_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A rotated checkerboard or a grid of lines (woven, tiled or meshed surfaces)."""
    u, v = _rotated_coords(h, w, rng)
    cell = rng.uniform(6, 40)
    if rng.random() < 0.5:
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    else:
        line = rng.uniform(0.1, 0.35)
        t = (((u / cell) % 1 < line) | ((v / cell) % 1 < line)).astype(np.float32)
    return _colourise(t, _palette(rng, 2))


def _speckle_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Granite: fine noise quantised into a few colours, sprinkled with random dots."""
    t = _fractal(h, w, rng, rng.uniform(16, 48), 2)
    levels = int(rng.integers(3, 6))
    t = np.floor(t * levels * 0.999) / (levels - 1)
    texture = _colourise(t, _palette(rng, levels)).copy()
    dots = rng.random((h, w)) < rng.uniform(0.01, 0.06)
    if rng.random() < 0.5:
        dots = cv2.dilate(dots.astype(np.uint8), np.ones((2, 2), np.uint8)) > 0
    texture[dots] = _palette(rng, 1)[0].astype(np.uint8)
    return texture


def _marble_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Marble or wood grain: a sine of one coordinate, distorted by fractal turbulence."""
    u, _ = _rotated_coords(h, w, rng)
    turbulence = _fractal(h, w, rng, rng.uniform(2, 6), 4) * rng.uniform(2, 8)
    t = np.abs(np.sin(2 * np.pi * (u / rng.uniform(20, 80) + turbulence)))
    t = t ** rng.uniform(0.3, 3)  # thin dark veins or thin bright ones
    return _colourise(t.astype(np.float32), _palette(rng, int(rng.integers(2, 4))))


def _source_texture(h: int, w: int, rng: np.random.Generator, sources: Sequence[np.ndarray]) -> np.ndarray:
    """A random crop of another image, rescaled, rotated and colour-shifted so it looks foreign."""
    source = sources[int(rng.integers(len(sources)))]
    sh, sw = source.shape[:2]
    side = max(8, int(min(sh, sw) * rng.uniform(0.2, 0.6)))
    y, x = int(rng.integers(sh - side + 1)), int(rng.integers(sw - side + 1))
    crop = cv2.resize(np.ascontiguousarray(source[y : y + side, x : x + side]), (w, h))
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(0, 360), 1.0)
    crop = cv2.warpAffine(crop, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + rng.integers(30, 150)) % 180
    hsv[..., 1] = np.maximum(hsv[..., 1], np.uint8(rng.integers(80, 200)))
    crop = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.random() < 0.5:
        crop = 255 - crop
    return crop[..., rng.permutation(3)]


_FAMILIES = {
    "noise": _noise_texture,
    "stripes": _stripes_texture,
    "checker": _checker_texture,
    "speckle": _speckle_texture,
    "marble": _marble_texture,
}
TEXTURE_FAMILIES = (*_FAMILIES, "source")


def make_texture(
    size: int | tuple[int, int],
    rng: np.random.Generator,
    sources: Sequence[np.ndarray] | None = None,
    family: str | None = None,
) -> np.ndarray:
    """A random uint8 HxWx3 texture from one of :data:`TEXTURE_FAMILIES` (the stand-in for DTD).

    With ``sources`` (uint8 RGB images, e.g. other training images) about a third of the textures are
    crops of them; ``family`` forces one family (for previews and tests).
    """
    h, w = _hw(size)
    if family is None:
        use_source = sources is not None and len(sources) > 0 and rng.random() < 1 / 3
        family = "source" if use_source else list(_FAMILIES)[int(rng.integers(len(_FAMILIES)))]
    if family == "source":
        if sources is None or len(sources) == 0:
            raise ValueError("the 'source' texture family needs source images")
        return np.ascontiguousarray(_source_texture(h, w, rng, sources))
    if family not in _FAMILIES:
        raise ValueError(f"unknown texture family {family!r}; choose one of {', '.join(TEXTURE_FAMILIES)}")
    return np.ascontiguousarray(_FAMILIES[family](h, w, rng))


def local_anomaly(
    image: np.ndarray,
    rng: np.random.Generator,
    sources: Sequence[np.ndarray] | None = None,
    use_foreground: bool = False,
    beta_range: tuple[float, float] = (0.2, 0.8),
    foreground: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A GLASS LAS image: returns (uint8 image with a synthetic defect, bool mask of the changed region).

    Inside the Perlin mask the image becomes ``(1 - beta) * texture + beta * image`` with one
    ``beta ~ U(beta_range)`` per image; outside it is untouched. The mask is never empty. With
    ``use_foreground`` the defect stays on the object (see :func:`foreground_mask`); a precomputed
    ``foreground`` can be passed instead to save recomputing it every epoch.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if foreground is None and use_foreground:
        foreground = foreground_mask(image)
    mask = perlin_mask((h, w), rng, foreground=foreground)
    texture = make_texture((h, w), rng, sources)
    beta = rng.uniform(*beta_range)
    out = image.copy()
    blend = (1 - beta) * texture[mask].astype(np.float32) + beta * image[mask].astype(np.float32)
    out[mask] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    return out, mask


def synthetic_defect_images(images: Sequence[np.ndarray], n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` synthetic-defect versions of normal uint8 images (taken in turn), for INT8 calibration.

    Calibrated on normal images only, a quantizer sets the range of a distance or score layer to the
    normal values and clips every anomaly to the same ceiling; a few images with defects keep anomalies
    inside the range. They are made from training images, never from test images.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if n and not len(images):
        raise ValueError("synthetic defects need at least one normal image to start from")
    rng = np.random.default_rng(seed)
    return [local_anomaly(images[i % len(images)], rng)[0] for i in range(n)]
