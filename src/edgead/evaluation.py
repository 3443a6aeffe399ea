"""`edgead test`: score a run on a dataset's test split and write the report files.

Output folder: metrics.json, scores.csv, roc.png (image level), pixel_roc.png (when masks exist)
and a few heat-map examples under examples/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgead.data.datasets import open_dataset
from edgead.data.images import load_rgb, resize_image
from edgead.errors import DatasetError
from edgead.inference import Predictions, predict_samples
from edgead.metrics import evaluate, normalize_scores
from edgead.models import Pipeline
from edgead.reporting import (
    save_heatmap_examples,
    save_pixel_roc_plot,
    save_roc_plot,
    write_metrics_json,
    write_scores_csv,
)
from edgead.runs import RunConfig, load_run


def score_predictions(predictions: Predictions, config: RunConfig) -> dict[str, Any]:
    """Metrics of a set of predictions; pixel metrics only when every anomalous image has a mask."""
    anomalous = predictions.labels == 1
    with_masks = bool(anomalous.any() and predictions.has_masks[anomalous].all())
    return evaluate(
        predictions.labels,
        predictions.scores,
        masks=predictions.masks if with_masks else None,
        maps=predictions.maps if with_masks else None,
        threshold=config.threshold,
    )


def write_report(predictions: Predictions, config: RunConfig, metrics: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_json(out_dir / "metrics.json", metrics)
    normalized = normalize_scores(predictions.scores, config.threshold, config.score_min, config.score_max)
    rows = [
        {
            "path": str(sample.path),
            "label": int(label),
            "defect_type": sample.defect_type,
            "score": float(score),
            "normalized_score": float(norm),
            "decision": "anomalous" if score >= config.threshold else "normal",
        }
        for sample, label, score, norm in zip(
            predictions.samples, predictions.labels, predictions.scores, normalized, strict=True
        )
    ]
    write_scores_csv(out_dir / "scores.csv", rows)
    title = f"{config.model} / {config.extra.get('dataset_name', '')}"
    if len(set(predictions.labels.tolist())) == 2:
        save_roc_plot(out_dir / "roc.png", predictions.labels, predictions.scores, title=title)
    if metrics.get("pixel_auroc") is not None:
        save_pixel_roc_plot(out_dir / "pixel_roc.png", predictions.masks, predictions.maps, title=title)
    images = np.stack([resize_image(load_rgb(s.path), config.image_size) for s in predictions.samples])
    save_heatmap_examples(
        out_dir / "examples",
        images,
        predictions.maps,
        predictions.masks,
        predictions.scores,
        predictions.labels,
        config.threshold,
    )


def evaluate_run(
    run_dir: str | Path,
    dataset: str | Path | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    pipeline: Pipeline | None = None,
    config: RunConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a run on the test split of ``dataset`` (default: the dataset it was fitted on)."""
    if pipeline is None or config is None:
        pipeline, config = load_run(run_dir)
    dataset = dataset or config.extra.get("dataset")
    if dataset is None:
        raise DatasetError("no dataset given and the run does not record one: pass --dataset PATH")
    data = open_dataset(dataset)
    if not data.test:
        raise DatasetError(f"{data.root} has no test images: nothing to evaluate")
    predictions = predict_samples(pipeline, data.test, batch_size=batch_size, progress=progress)
    metrics = score_predictions(predictions, config)
    metrics.update(
        {
            "model": config.model,
            "backbone": config.backbone,
            "dataset": data.name,
            "image_size": config.image_size,
            "threshold": config.threshold,
        }
    )
    write_report(predictions, config, metrics, Path(out_dir) if out_dir else Path(run_dir) / "test")
    return metrics
