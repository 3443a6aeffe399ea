"""`edgead fit`: learn a detector from the normal images of a dataset and save a run folder.

The decision threshold is a quantile of the scores of normal validation images carved from
train/good (seeded). The test set is never looked at here.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.data.datasets import AnomalyDataset, open_dataset, split_validation
from edgead.inference import extract_features, predict_samples
from edgead.metrics import threshold_from_normal
from edgead.models import Pipeline, create_pipeline
from edgead.models.base import TrainableHead
from edgead.runs import RunConfig, save_run


def calibrate(validation_scores: np.ndarray, quantile: float) -> dict[str, float]:
    """Threshold from normal scores; normalisation maps min -> 0 and threshold -> 0.5."""
    threshold = threshold_from_normal(validation_scores, quantile=quantile)
    score_min = float(np.min(validation_scores))
    score_max = threshold + max(threshold - score_min, 1e-6)
    return {"threshold": threshold, "score_min": score_min, "score_max": score_max}


def fit_run(
    dataset: str | Path | AnomalyDataset,
    run_dir: str | Path,
    model: str = "patchcore",
    backbone: str = "efficientnet_lite0",
    image_size: int = 256,
    layers: tuple[int, ...] | None = None,
    weights_path: str | None = None,
    pretrained: bool = True,
    validation_fraction: float = 0.1,
    threshold_quantile: float = 0.99,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    hyperparameters: dict[str, Any] | None = None,
    pipeline: Pipeline | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Pipeline, RunConfig]:
    """Fit ``model`` on ``dataset``'s train/good images and save it to ``run_dir``.

    ``pipeline`` fits a prebuilt pipeline instead (e.g. a channel-pruned one from
    :mod:`edgead.deploy.prune`): its head is fitted (a trained head continues from its current weights),
    its backbone kept, and ``model``, ``backbone``, ``image_size``, ``layers`` and ``hyperparameters``
    are taken from it. ``extra`` entries are added to the run config's ``extra``.
    """
    torch.manual_seed(seed)
    data = dataset if isinstance(dataset, AnomalyDataset) else open_dataset(dataset)
    train, validation = split_validation(data.train, fraction=validation_fraction, seed=seed)
    if pipeline is None:
        pipeline = create_pipeline(
            model,
            backbone=backbone,
            image_size=image_size,
            layers=layers,
            pretrained=pretrained,
            weights_path=weights_path,
            **dict(hyperparameters or {}),
        )
    else:
        model, backbone, image_size = pipeline.head.name, pipeline.backbone.name, pipeline.image_size
    start = time.perf_counter()
    if isinstance(pipeline.head, TrainableHead):
        pipeline.head.fit_samples(pipeline, train, progress=progress, validation=validation)
    else:
        features = extract_features(
            pipeline, train, batch_size=batch_size, progress=progress, desc="fit features"
        )
        pipeline.head.fit(features, progress=progress)
        del features
    fit_seconds = time.perf_counter() - start
    validation_scores = predict_samples(
        pipeline, validation, batch_size=batch_size, progress=progress, desc="validation"
    ).scores
    calibration = calibrate(validation_scores, threshold_quantile)
    config = RunConfig(
        model=model,
        head=pipeline.head.hyperparameters(),
        backbone=backbone,
        layers=list(pipeline.backbone.layers),
        image_size=image_size,
        blur_sigma=pipeline.postprocess.sigma,
        threshold_quantile=threshold_quantile,
        extra={
            "dataset": str(Path(data.root).resolve()),
            "dataset_name": data.name,
            "n_train": len(train),
            "n_validation": len(validation),
            "validation_fraction": validation_fraction,
            "seed": seed,
            "fit_seconds": round(fit_seconds, 2),
            **(
                {"selected_epoch": pipeline.head.selected_epoch_}
                if hasattr(pipeline.head, "selected_epoch_")
                else {}
            ),
            "pretrained": pretrained,
            "weights_path": weights_path,
            "created": dt.datetime.now().isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(),
            **(extra or {}),
        },
        **calibration,
    )
    save_run(pipeline, config, run_dir)
    return pipeline, config
