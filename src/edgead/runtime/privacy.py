"""Privacy by design: blur faces and fixed regions of a frame BEFORE it is scored, written or sent.

The loop calls :meth:`PrivacyFilter.apply` on each decoded frame and then only ever uses the returned
image, so the original pixels of a blurred region never reach the model, the overlays, the video or the
PNGs. Blurring is destructive on purpose: the region is pixelated to coarse blocks and then smoothed,
which leaves no detail to undo.

Faces are found with OpenCV's bundled Haar cascade (frontal faces; shipped inside the opencv wheel, so
nothing is downloaded). YuNet would be more accurate but its model file is not bundled with OpenCV.
Regions come from a JSON file of polygons in pixel coordinates of the source frame::

    {"polygons": [[[10, 10], [200, 10], [200, 120], [10, 120]], [[400, 300], [500, 300], [450, 400]]]}

A region that is not blurred must never look as if it were: coordinates must be finite and within
+-MAX_COORDINATE, polygons need 3 points and a non-zero area, each polygon is clipped to the frame, and one
that covers no pixel of a frame stops the run with a PrivacyError (at the first frame of each size).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from edgead.errors import EdgeadError

BLUR_TARGETS = ("faces",)
# Faces smaller than this share of the frame's short side are ignored (detector noise).
_MIN_FACE_FRACTION = 0.05
# Detection runs on a copy whose short side is at most this, for speed.
_DETECT_SIZE = 320
# A detected face box is grown by this share on each side, to cover hair, ears and chin.
_FACE_MARGIN = 0.2
# Region coordinates beyond this many pixels are refused: 6 times a 16K frame's width, so only a wrong file.
MAX_COORDINATE = 100_000


class PrivacyError(EdgeadError):
    """A privacy option or region file is invalid."""


def _points(polygon: object) -> np.ndarray | None:
    """A polygon's points as float64 N x 2, or None unless it is a list of [x, y] numbers."""
    if not isinstance(polygon, list) or not all(
        isinstance(point, list)
        and len(point) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in point)
        for point in polygon
    ):
        return None
    return np.asarray(polygon, dtype=np.float64).reshape(-1, 2)


def _validate_polygons(data: object, path: Path) -> list[np.ndarray]:
    """Refuse anything that is not a real polygon in pixel range: a blur that silently misses is a leak."""
    polygons = data.get("polygons") if isinstance(data, dict) else data
    if not isinstance(polygons, list) or not polygons:
        raise PrivacyError(f'{path}: expected {{"polygons": [[[x, y], ...], ...]}} with at least one polygon')
    result = []
    for i, polygon in enumerate(polygons):
        points = _points(polygon)
        if points is None or len(points) < 3:
            raise PrivacyError(f"{path}: polygon {i} must be a list of at least 3 [x, y] pixel points")
        if not np.isfinite(points).all():
            raise PrivacyError(f"{path}: polygon {i} has a NaN or infinite coordinate")
        largest = float(np.abs(points).max())
        if largest > MAX_COORDINATE:
            raise PrivacyError(
                f"{path}: polygon {i} has a coordinate of {largest:g}, beyond the +-{MAX_COORDINATE} allowed: "
                "regions are pixel coordinates of the source frame"
            )
        if np.linalg.matrix_rank(points - points[0]) < 2:
            raise PrivacyError(f"{path}: polygon {i} has zero area (its points lie on one line or coincide)")
        result.append(points)
    return result


