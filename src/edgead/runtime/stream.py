"""The live loop behind `edgead predict`: read, blur, score, annotate and write every frame.

Three stages run at once, so that decoding and encoding do not stall inference:

    reader thread : decode -> privacy blur -> resize to the model's input
    main thread   : inference (torch, ONNX Runtime or OpenVINO, fp32 or INT8)
    writer thread : heat-map overlay -> video / PNG encode

The privacy filter runs first, in the reader, and the blurred copy replaces the decoded frame: nothing
downstream (model, overlay, video, PNG) ever sees the original pixels of a blurred region.
A frame that cannot be read or scored is recorded in the CSV and skipped; the loop goes on.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from edgead.data.images import resize_image
from edgead.deploy.runtimes import Inferencer, load_inferencer
from edgead.errors import EdgeadError, NonFiniteError, UsageError
from edgead.metrics import normalize_scores
from edgead.outputs import check_output_dir, check_outside, write_records_csv
from edgead.progress import progress as progress_bar
from edgead.runtime.annotate import annotate_frame
from edgead.runtime.cvpaths import WritablePath, write_image
from edgead.runtime.privacy import PrivacyError, PrivacyFilter
from edgead.runtime.sources import CaptureSource, Frame, FrameSource, open_source, prefetch

VIDEO_CODECS = {"mp4": "mp4v", "webm": "VP80", "avi": "MJPG"}
PREDICTIONS_CSV = "predictions.csv"
OUTPUTS = ("auto", "video", "png", "none")


@dataclass
class FrameResult:
    index: int
    name: str
    score: float | None = None
    normalized_score: float | None = None
    decision: str | None = None
    blurred_pixels: int = 0
    inference_ms: float | None = None
    output: Path | None = None  # the PNG written for this frame, if any
    error: str | None = None
    note: str | None = None


class ResultCounts:
    """How many of ``results`` (per-frame records with an ``error``) were scored and how many failed."""

    results: list

    @property
    def scored(self) -> int:
        return sum(r.error is None for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.scored


@dataclass
class StreamSummary(ResultCounts):
    source: str
    kind: str
    runtime: str
    seconds: float  # wall clock from opening the source to the last frame written
    results: list[FrameResult]
    csv: Path
    video: Path | None = None
    png_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def anomalous(self) -> int:
        return sum(r.decision == "anomalous" for r in self.results)

    @property
    def fps(self) -> float:
        """End-to-end frames per second: decode + blur + preprocess + inference + overlay + encode."""
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        latencies = [r.inference_ms for r in self.results if r.inference_ms is not None]
        return {
            "source": self.source,
            "kind": self.kind,
            "runtime": self.runtime,
            "frames": len(self.results),
            "scored": self.scored,
            "failed": self.failed,
            "anomalous": self.anomalous,
            "seconds": round(self.seconds, 3),
            "fps": round(self.fps, 2),
            "inference_ms_p50": round(float(np.median(latencies)), 3) if latencies else None,
            "video": str(self.video) if self.video else None,
            "csv": str(self.csv),
            "warnings": self.warnings,
        }


@dataclass
class _Prepared:
    frame: Frame
    blurred_pixels: int = 0
    model_input: np.ndarray | None = None  # S x S x 3 uint8


@dataclass
class _Scored:
    frame: Frame
    result: FrameResult
    anomaly_map: np.ndarray | None
    fps: float | None


def _prepare(frames: Iterable[Frame], privacy: PrivacyFilter, size: int) -> Iterator[_Prepared]:
    for frame in frames:
        item = _Prepared(frame)
        if frame.image is not None:
            try:
                # Replace, never keep: from here on only the blurred frame exists.
                frame.image, item.blurred_pixels = privacy.apply(frame.image)
                item.model_input = resize_image(frame.image, size)
            except PrivacyError:  # regions that miss the frame end the run: never a frame believed blurred
                raise
            except Exception as exc:  # one bad frame must not end the loop  # noqa: BLE001
                frame.image, frame.error = None, f"cannot prepare frame: {exc}"
        yield item


class _Writer:
    """The output stage, in its own thread: overlays, the annotated video and/or PNGs."""

    def __init__(
        self, out_dir: Path, output: str, video_format: str, fps: float, threshold: float, vmax: float
    ) -> None:
        self.out_dir, self.output, self.fps, self.threshold, self.vmax = out_dir, output, fps, threshold, vmax
        self.video_path = out_dir / f"annotated.{video_format}" if output == "video" else None
        self.png_dir = out_dir / "frames" if output == "png" else None
        self.codec = VIDEO_CODECS[video_format]
        self.video: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # (width, height) of the video
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=16)
        self.thread = threading.Thread(target=self._work, name="edgead-writer", daemon=True)
        if self.png_dir is not None:
            self.png_dir.mkdir(parents=True, exist_ok=True)
        self.thread.start()

    def submit(self, item: _Scored) -> None:
        if self.error is not None:
            raise EdgeadError(f"writing the output failed: {self.error}") from self.error
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.video is not None:
            self.video.release()
            self.video_target.finish()
        if self.error is not None:
            raise EdgeadError(f"writing the output failed: {self.error}") from self.error

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(item)
                except Exception as exc:  # reported by submit/close in the main thread  # noqa: BLE001
                    self.error = exc

    def _open_video(self, width: int, height: int) -> None:
        self.size = (width, height)
        self.video_path.parent.mkdir(parents=True, exist_ok=True)
        fourcc = cv2.VideoWriter_fourcc(*self.codec)
        self.video_target = WritablePath(self.video_path)
        self.video = cv2.VideoWriter(self.video_target.opencv_path, fourcc, self.fps, self.size)
        if not self.video.isOpened():
            raise EdgeadError(
                f"OpenCV cannot write {self.video_path} with codec {self.codec}; try --video-format avi"
            )

    def _write(self, item: _Scored) -> None:
        frame, result = item.frame, item.result
        if frame.image is None or self.output == "none":
            return
        image = frame.image
        if self.output == "video":
            h, w = image.shape[:2]
            if self.video is None:
                self._open_video(w, h)
            elif (w, h) != self.size:
                result.note = f"frame is {w}x{h}, not {self.size[0]}x{self.size[1]} like the first: resized for the video"
                image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        annotated = annotate_frame(
            image,
            item.anomaly_map,
            self.threshold,
            self.vmax,
            result.decision,
            result.normalized_score,
            item.fps,
        )
        if self.video is not None:
            self.video.write(cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))
        elif self.png_dir is not None:
            stem = Path(frame.name).stem.replace(" ", "_")
            result.output = self.png_dir / f"{frame.index:04d}_{stem}.png"
            write_image(result.output, cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))


def write_frames_csv(path: Path, results: list[FrameResult]) -> Path:
    """One row per frame, the columns of :class:`FrameResult`; written atomically, names made printable."""
    return write_records_csv(path, FrameResult, results, text_fields=("name", "output"), ms_fields=("inference_ms",))


def _score(model: Inferencer, model_input: np.ndarray) -> tuple[np.ndarray, float]:
    tensor = torch.from_numpy(model_input).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    maps, scores = model.predict(tensor)
    return maps[0, 0].numpy(), float(scores[0])


def run_stream(
    model: str | Path | Inferencer,
    sources: Iterable[str | Path] | FrameSource,
    out_dir: str | Path,
    runtime: str | None = None,
    blur: str | None = None,
    blur_regions: str | Path | None = None,
    output: str = "auto",
    video_format: str = "mp4",
    max_frames: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    on_result: Callable[[FrameResult], None] | None = None,
) -> StreamSummary:
    """Score every frame of ``sources`` with ``model`` and write the annotated output and a CSV.

    ``threads``: inference threads of ONNX Runtime / OpenVINO (default: torch's thread count). On a
    2-core machine 1 leaves a core to the decoder and encoder threads.
    """
    if output not in OUTPUTS:
        raise UsageError(f"--output {output!r}: choose one of {', '.join(OUTPUTS)}")
    if video_format not in VIDEO_CODECS:
        raise UsageError(f"--video-format {video_format!r}: choose one of {', '.join(VIDEO_CODECS)}")
    if max_frames is not None and max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1, got {max_frames}")
    if threads is not None and not 1 <= threads <= 256:
        raise UsageError(f"--threads must be between 1 and 256, got {threads}")
    privacy = PrivacyFilter(blur, blur_regions)  # bad options fail before anything is opened
    out_dir = check_output_dir(out_dir, PREDICTIONS_CSV, kind="predictions")
    if not isinstance(sources, FrameSource):
        sources = [sources] if isinstance(sources, str | Path) else list(sources)
        for folder in (Path(s) for s in sources if Path(s).is_dir()):
            check_outside(out_dir, folder, "--out", "the input folder")
    model = model if isinstance(model, Inferencer) else load_inferencer(model, runtime, threads)
    config = model.config
    source = sources if isinstance(sources, FrameSource) else open_source(sources, max_frames)
    if output == "auto":
        output = "png" if source.kind == "images" else "video"
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    writer = _Writer(out_dir, output, video_format, source.fps or 30.0, config.threshold, config.score_max)
    results: list[FrameResult] = []
    warnings: list[str] = []
    recent: deque[float] = deque(maxlen=30)
    # A camera keeps producing while we score: a short queue keeps the shown frame close to live.
    prepared = prefetch(
        _prepare(source, privacy, config.image_size), depth=2 if source.kind == "camera" else 8
    )
    try:
        for item in progress_bar(prepared, "predict", progress, total=source.expected_frames):
            frame = item.frame
            result = FrameResult(
                frame.index, frame.name, blurred_pixels=item.blurred_pixels, error=frame.error
            )
            anomaly_map = None
            if item.model_input is not None:
                try:
                    tick = time.perf_counter()
                    anomaly_map, result.score = _score(model, item.model_input)
                    result.inference_ms = (time.perf_counter() - tick) * 1000
                    if not (math.isfinite(result.score) and np.isfinite(anomaly_map).all()):
                        raise NonFiniteError("the model gave a NaN or infinite score: it is broken")
                    result.normalized_score = float(
                        normalize_scores(
                            np.array([result.score]), config.threshold, config.score_min, config.score_max
                        )[0]
                    )
                    result.decision = "anomalous" if result.score >= config.threshold else "normal"
                except Exception as exc:  # noqa: BLE001 - one frame's failure is recorded, the loop goes on
                    result.error, frame.image = f"inference failed: {exc}", None
                    result.score = result.normalized_score = result.decision = None  # failed, never "normal"
                    anomaly_map = None
            recent.append(time.perf_counter())
            fps = (
                (len(recent) - 1) / (recent[-1] - recent[0])
                if len(recent) > 1 and recent[-1] > recent[0]
                else None
            )
            results.append(result)
            writer.submit(_Scored(frame, result, anomaly_map, fps))
            if on_result is not None:
                on_result(result)
    except KeyboardInterrupt:
        warnings.append(f"stopped by the user after {len(results)} frames")
    finally:
        prepared.close()  # stops the reader thread before the source is released
        source.close()
        writer.close()
    seconds = time.perf_counter() - start
    if isinstance(source, CaptureSource) and source.ended_early:
        warnings.append(source.ended_early)
    if not results:
        warnings.append("the source gave no frames")
    csv_path = write_frames_csv(out_dir / PREDICTIONS_CSV, results)
    return StreamSummary(
        source=", ".join(map(str, sources))
        if not isinstance(sources, FrameSource)
        else type(sources).__name__,
        kind=source.kind,
        runtime=getattr(model, "runtime", "torch"),
        seconds=seconds,
        results=results,
        csv=csv_path,
        video=writer.video_path if writer.video is not None else None,
        png_dir=writer.png_dir,
        warnings=warnings,
    )
