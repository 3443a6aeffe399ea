"""Where frames come from: an image, a folder of images, a video file or a camera.

Every source yields :class:`Frame` objects with an RGB uint8 image, or with an ``error`` that says why
that one frame could not be read. A bad frame is reported and skipped by the loop; it never ends it.
Problems with the source as a whole (a missing camera, a file that is not a video) raise
:class:`SourceError` before the first frame.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from edgead.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, list_images, load_rgb
from edgead.errors import EdgeadError
from edgead.runtime.cvpaths import readable_by_opencv, write_image

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

# A camera that returns this many failed reads in a row is treated as disconnected.
CAMERA_MAX_FAILURES = 30


class SourceError(EdgeadError):
    """A frame source (video, camera, folder) cannot be opened at all."""


@dataclass
class Frame:
    index: int  # position in the source, counting frames that failed to read
    name: str  # file name, or "frame 000123" for videos and cameras
    image: np.ndarray | None = None  # H x W x 3 RGB uint8, None when the frame failed
    error: str | None = None
    note: str | None = None  # something worth a line in the CSV (e.g. the frame was resized)


class FrameSource:
    """An iterable of frames with what the writer needs to know: kind, frame rate and expected count."""

    kind = "images"
    fps: float | None = None
    expected_frames: int | None = None

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or file; safe to call twice."""


class ImageSource(FrameSource):
    """Image files (from a file, a folder or a list); unreadable files become error frames."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.expected_frames = len(paths)

    def __iter__(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            try:
                yield Frame(index, str(path), image=load_rgb(path))
            except EdgeadError as exc:
                yield Frame(index, str(path), error=str(exc))


class CaptureSource(FrameSource):
    """A video file or a camera read through OpenCV; frames converted from BGR to RGB."""

    def __init__(
        self, capture: cv2.VideoCapture, label: str, kind: str, max_frames: int | None = None
    ) -> None:
        self.capture, self.label, self.kind, self.max_frames = capture, label, kind, max_frames
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if kind == "video" else 0
        self.expected_frames = count if count > 0 else None
        if max_frames is not None:
            self.expected_frames = min(self.expected_frames or max_frames, max_frames)
        self.ended_early: str | None = None

    def __iter__(self) -> Iterator[Frame]:
        index = failures = 0
        while self.max_frames is None or index < self.max_frames:
            ok, bgr = self.capture.read()
            if not ok or bgr is None:
                if self.kind == "camera":
                    failures += 1
                    if failures < CAMERA_MAX_FAILURES:
                        continue
                    self.ended_early = f"camera {self.label} stopped sending frames after {index} frames"
                elif self.expected_frames is not None and index < self.expected_frames:
                    self.ended_early = (
                        f"video {self.label} ended early: {index} of {self.expected_frames} frames "
                        "could be decoded (truncated or damaged file)"
                    )
                break
            failures = 0
            if bgr.ndim == 2:
                image = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
            else:
                image = cv2.cvtColor(bgr[:, :, :3], cv2.COLOR_BGR2RGB)
            yield Frame(index, f"frame {index:06d}", image=image)
            index += 1

    def close(self) -> None:
        self.capture.release()


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def open_video(path: Path, max_frames: int | None = None) -> CaptureSource:
    if not path.is_file():
        raise SourceError(f"video {path} does not exist; check the path")
    with readable_by_opencv(path) as opencv_path:  # the link may go once the file is open
        capture = cv2.VideoCapture(opencv_path)
    if not capture.isOpened():
        raise SourceError(
            f"cannot open video {path}: not a video or an unsupported codec; re-encode it as mp4"
        )
    width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    if width * height > MAX_PIXELS:
        capture.release()
        raise SourceError(f"video {path} is {width:.0f}x{height:.0f} pixels per frame, over {MAX_PIXELS:,}")
    return CaptureSource(capture, str(path), "video", max_frames)


def open_camera(index: int, max_frames: int | None = None) -> CaptureSource:
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # our message replaces OpenCV's warnings
    try:
        capture = cv2.VideoCapture(index)
    finally:
        cv2.utils.logging.setLogLevel(previous)
    if not capture.isOpened():
        capture.release()
        raise SourceError(
            f"camera {index} cannot be opened: no such device, or it is in use by another program "
            "(list cameras with `ls /dev/video*` on Linux)"
        )
    return CaptureSource(capture, str(index), "camera", max_frames)


def source_kind(sources: Iterable[str | Path]) -> str:
    """'camera' for one camera index, 'video' for one video file, else 'images'."""
    sources = [str(s) for s in sources]
    if len(sources) == 1 and sources[0].isdigit() and not Path(sources[0]).exists():
        return "camera"
    if len(sources) == 1 and is_video_file(Path(sources[0])):
        return "video"
    return "images"


def open_source(sources: Iterable[str | Path], max_frames: int | None = None) -> FrameSource:
    """One video file, one camera index (``0``, ``1``...), or any mix of image files and folders."""
    sources = [str(s) for s in sources]
    if not sources:
        raise SourceError("no input given: pass an image, a folder, a video file or a camera index")
    kind = source_kind(sources)
    if kind == "camera":
        return open_camera(int(sources[0]), max_frames)
    if kind == "video":
        return open_video(Path(sources[0]), max_frames)
    paths: list[Path] = []
    for item in map(Path, sources):
        if is_video_file(item):
            raise SourceError(f"{item}: a video must be the only input (got {len(sources)} inputs)")
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise SourceError(f"folder {item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise SourceError(f"input {item} does not exist (nor is it a camera index or a video file)")
    if max_frames is not None:
        paths = paths[:max_frames]
    return ImageSource(paths)


T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 8) -> Iterator[T]:
    """Run ``items`` in a background thread, ``depth`` ahead, so decoding overlaps inference.

    OpenCV and numpy release the GIL while they decode and convert, so the two really run in parallel.
    An exception in the producer is re-raised in the consumer; stopping early stops the producer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand one item over; False once the consumer has stopped listening."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=produce, name="edgead-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def save_frames(video: str | Path, folder: str | Path, every: int = 1, max_frames: int | None = None) -> int:
    """Decode a video of good parts into PNGs (a train/good folder), keeping every ``every``-th frame.

    Training on decoded frames means the model learns the codec's artefacts as normal, just as the
    live loop will see them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source, saved = open_video(Path(video)), 0
    try:
        for frame in source:
            if frame.index % every == 0:
                write_image(folder / f"{frame.index:05d}.png", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
                saved += 1
                if max_frames is not None and saved >= max_frames:
                    break
    finally:
        source.close()
    if saved == 0:
        raise SourceError(f"video {video} gave no frames to save")
    return saved
