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
from edgead.errors import DatasetError, EdgeadError, NonFiniteError
from edgead.inference import Predictions, Predictor, predict_samples
from edgead.metrics import evaluate, normalize_scores
from edgead.outputs import atomic_dir, check_output_dir, check_outside
from edgead.reporting import (
    save_heatmap_examples,
    save_pixel_roc_plot,
    save_roc_plot,
    write_metrics_json,
    write_scores_csv,
)
from edgead.runs import RunConfig, load_run, read_config

REPORT_MARKER = "metrics.json"


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
    """Write the report files into a temporary sibling, then put it in place of ``out_dir`` at once."""
    with atomic_dir(out_dir) as staging:
        _write_report_files(predictions, config, metrics, staging)


def _write_report_files(
    predictions: Predictions, config: RunConfig, metrics: dict[str, Any], out_dir: Path
) -> None:
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
    from edgead.deploy.runtimes import default_runtime, load_inferencer

    run_dir = Path(run_dir)
    if out_dir is None:
        engine = runtime or ("torch" if pipeline is not None else default_runtime(run_dir))
        out_dir = run_dir / "test" if run_dir.is_dir() else run_dir.parent / f"test_{run_dir.stem}_{engine}"
    out_dir = check_output_dir(out_dir, REPORT_MARKER, kind="test report")
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
    check_outside(out_dir, data.root, "--out", "the dataset")
    predictions = predict_samples(pipeline, data.test, batch_size=batch_size, progress=progress)
    check_finite_scores(predictions.scores, predictions.maps, f"{config.model} on {data.name}")
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
    metadata = getattr(pipeline, "metadata", {})
    if metadata.get("quantization"):
        metrics["quantization"] = metadata["quantization"]
        metrics.update(compare_with_source_run(metadata, data, config, batch_size, progress))
        for key in ("image_auroc", "pixel_auroc"):
            if metrics.get(key) is not None and metrics.get(f"fp32_{key}") is not None:
                metrics[f"{key}_change"] = metrics[key] - metrics[f"fp32_{key}"]
    metrics["report_dir"] = str(out_dir)
    write_report(predictions, config, metrics, out_dir)
    return metrics


def check_finite_scores(scores: np.ndarray, maps: np.ndarray | None, what: str) -> None:
    """Fail closed: NaN or infinite scores mean a broken model, never a normal verdict."""
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float64))
    if bad.any() or (maps is not None and not np.isfinite(maps).all()):
        raise NonFiniteError(
            f"{what}: the model gives NaN or infinite scores ({int(bad.sum())} of {len(bad)} images): its "
            "weights or exported file are broken; refit or re-export it"
        )


def compare_with_source_run(
    metadata: dict[str, str], data, config: RunConfig, batch_size: int, progress: bool
) -> dict[str, Any]:
    """fp32 AUROC of the run an INT8 file was exported from, and the change; {} where that run is gone.

    The file records its run's identity (:meth:`RunConfig.identity`: weights' hash, threshold, settings): a
    run folder refitted or changed since the export, or another run the metadata names, is another model;
    comparing with it would be meaningless, so it is refused with a note.
    """
    source = metadata.get("source_run")
    if not source or not Path(source, "config.json").is_file():
        return {}
    try:
        recorded = read_config(source).identity()
    except EdgeadError as exc:
        return {"fp32_comparison_refused": f"the run {source} cannot be read ({exc})"}
    if recorded != metadata.get("source_run_sha256"):
        return {
            "fp32_comparison_refused": f"the run {source} is not the one this file was exported from "
            "(refitted or changed since the export?): re-export it to compare"
        }
    reference = predict_samples(load_run(source)[0], data.test, batch_size, progress, "fp32 reference")
    fp32 = score_predictions(reference, config)
    return {f"fp32_{key}": fp32[key] for key in ("image_auroc", "pixel_auroc") if fp32.get(key) is not None}
