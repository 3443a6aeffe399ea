"""`edgead predict`: score single images or folders, write heat-map overlays and a CSV of decisions.

A file that cannot be read is reported and skipped; the others are still scored.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgead.data.images import list_images, load_rgb, resize_image
from edgead.deploy.runtimes import load_inferencer
from edgead.errors import DatasetError, EdgeadError
from edgead.inference import Predictor
from edgead.metrics import normalize_scores
from edgead.progress import progress as progress_bar
from edgead.reporting import overlay_heatmap
from edgead.runs import RunConfig


@dataclass
class ImageResult:
    path: Path
    score: float | None = None
    normalized_score: float | None = None
    decision: str | None = None
    heatmap: Path | None = None
    error: str | None = None


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand folders into their images; every input must exist."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise DatasetError(f"folder {item} holds no images ({item} is empty or has no image files)")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise DatasetError(f"input {item} does not exist")
    if not paths:
        raise DatasetError("no input images given")
    return paths


def predict_image(
    pipeline: Predictor, config: RunConfig, image: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """Score one RGB uint8 image: (score, normalised score, anomaly map at the model's input size)."""
    resized = resize_image(image, config.image_size)
    tensor = torch.from_numpy(resized).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
    maps, scores = pipeline.predict(tensor)
    score = float(scores[0])
    normalized = float(
        normalize_scores(np.array([score]), config.threshold, config.score_min, config.score_max)[0]
    )
    return score, normalized, maps[0, 0].numpy()


def predict_paths(
    run_dir: str | Path,
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    progress: bool = True,
    runtime: str | None = None,
) -> list[ImageResult]:
    """Score images with a run folder (torch) or an exported model on ``runtime``."""
    pipeline = load_inferencer(run_dir, runtime)
    config = pipeline.config
    paths = collect_inputs(inputs)
    out_dir = Path(out_dir)
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    # The map's colour scale: normal validation scores at the bottom, the threshold at the middle.
    vmin, vmax = config.score_min, config.score_max
    results = []
    for index, path in enumerate(progress_bar(paths, "predict", progress)):
        result = ImageResult(path=path)
        try:
            image = load_rgb(path)
        except EdgeadError as exc:
            result.error = str(exc)
            results.append(result)
            continue
        result.score, result.normalized_score, amap = predict_image(pipeline, config, image)
        result.decision = "anomalous" if result.score >= config.threshold else "normal"
        overlay = overlay_heatmap(resize_image(image, config.image_size), amap, vmin, vmax)
        result.heatmap = out_dir / "heatmaps" / f"{index:04d}_{path.stem}.png"
        Image.fromarray(overlay).save(result.heatmap)
        results.append(result)
    write_results_csv(out_dir / "predictions.csv", results)
    return results


def write_results_csv(path: Path, results: list[ImageResult]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "normalized_score", "decision", "heatmap", "error"])
        for r in results:
            writer.writerow([r.path, r.score, r.normalized_score, r.decision, r.heatmap or "", r.error or ""])
