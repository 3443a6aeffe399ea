"""A synthetic inspection dataset: turned metal flanges on a conveyor belt, some with defects.

It exists so that the demo and the tests run on a fresh machine without any real images. Each image is
a round metal part (a flange with a centre bore and four bolt holes, concentric turning marks, an
anisotropic highlight and bevelled edges) on a dark belt, with mild jitter in position, rotation,
size and brightness. Defects are drawn on top with exact pixel masks:

- ``scratch``: a thin dark or bright curved line across the face,
- ``spot``: an irregular rust or oil stain,
- ``crack``: a jagged dark line running in from the rim,
- ``missing``: a chunk broken out of the rim, showing the belt underneath.

The jitter is kept mild on purpose: a nearest-neighbour patch model must find good parts alike.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from edgead.errors import DatasetError

DEFECT_TYPES = ("scratch", "spot", "crack", "missing")

# Part geometry, as fractions of the image size.
_PART_RADIUS = 0.34
_BORE_RADIUS = 0.11
_BOLT_CIRCLE = 0.225
_BOLT_RADIUS = 0.03
_BEVEL = 0.022


def _smooth_noise(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """1D Gaussian noise lightly smoothed (circularly), for turning marks and belt streaks."""
    noise = rng.normal(0.0, 1.0, n)
    kernel = np.ones(width) / width
    padded = np.concatenate([noise[-width:], noise, noise[:width]])
    smooth = np.convolve(padded, kernel, mode="same")[width:-width]
    return (smooth / (smooth.std() + 1e-8)).astype(np.float32)


def _blob(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float):
    """An irregular round region: a circle whose radius wobbles with a few random harmonics."""
    dx, dy = xx - cx, yy - cy
    angle = np.arctan2(dy, dx)
    wobble = np.ones_like(angle)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.0, 0.14) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(dx, dy) < radius * wobble


def _stroke(points: np.ndarray, size: int, thickness: int) -> np.ndarray:
    """Pixels of a polyline drawn without antialiasing, so the mask is exactly what changes."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [np.round(points).astype(np.int32)], False, 255, thickness, cv2.LINE_8)
    return canvas > 0


def _belt(rng: np.random.Generator, size: int, yy: np.ndarray, level: float) -> np.ndarray:
    """A dark rubber conveyor belt: faint streaks along the direction of travel plus sensor noise."""
    streaks = 1.8 * _smooth_noise(rng, size, 2)[yy.astype(int)]
    weave = 1.2 * np.sin(2 * np.pi * yy / 5.0)
    gray = level + streaks + weave + rng.normal(0.0, 2.0, (size, size)).astype(np.float32)
    return gray[..., None] * np.array([0.96, 1.0, 1.06], np.float32)


def _part_shading(rng, size, r, theta, dx, dy, radius, rotation, light) -> np.ndarray:
    """Gray level of the metal face: turning rings, fine radial brushing, highlight and bevels."""
    rings = _smooth_noise(rng, 2 * size, 2)[np.clip((r * 1.5).astype(int), 0, 2 * size - 1)]
    turn = ((theta - rotation) % (2 * np.pi)) / (2 * np.pi)
    brushing = _smooth_noise(rng, 1024, 3)[(turn * 1023).astype(int)]
    # Turned metal reflects in a bow-tie: bright along one diameter, darker across it.
    highlight = np.cos(theta - light) ** 6
    gradient = (dx * np.cos(light) + dy * np.sin(light)) / radius
    gray = 128.0 + 6.0 * rings + 2.5 * brushing + 70.0 * highlight + 18.0 * gradient

    # Chamfers catch the light on the side facing it (outer rim) or away from it (bore).
    bevel = _BEVEL * size
    facing = np.cos(theta - light)
    outer = (r > radius - bevel) & (r <= radius)
    gray = np.where(outer, gray + 45.0 * facing - 10.0, gray)
    bore = _BORE_RADIUS * size
    inner = (r >= bore) & (r < bore + bevel)
    gray = np.where(inner, gray - 40.0 * facing - 15.0, gray)
    return gray.astype(np.float32)


