"""Light training augmentations for GLASS-style training.

Each transform is applied independently with probability 0.5, as in GLASS: a small rotation, a small
translation, colour jitter and horizontal and vertical flips. They widen the set of normal views the
discriminator sees without making a normal part look defective:

- rotation is kept within +-10 degrees: enough to cover placement jitter on a conveyor or fixture, small
  enough that aligned categories (transistor, metal nut) still look like their normal pose;
- translation is at most 5% of the image side, again placement jitter only;
- borders exposed by rotation and translation are filled by reflection, so no black wedges appear
  that the discriminator could learn as a cue;
- colour jitter multiplies brightness, contrast and saturation by factors in [1 - 0.2, 1 + 0.2],
  i.e. lighting drift, not a colour change that would itself be a defect.

Flips are on by default (GLASS does the same) but can be switched off for categories where a mirrored
part is a defect (MVTec metal_nut has a "flip" defect type).

Everything draws from the ``numpy.random.Generator`` passed in, so a seed gives the same views.
"""

from __future__ import annotations

import cv2
import numpy as np

# ITU-R BT.601 luma weights, for the grey image that saturation and contrast blend towards.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _geometric(image: np.ndarray, angle: float, shift: tuple[float, float]) -> np.ndarray:
    """Rotate about the centre and shift in one warp; exposed borders are reflected."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, 1.0)
    matrix[:, 2] += shift
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _colour_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Scale brightness, contrast (around the mean grey) and saturation (around each pixel's grey)."""
    x = image.astype(np.float32) * brightness
    grey = x @ _LUMA
    if contrast != 1.0:
        mean = float(grey.mean())
        x = (x - mean) * contrast + mean
        grey = (grey - mean) * contrast + mean
    if saturation != 1.0:
        x = grey[..., None] + (x - grey[..., None]) * saturation
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def augment_image(
    image: np.ndarray,
    rng: np.random.Generator,
    rotate_degrees: float = 10.0,
    translate: float = 0.05,
    jitter: float = 0.2,
    flips: bool = True,
) -> np.ndarray:
    """A randomly augmented copy of a uint8 HxWx3 image (same shape and dtype).

    Rotation, translation, colour jitter and each flip are applied independently with probability 0.5.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    apply = rng.random(5) < 0.5
    angle = rng.uniform(-rotate_degrees, rotate_degrees) if apply[0] else 0.0
    shift = rng.uniform(-translate, translate, 2) * (w, h) if apply[1] else np.zeros(2)
    factors = rng.uniform(1 - jitter, 1 + jitter, 3) if apply[2] else np.ones(3)

    out = image
    if angle != 0.0 or shift.any():
        out = _geometric(out, angle, (float(shift[0]), float(shift[1])))
    if apply[2]:
        out = _colour_jitter(out, *(float(f) for f in factors))
    if flips and apply[3]:
        out = out[:, ::-1]
    if flips and apply[4]:
        out = out[::-1]
    return np.ascontiguousarray(out) if out is not image else image.copy()