def clip_polygon(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """The part of a polygon over the frame's pixel centres (Sutherland-Hodgman; empty when outside).

    Clipping first keeps the coordinates handed to OpenCV small, whatever the file held.
    """
    edges = ((0, 0.0, False), (0, width - 1.0, True), (1, 0.0, False), (1, height - 1.0, True))
    for axis, limit, below in edges:
        if len(points) == 0:
            break
        inside = points[:, axis] <= limit if below else points[:, axis] >= limit
        kept = []
        for k in range(len(points)):
            if inside[k] != inside[k - 1]:  # the edge from the previous point crosses the limit
                previous, current = points[k - 1], points[k]
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                kept.append(previous + t * (current - previous))
            if inside[k]:
                kept.append(points[k])
        points = np.asarray(kept, dtype=np.float64).reshape(-1, 2)
    return points


def load_regions(path: str | Path) -> list[np.ndarray]:
    """Polygons (each N x 2 float64, pixel x/y) from a JSON region file, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise PrivacyError(f"region file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrivacyError(f"region file {path} is not valid JSON ({exc})") from exc
    return _validate_polygons(data, path)


def obliterate(image: np.ndarray, mask: np.ndarray) -> None:
    """Destroy the detail under ``mask`` in place, region by region: coarse pixelation, then a blur."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    for label in range(1, count):
        left, top, w, h = stats[label, :4]
        patch = image[top : top + h, left : left + w]
        block = max(4, min(h, w) // 6)
        small = cv2.resize(patch, (max(1, w // block), max(1, h // block)), interpolation=cv2.INTER_AREA)
        coarse = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        coarse = cv2.GaussianBlur(coarse, (0, 0), sigmaX=block / 2)
        inside = labels[top : top + h, left : left + w] == label
        patch[inside] = coarse[inside]


class FaceDetector:
    """OpenCV's frontal-face Haar cascade, run on a downscaled grey copy of the frame."""

    def __init__(self) -> None:
        cascade = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self.classifier = cv2.CascadeClassifier(str(cascade))
        if self.classifier.empty():
            raise PrivacyError(
                f"OpenCV's face cascade {cascade} is missing; reinstall opencv-python-headless 4.x "
                "(`pip install 'opencv-python-headless<5'`)"
            )

    def detect(self, image: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Face boxes (x, y, w, h) in the frame's pixels, grown by a margin."""
        h, w = image.shape[:2]
        scale = min(1.0, _DETECT_SIZE / min(h, w))
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            grey = cv2.resize(grey, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        min_side = max(12, round(_MIN_FACE_FRACTION * min(grey.shape)))
        found = self.classifier.detectMultiScale(
            grey, scaleFactor=1.1, minNeighbors=4, minSize=(min_side, min_side)
        )
        boxes = []
        for x, y, bw, bh in np.asarray(found).reshape(-1, 4) / scale:
            mx, my = _FACE_MARGIN * bw, _FACE_MARGIN * bh
            boxes.append((int(x - mx), int(y - my), int(bw + 2 * mx), int(bh + 2 * my)))
        return boxes


class PrivacyFilter:
    """Blurs the configured regions of each frame; ``apply`` returns the frame to use from then on."""

    def __init__(self, blur: str | None = None, regions: str | Path | None = None) -> None:
        if blur is not None and blur not in BLUR_TARGETS:
            raise PrivacyError(f"--blur {blur!r} is not supported; choose one of: {', '.join(BLUR_TARGETS)}")
        self.faces = FaceDetector() if blur == "faces" else None
        self.regions = Path(regions) if regions is not None else None
        self.polygons = load_regions(regions) if regions is not None else []
        self._polygon_mask: np.ndarray | None = None

    @property
    def active(self) -> bool:
        return self.faces is not None or bool(self.polygons)

    def mask(self, image: np.ndarray) -> np.ndarray:
        """The pixels to blur in this frame (bool H x W); PrivacyError if a region misses the frame."""
        h, w = image.shape[:2]
        if self._polygon_mask is None or self._polygon_mask.shape != (h, w):
            self._polygon_mask = self.region_mask(h, w)
        mask = self._polygon_mask.copy()
        if self.faces is not None:
            for x, y, bw, bh in self.faces.detect(image):
                mask[max(0, y) : max(0, y + bh), max(0, x) : max(0, x + bw)] = True
        return mask

    def region_mask(self, height: int, width: int) -> np.ndarray:
        """The region polygons clipped to a ``width`` x ``height`` frame (bool H x W).

        Each polygon must cover at least one pixel of the frame: one that does not is refused, so nobody
        believes a region is blurred when nothing is.
        """
        mask = np.zeros((height, width), np.uint8)
        missing = []
        for i, points in enumerate(self.polygons):
            clipped = clip_polygon(points, width, height)
            canvas = np.zeros_like(mask)
            if len(clipped):
                cv2.fillPoly(canvas, [np.round(clipped).astype(np.int32)], 1)
            if not canvas.any():
                missing.append(i)
            mask |= canvas
        if missing:
            if len(missing) == len(self.polygons):
                which = "no polygon covers any pixel" if len(missing) > 1 else "its polygon covers no pixel"
            else:
                plural = len(missing) > 1
                which = f"polygon{'s' * plural} {', '.join(map(str, missing))} cover{'s' * (not plural)} no pixel"
            raise PrivacyError(
                f"--blur-regions {self.regions}: {which} of the {width}x{height} frame, so nothing there would "
                "be blurred; regions are pixel coordinates (x, y) of the source frame"
            )
        return mask.astype(bool)

    def apply(self, image: np.ndarray) -> tuple[np.ndarray, int]:
        """(the blurred copy of ``image``, number of blurred pixels); the input is left untouched."""
        if not self.active:
            return image, 0
        mask = self.mask(image)
        blurred = image.copy()
        obliterate(blurred, mask)
        return blurred, int(mask.sum())
