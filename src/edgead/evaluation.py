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
from edgead.inference import Predictions, Predictor, predict_samples
from edgead.metrics import evaluate, normalize_scores
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
    pipeline: Predictor | None = None,
    config: RunConfig | None = None,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder or an exported model on the test split of ``dataset``.

    ``dataset`` defaults to the one the model was fitted on. An INT8 file whose fp32 run folder is still
    on disk is compared with it: the metrics then hold the fp32 AUROC and the change.
    """
    from edgead.deploy.runtimes import load_inferencer

    run_dir = Path(run_dir)
    if pipeline is None or config is None:
        inferencer = load_inferencer(run_dir, runtime)
        pipeline, config = inferencer, inferencer.config
        runtime = inferencer.runtime
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
            "runtime": runtime or "torch",
        }
    )
    quantization = getattr(pipeline, "metadata", {}).get("quantization")
    source = getattr(pipeline, "metadata", {}).get("source_run")
    if quantization:
        metrics["quantization"] = quantization
        if source and Path(source, "config.json").is_file():
            reference = predict_samples(
                load_run(source)[0], data.test, batch_size, progress, "fp32 reference"
            )
            fp32 = score_predictions(reference, config)
            for key in ("image_auroc", "pixel_auroc"):
                if metrics.get(key) is not None and fp32.get(key) is not None:
                    metrics[f"fp32_{key}"] = fp32[key]
                    metrics[f"{key}_change"] = metrics[key] - fp32[key]
    if out_dir is None:
        out_dir = run_dir / "test" if run_dir.is_dir() else run_dir.parent / f"test_{run_dir.stem}_{runtime}"
    metrics["report_dir"] = str(out_dir)
    write_report(predictions, config, metrics, Path(out_dir))
    return metrics
