"""`edgead demo`: the whole job on a built-in synthetic production line, runnable on a fresh machine.

1. Films good parts on a conveyor belt (synthetic, made in code) and keeps the frames as training images.
2. Fits a model on those good frames; the threshold comes from held-out good frames.
3. Makes a second video in which every third part is defective, runs the live loop over it (the same
   code as `edgead predict VIDEO`) and writes the annotated video and predictions.csv.
4. Compares each frame's decision with the video's ground truth and writes REPORT.md and summary.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgead.data.synthetic_video import read_truth, write_belt_video
from edgead.errors import UsageError
from edgead.metrics import image_auroc
from edgead.models import create_head
from edgead.outputs import atomic_write_text, check_work_dir
from edgead.reporting import markdown_table
from edgead.runtime import run_stream
from edgead.runtime.sources import save_frames
from edgead.training import fit_run


def record_good_parts(folder: Path, count: int, fps: float, width: int, height: int, seed: int = 1) -> Path:
    """Film good parts (a faster belt, so few frames cover many positions) and keep the decoded frames as
    an MVTec-layout train/good folder: the model learns the codec's artefacts as normal."""
    train = folder / "train" / "good"
    for stale in train.glob("*.png"):
        stale.unlink()
    video, _ = write_belt_video(
        folder / "good_parts.mp4",
        seconds=count / fps,
        fps=fps,
        width=width,
        height=height,
        speed=23.0,
        seed=seed,
        good_only=True,
    )
    save_frames(video, train)
    return folder


def frame_agreement(
    labels: list[str], decisions: list[str | None], scores: list[float | None]
) -> dict[str, Any]:
    """How the live decisions match the truth; frames where a defect is only partly in view are left out."""
    pairs = [
        (label, d, s)
        for label, d, s in zip(labels, decisions, scores, strict=False)
        if label != "partial" and d
    ]
    good = [d for label, d, _ in pairs if label == "good"]
    bad = [d for label, d, _ in pairs if label == "defective"]
    result: dict[str, Any] = {
        "good_frames": len(good),
        "defective_frames": len(bad),
        "false_alarm_rate": sum(d == "anomalous" for d in good) / len(good) if good else None,
        "detection_rate": sum(d == "anomalous" for d in bad) / len(bad) if bad else None,
    }
    if good and bad:
        truth = np.array([label == "defective" for label, _, _ in pairs], dtype=int)
        result["frame_auroc"] = image_auroc(truth, np.array([s for _, _, s in pairs], dtype=float))
    return result


def run_demo(
    out_dir: str | Path = "demo_output",
    model: str = "patchcore",
    image_size: int = 256,
    n_train: int = 80,
    seconds: float = 20.0,
    fps: float = 15.0,
    width: int = 640,
    height: int = 480,
    progress: bool = True,
) -> dict[str, Any]:
    if not 1 <= seconds <= 3600:
        raise UsageError(f"--seconds must be between 1 and 3600, got {seconds:g}")
    out_dir = check_work_dir(out_dir, "--out")
    create_head(model)  # an unknown model fails before the videos are made
    dataset = record_good_parts(out_dir / "dataset", n_train, fps, width, height)
    # The threshold's good frames come from a second recording: frames held out of the first one sit between
    # training frames a fraction of a second apart, as close to the memory as the training frames themselves.
    validation = record_good_parts(out_dir / "validation", max(8, n_train // 2), fps, width, height, seed=2)
    run_dir = out_dir / "run"
    _, config = fit_run(
        dataset, run_dir, model=model, image_size=image_size, progress=progress, force=True,
        validation_dataset=validation,
    )
    video, truth_csv = write_belt_video(
        out_dir / "belt.mp4", seconds=seconds, fps=fps, width=width, height=height
    )
    summary = run_stream(run_dir, [video], out_dir / "live", progress=progress)
    labels = read_truth(truth_csv)
    decisions = [r.decision for r in summary.results]
    scores = [r.normalized_score for r in summary.results]
    metrics = {
        "model": model,
        "frames": len(summary.results),
        "fps": round(summary.fps, 1),
        "fit_seconds": config.extra["fit_seconds"],
        **frame_agreement(labels, decisions, scores),
    }
    result = {
        **metrics,
        "video": str(summary.video),
        "predictions": str(summary.csv),
        "truth": str(truth_csv),
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(result, indent=2))
    columns = [
        "frames",
        "good_frames",
        "defective_frames",
        "detection_rate",
        "false_alarm_rate",
        "frame_auroc",
        "fps",
    ]
    report = out_dir / "REPORT.md"
    atomic_write_text(
        report,
        "\n".join(
            [
                "# edgead demo: a synthetic inspection line",
                "",
                f"Model `{model}` ({config.backbone}, {config.image_size}x{config.image_size}) fitted in "
                f"{config.extra['fit_seconds']} s on {config.extra['n_train']} frames of good parts on the belt; "
                f"threshold {config.threshold:.4f} from {config.extra['n_validation']} frames of a second recording of "
                "good parts.",
                f"Live loop over `{video.name}` ({width}x{height}, {seconds:g} s at {fps:g} fps, every third part "
                f"defective): decode, preprocess, inference, overlay and encode at {summary.fps:.1f} FPS end to end.",
                "",
                markdown_table([metrics], columns),
                "",
                "detection_rate: share of frames showing a whole defect that were flagged; false_alarm_rate: share "
                "of frames without any defect that were flagged (frames with a half-visible defect are left out).",
                "",
                f"Files: `live/{summary.video.name}` (annotated video: red border = anomalous), "
                "`live/predictions.csv` (per-frame scores), `belt.truth.csv` (ground truth), `run/` (the model).",
                "",
            ]
        )
    )
    result["report"] = str(report)
    return result
