"""A synthetic inspection video: the parts of :mod:`edgead.data.synthetic` riding a conveyor belt past a camera.

Parts enter on the right, cross the frame and leave on the left; every ``defect_every``-th part carries a
defect. Each part is rendered once (as a sprite with its coverage and shadow) and pasted onto a belt with
fresh sensor noise per frame, so a 30 s 640x480 video takes seconds to make.

Every frame gets a ground-truth label, written next to the video as ``<video>.truth.csv``:

- ``defective``: the whole defect of some part is in view,
- ``good``: no defect pixel is in view (parts may be cut by the frame edge: that is normal on a belt),
- ``partial``: a defect is only partly in view (ambiguous; tests and summaries leave these out).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgead.data.synthetic import DEFECT_TYPES, _smooth_noise, render_part_layers
from edgead.errors import EdgeadError

LABELS = ("good", "defective", "partial")


@dataclass
class _Sprite:
    image: np.ndarray  # S x S x 3 float32
    alpha: np.ndarray  # S x S x 1 float32
    shadow: np.ndarray  # S x S x 1 float32
    mask: np.ndarray  # S x S bool: defect pixels
    defect: str | None


@dataclass
class BeltFrame:
    index: int
    image: np.ndarray  # H x W x 3 RGB uint8
    label: str  # one of LABELS
    parts: list[int]  # indices of the parts (partly) in view
    defects: list[str]  # defects of the parts in view


class BeltScene:
    """Parts spaced ``spacing`` part-diameters apart, moving ``speed`` pixels per frame to the left."""

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        speed: float = 10.0,
        spacing: float = 1.35,
        defect_every: int = 3,
        good_only: bool = False,
        seed: int = 0,
    ) -> None:
        if width < 64 or height < 64:
            raise EdgeadError(f"the belt video must be at least 64x64 pixels (got {width}x{height})")
        if speed <= 0:
            raise EdgeadError("speed must be positive (pixels per frame)")
        self.width, self.height, self.speed, self.seed = width, height, float(speed), seed
        self.defect_every = 0 if good_only else defect_every
        self.sprite_size = height  # the part fills the frame height as in the still dataset
        self.pitch = spacing * 0.68 * height  # 0.68 = part diameter / image size in the still dataset
        rng = np.random.default_rng(99)  # one belt for every scene: the same line, other parts
        rows = np.arange(height)
        level = 62.0 + 1.8 * _smooth_noise(rng, height, 2) + 1.2 * np.sin(2 * np.pi * rows / 5.0)
        self.belt = np.repeat(level[:, None], width, axis=1)[..., None] * np.array(
            [0.96, 1.0, 1.06], np.float32
        )
        self.belt = self.belt.astype(np.float32)
        self._sprites: dict[int, _Sprite] = {}

    def defect_of(self, part: int) -> str | None:
        if self.defect_every and part % self.defect_every == self.defect_every - 1:
            return DEFECT_TYPES[(part // self.defect_every) % len(DEFECT_TYPES)]
        return None

    def _sprite(self, part: int) -> _Sprite:
        if part not in self._sprites:
            rng = np.random.default_rng([self.seed, 7, part])
            defect = self.defect_of(part)
            image, mask, alpha, shadow = render_part_layers(rng, self.sprite_size, defect)
            self._sprites[part] = _Sprite(
                image.astype(np.float32), alpha[..., None], shadow[..., None].astype(np.float32), mask, defect
            )
            self._sprites.pop(part - 3, None)  # parts that have left the frame
        return self._sprites[part]

    def _centre(self, part: int, index: int) -> float:
        """x of a part's centre: part 0 enters from the right edge at frame 0."""
        return (
            self.width
            + self.sprite_size / 2
            - 0.2 * self.sprite_size
            + part * self.pitch
            - index * self.speed
        )

    def frame(self, index: int) -> BeltFrame:
        rng = np.random.default_rng([self.seed, 13, index])
        canvas = self.belt.copy()
        half = self.sprite_size / 2
        first = max(0, int(np.floor((index * self.speed - self.width - self.sprite_size) / self.pitch)))
        parts, defects, label = [], [], "good"
        part = first
        while (x := self._centre(part, index)) - half < self.width:
            if x + half > 0:
                sprite = self._sprite(part)
                left = int(round(x - half))
                a, b = max(0, left), min(self.width, left + self.sprite_size)
                crop = slice(a - left, b - left)
                region = canvas[:, a:b]
                alpha = sprite.alpha[:, crop]
                region[:] = region * sprite.shadow[:, crop] * (1 - alpha) + sprite.image[:, crop] * alpha
                parts.append(part)
                if sprite.defect is not None:
                    defects.append(sprite.defect)
                    total, seen = sprite.mask.sum(), sprite.mask[:, crop].sum()
                    if seen == total:
                        label = "defective"
                    elif seen > 0 and label == "good":
                        label = "partial"
            part += 1
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * 1.5
        image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        return BeltFrame(index, image, label, parts, defects)

    def frames(self, count: int) -> Iterator[BeltFrame]:
        for index in range(count):
            yield self.frame(index)


def write_belt_video(
    path: str | Path,
    seconds: float = 20.0,
    fps: float = 15.0,
    width: int = 640,
    height: int = 480,
    speed: float | None = None,
    seed: int = 0,
    good_only: bool = False,
) -> tuple[Path, Path]:
    """Write the belt video (mp4) and its per-frame truth CSV; returns (video path, truth path).

    ``speed`` defaults to about one part per 2.2 s whatever the frame rate, so a defective part stays
    fully in view for a few frames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = int(round(seconds * fps))
    if count < 1:
        raise EdgeadError(f"a video of {seconds} s at {fps} fps has no frames")
    speed = speed if speed is not None else 0.92 * height * 0.68 * 1.35 / (2.2 * fps)
    scene = BeltScene(width, height, speed=speed, seed=seed, good_only=good_only)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise EdgeadError(f"OpenCV cannot write {path} (mp4v)")
    truth = path.with_suffix(".truth.csv")
    with open(truth, "w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(["index", "label", "parts", "defects"])
        for frame in scene.frames(count):
            writer.write(cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
            table.writerow(
                [frame.index, frame.label, " ".join(map(str, frame.parts)), " ".join(frame.defects)]
            )
    writer.release()
    return path, truth


def read_truth(path: str | Path) -> list[str]:
    """The per-frame labels of a truth CSV written by :func:`write_belt_video`."""
    with open(path, newline="") as handle:
        return [row["label"] for row in csv.DictReader(handle)]