def render_part(
    rng: np.random.Generator, size: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one part on the belt; returns (uint8 size x size x 3 image, bool mask of the defect pixels).

    ``defect`` is None for a good part or one of :data:`DEFECT_TYPES`. The mask is all False for good parts.
    """
    image, mask, _, _ = render_part_layers(rng, size, defect)
    return image, mask


def render_part_layers(
    rng: np.random.Generator, size: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`render_part` plus the layers a moving scene needs to paste the part onto another belt:
    (image, defect mask, part coverage alpha in 0..1, shadow factor that darkens the belt in 0..1)."""
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect {defect!r}; choose one of {', '.join(DEFECT_TYPES)} or None")
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # Mild per-image jitter: a model must see good parts as alike.
    cx, cy = s / 2 + rng.uniform(-0.02, 0.02, 2) * s
    radius = _PART_RADIUS * s * rng.uniform(0.985, 1.015)
    rotation = rng.uniform(-np.pi / 20, np.pi / 20)
    light = -np.pi / 4 + rng.uniform(-0.08, 0.08)
    brightness = rng.uniform(0.94, 1.06)

    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)

    # Belt with the part's soft shadow cast down-right.
    background = _belt(rng, size, yy, 62.0)
    shadow_r = np.hypot(dx - 0.02 * s, dy - 0.025 * s)
    shadow = 1.0 - 0.5 * np.clip((radius + 0.02 * s - shadow_r) / (0.05 * s), 0, 1)
    background *= shadow[..., None]

    # Coverage of the part (antialiased edges): disc minus bore minus bolt holes.
    bore = _BORE_RADIUS * s
    alpha = np.clip(radius - r + 0.5, 0, 1) * np.clip(r - bore + 0.5, 0, 1)
    gray = _part_shading(rng, size, r, theta, dx, dy, radius, rotation, light)
    for k in range(4):
        angle = rotation + np.pi / 4 + k * np.pi / 2
        hx, hy = cx + _BOLT_CIRCLE * s * np.cos(angle), cy + _BOLT_CIRCLE * s * np.sin(angle)
        d = np.hypot(xx - hx, yy - hy)
        alpha *= np.clip(d - _BOLT_RADIUS * s + 0.5, 0, 1)
        ring = (d >= _BOLT_RADIUS * s) & (d < (_BOLT_RADIUS + 0.012) * s)
        gray = np.where(ring, gray - 35.0, gray)
    part = gray[..., None] * np.array([1.0, 1.01, 1.04], np.float32)

    solid = alpha > 0.5
    mask = np.zeros((size, size), bool)
    if defect == "missing":
        mask, alpha = _missing(rng, xx, yy, cx, cy, radius, solid, alpha)
    image = background * (1 - alpha[..., None]) + part * alpha[..., None]
    if defect in ("scratch", "spot", "crack"):
        mask, colour, opacity = _DRAWERS[defect](rng, xx, yy, cx, cy, radius, solid)
        image[mask] = image[mask] * (1 - opacity) + colour * opacity

    image = image * brightness + rng.normal(0.0, 1.5, image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask, alpha.astype(np.float32), shadow


def _face_point(rng: np.random.Generator, cx: float, cy: float, radius: float) -> tuple[float, float]:
    """A random point on the flat face, between the bore bevel and the rim bevel."""
    s = radius / _PART_RADIUS
    rho = rng.uniform((_BORE_RADIUS + 0.05) * s, radius - 0.05 * s)
    phi = rng.uniform(0, 2 * np.pi)
    return cx + rho * np.cos(phi), cy + rho * np.sin(phi)


def _retry(draw, solid: np.ndarray, min_pixels: int):
    """Draw until the defect covers enough of the part (a stroke may fall mostly into a hole)."""
    for _ in range(50):
        result = draw()
        mask = result[0] & solid
        if mask.sum() >= min_pixels:
            return (mask, *result[1:])
    raise RuntimeError("could not place a defect on the part")  # unreachable in practice


def _scratch(rng, xx, yy, cx, cy, radius, solid):
    size = xx.shape[0]
    thickness = max(1, round(size / 128))

    def draw():
        x0, y0 = _face_point(rng, cx, cy, radius)
        direction = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.14, 0.22) * size
        end = np.array([x0 + length * np.cos(direction), y0 + length * np.sin(direction)])
        start = np.array([x0, y0])
        bend = rng.uniform(-0.05, 0.05) * size * np.array([-np.sin(direction), np.cos(direction)])
        control = (start + end) / 2 + bend
        t = np.linspace(0, 1, 32)[:, None]
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        colour = 30.0 if rng.random() < 0.7 else 250.0
        return _stroke(points, size, thickness), colour, 0.8

    return _retry(draw, solid, 8 * size // 64)


def _spot(rng, xx, yy, cx, cy, radius, solid):
    size = xx.shape[0]
    stains = (np.array([150.0, 85.0, 40.0], np.float32), np.array([60.0, 52.0, 40.0], np.float32))

    def draw():
        x0, y0 = _face_point(rng, cx, cy, radius)
        blob = _blob(rng, xx, yy, x0, y0, rng.uniform(0.035, 0.05) * size)
        return blob, stains[int(rng.integers(2))], 0.75

    return _retry(draw, solid, size * size // 800)


def _crack(rng, xx, yy, cx, cy, radius, solid):
    size = xx.shape[0]
    thickness = max(1, round(size / 128))
    step = 0.014 * size

    def walk(x, y, heading, n):
        points = [(x, y)]
        for _ in range(n):
            direction = heading + rng.normal(0.0, 0.7)
            x, y = x + step * np.cos(direction), y + step * np.sin(direction)
            points.append((x, y))
        return np.array(points)

    def draw():
        phi = rng.uniform(0, 2 * np.pi)
        inward = phi + np.pi + rng.uniform(-0.4, 0.4)
        rim_x, rim_y = cx + (radius - 1) * np.cos(phi), cy + (radius - 1) * np.sin(phi)
        trunk = walk(rim_x, rim_y, inward, rng.integers(9, 14))
        branch_at = trunk[len(trunk) // 2]
        branch = walk(*branch_at, inward + rng.choice([-0.8, 0.8]), rng.integers(3, 6))
        lines = _stroke(trunk, size, thickness) | _stroke(branch, size, max(1, thickness - 1))
        return lines, 20.0, 0.85

    return _retry(draw, solid, 8 * size // 64)


def _missing(rng, xx, yy, cx, cy, radius, solid, alpha):
    size = xx.shape[0]

    def draw():
        phi = rng.uniform(0, 2 * np.pi)
        rho = radius + 0.01 * size
        chunk_radius = rng.uniform(0.06, 0.08) * size
        return (_blob(rng, xx, yy, cx + rho * np.cos(phi), cy + rho * np.sin(phi), chunk_radius),)

    (mask,) = _retry(draw, solid, size * size // 600)
    # The broken-off chunk leaves the whole blob empty, including its antialiased fringe.
    chunk = _blob_fringe(mask, alpha)
    return mask, np.where(chunk, 0.0, alpha).astype(np.float32)


def _blob_fringe(mask: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel into partly covered edge pixels, so no sliver of the rim remains."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return mask | (grown & (alpha <= 0.5))


_DRAWERS = {"scratch": _scratch, "spot": _spot, "crack": _crack}


def _save_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, compress_level=1)


def make_synthetic_dataset(
    root: str | Path,
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_defect: int = 20,
    size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write an MVTec-layout dataset of synthetic parts to ``root`` and return its path.

    Defective test images cycle through :data:`DEFECT_TYPES`; every one has a 0/255 mask in
    ``ground_truth/<type>/<stem>_mask.png``. Each image has its own seed, so the same (seed, split, index)
    always gives the same picture whatever the counts.
    """
    root = Path(root)
    ours = [root / "train", root / "test", root / "ground_truth"]
    if any(p.exists() for p in ours):
        if not overwrite:
            raise DatasetError(
                f"{root} already holds a dataset (train/, test/ or ground_truth/); "
                "choose an empty folder or pass overwrite=True"
            )
        for p in ours:
            shutil.rmtree(p, ignore_errors=True)

    def write(folder: Path, split: int, count: int, defect: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split, i])
            image, mask = render_part(rng, size, defect)
            _save_png(folder / f"{i:03d}.png", image)
            if defect is not None:
                mask_dir = root / "ground_truth" / defect
                mask_dir.mkdir(parents=True, exist_ok=True)
                _save_png(mask_dir / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)

    write(root / "train" / "good", 0, n_train)
    write(root / "test" / "good", 1, n_test_good)
    for k, defect in enumerate(DEFECT_TYPES):
        count = len(range(k, n_test_defect, len(DEFECT_TYPES)))
        write(root / "test" / defect, 2 + k, count, defect)
    return root
