"""Reading and resizing images and masks.

Every image enters edgead through :func:`load_rgb`, so the rest of the code can assume one format:
uint8, height x width x 3, RGB. Whatever the file holds (grayscale, alpha, palette, CMYK, 16-bit,
float), it is converted here, and any file that cannot be decoded raises an
:class:`~edgead.errors.ImageReadError` that names the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgead.errors import DatasetError, ImageReadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Larger images are refused before decoding: 64 MP of RGB is already ~200 MB of memory, far more than
# an inspection camera delivers, so a bigger file is almost certainly a mistake (or a decompression bomb).
MAX_PIXELS = 64_000_000

# Lossy formats blur mask edges into grey values; for those a mask pixel counts as defect above half.
_LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")


def is_image_file(path: Path) -> bool:
    """True for visible files with an image extension (any case)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; hidden and non-image files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a folder; check the path")
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _read_image(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image (file closed on return), turning every failure into ImageReadError."""
    if not path.exists():
        raise ImageReadError(f"{what} file {path} does not exist; check the path")
    if not path.is_file():
        raise ImageReadError(f"{what} path {path} is not a file; pass an image file")
    try:
        with warnings.catch_warnings():
            # The size check below gives a clearer message than PIL's own bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # Only the header is parsed so far: refuse huge images before any pixel is decoded.
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageReadError(
                        f"{what} {path} is {width}x{height} pixels, over the limit of {MAX_PIXELS:,}; "
                        "downscale it before use"
                    )
                image.load()
                return image
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{what} {path} is too large to decode safely ({exc}); downscale it") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(
            f"cannot read {what} {path}: not an image or an unsupported format; "
            "re-save it as PNG or JPEG or remove it"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL raises OSError for truncated data and SyntaxError/ValueError for broken chunks.
        raise ImageReadError(
            f"cannot decode {what} {path} (truncated or corrupt: {exc}); re-export it or remove it"
        ) from exc


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth or float array to 0..255 by its range, not by clipping."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.uint16:
        full_scale = 65535.0
    elif np.issubdtype(values.dtype, np.integer):
        values = np.clip(values, 0, None)
        # PIL's mode "I" holds 16-bit PNGs/TIFFs as int32; only genuinely larger values are 32-bit data.
        full_scale = 65535.0 if values.max(initial=0) <= 65535 else float(np.iinfo(np.int32).max)
    else:
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        # Float images are either on a 0..1 scale (the usual convention) or already 0..255.
        full_scale = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    scaled = np.round(values.astype(np.float64) * (255.0 / full_scale))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Drop an alpha channel the way a viewer would show it on a black background."""
    weight = alpha.astype(np.float32)[..., None] / 255.0
    return np.round(rgb.astype(np.float32) * weight).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBa", "La", "PA"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        pixels = np.asarray(image)
        return _composite_on_black(pixels[..., :3], pixels[..., 3])
    if mode == "LA":
        pixels = np.asarray(image)
        gray = _composite_on_black(pixels[..., :1], pixels[..., 1])
        return np.repeat(gray, 3, axis=2)
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode == "1" or mode == "L":
        gray = np.asarray(image.convert("L"))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode.startswith("I") or mode == "F":
        gray = _to_uint8(np.asarray(image))
        return np.repeat(gray[..., None], 3, axis=2)
    # CMYK, YCbCr, LAB, HSV, RGBX: PIL knows the conversion.
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_rgb(path: str | Path) -> np.ndarray:
    """Read any supported image file as uint8 RGB, height x width x 3."""
    path = Path(path)
    image = _read_image(path, "image")
    try:
        return _pil_to_rgb(image)
    except (OSError, ValueError) as exc:
        raise ImageReadError(
            f"cannot convert image {path} (mode {image.mode}) to RGB: {exc}; re-save it as an 8-bit PNG"
        ) from exc


def load_mask(path: str | Path) -> np.ndarray:
    """Read a defect mask as a bool height x width array: any nonzero pixel is defect."""
    path = Path(path)
    image = _read_image(path, "mask")
    if image.mode == "P":
        image = image.convert("RGBA")
    pixels = np.asarray(image)
    if image.mode in ("LA", "RGBA", "La", "RGBa", "PA"):
        # An annotation drawn on a transparent layer: transparent pixels are background.
        colour, alpha = pixels[..., :-1], pixels[..., -1]
        pixels = np.where(alpha[..., None] > 0, colour, 0)
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2)
    if path.suffix.lower() in _LOSSY_EXTENSIONS:
        return _to_uint8(pixels) > 127
    return pixels != 0


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 image to ``size`` x ``size``, antialiased bilinear (PIL, as torchvision does)."""
    if img.shape[:2] == (size, size):
        return img
    return np.array(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask to ``size`` x ``size`` with nearest neighbour, so it stays binary."""
    if mask.shape[:2] == (size, size):
        return mask.astype(bool)
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(small) > 0
