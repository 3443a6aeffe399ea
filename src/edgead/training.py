"""`edgead fit`: learn a detector from the normal images of a dataset and save a run folder.

The decision threshold is a quantile of the scores of normal validation images carved from
train/good (seeded). The test set is never looked at here.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from edgead.data.datasets import AnomalyDataset, load_normal_images, open_dataset, split_validation
from edgead.errors import DatasetError, NonFiniteError, UsageError
from edgead.inference import iter_features, predict_samples
from edgead.metrics import threshold_from_normal
from edgead.models import Pipeline, create_head, create_pipeline
from edgead.models.base import TrainableHead
from edgead.outputs import check_output_dir, check_outside
from edgead.runs import CONFIG_FILE, BackboneName, ImageSize, ModelName, RunConfig, StageIndex, save_run
from edgead.validation import MEMORY_LIMIT_GIB, BatchSize, OpenRatio, Ratio, Seed, describe


class FitSettings(BaseModel):
    """The options of a fit, with their types and ranges, checked before any image is read."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: ModelName
    backbone: BackboneName
    image_size: ImageSize
    layers: tuple[StageIndex, ...] | None
    validation_fraction: OpenRatio
    threshold_quantile: Ratio
    seed: Seed
    batch_size: BatchSize
    aggregation_border: Literal["zeros", "valid"] | None

    @field_validator("batch_size")
    @classmethod
    def _batch_fits(cls, batch_size: int, info: ValidationInfo) -> int:
        """Every shipped backbone's widest early layer holds at least 16 floats per input pixel (64
        channels at half the side): a batch beyond the memory limit fails here, not in the allocator."""
        image_size = info.data.get("image_size")
        if image_size is not None and 4 * 16 * batch_size * image_size**2 > MEMORY_LIMIT_GIB * 2**30:
            most = MEMORY_LIMIT_GIB * 2**30 // (4 * 16 * image_size**2)
            raise ValueError(
                f"{batch_size} images of {image_size} px would need more than the {MEMORY_LIMIT_GIB} GiB memory "
                f"limit in the backbone alone; use a batch_size of at most {most} at this image_size"
            )
        return batch_size

    @classmethod
    def check(cls, **values: Any) -> FitSettings:
        try:
            return cls(**values)
        except ValidationError as exc:
            raise UsageError(f"invalid fit option: {describe(exc)}") from None


def calibrate(validation_scores: np.ndarray, quantile: float) -> dict[str, float]:
    """Threshold from normal scores; normalisation maps min -> 0 and threshold -> 0.5.

    Non-finite scores fail closed: a model that gives NaN or infinity on normal images is broken.
    """
    validation_scores = np.asarray(validation_scores, dtype=np.float64)
    if not np.isfinite(validation_scores).all():
        bad = int((~np.isfinite(validation_scores)).sum())
        raise NonFiniteError(
            f"the fitted model gives NaN or infinite scores on {bad} of {len(validation_scores)} normal "
            "validation images: not saved (a diverged fit, broken weights, or degenerate images)"
        )
    threshold = threshold_from_normal(validation_scores, quantile=quantile)
    score_min = float(np.min(validation_scores))
    score_max = threshold + max(threshold - score_min, 1e-6 * max(1.0, abs(threshold)))
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
    aggregation_border: str | None = None,
    force: bool = False,
    pq_codebook: bool = False,
    validation_dataset: str | Path | AnomalyDataset | None = None,
) -> tuple[Pipeline, RunConfig]:
    """Fit ``model`` on ``dataset``'s train/good images and save it to ``run_dir``.

    ``pipeline`` fits a prebuilt pipeline instead (e.g. a channel-pruned one from
    :mod:`edgead.deploy.prune`): its head is fitted (a trained head continues from its current weights),
    its backbone kept, and ``model``, ``backbone``, ``image_size``, ``layers`` and ``hyperparameters``
    are taken from it. ``extra`` entries are added to the run config's ``extra``. An existing run in
    ``run_dir`` is replaced only with ``force``; options and the output folder are checked first.
    ``pq_codebook`` also trains the product-quantization codebook that the split deployment's ``pq``
    codecs need (:func:`edgead.edge.pq.train_codebook`) and saves it in the run folder.
    ``validation_dataset`` gives the threshold its own normal images (train/good, good/ or the folder) and fits on
    every training image: needed when the training images are near-duplicates of each other (consecutive
    video frames), where a held-out fraction is as close to the memory as the training frames themselves.
    """
    if pipeline is None:
        FitSettings.check(
            model=model,
            backbone=backbone,
            image_size=image_size,
            layers=tuple(layers) if layers is not None else None,
            validation_fraction=validation_fraction,
            threshold_quantile=threshold_quantile,
            seed=seed,
            batch_size=batch_size,
            aggregation_border=aggregation_border,
        )
        # bad hyperparameters, and sizes that do not fit the image size, fail before any work
        create_head(model, **dict(hyperparameters or {})).check_sizes(image_size)
    data = dataset if isinstance(dataset, AnomalyDataset) else open_dataset(dataset)
    if validation_dataset is None:
        train, validation = split_validation(data.train, fraction=validation_fraction, seed=seed)
    else:
        held_out = validation_dataset
        train = data.train
        try:
            validation = held_out.train if isinstance(held_out, AnomalyDataset) else load_normal_images(held_out)
        except DatasetError as exc:
            raise DatasetError(f"--validation: {exc}") from exc
    run_dir = check_output_dir(run_dir, CONFIG_FILE, force=force, kind="run")
    check_outside(run_dir, data.root, "--out", "the dataset")  # its test/ report would hold images
    torch.manual_seed(seed)
    if pipeline is None:
        pipeline = create_pipeline(
            model,
            backbone=backbone,
            image_size=image_size,
            layers=layers,
            pretrained=pretrained,
            weights_path=weights_path,
            aggregation_border=aggregation_border,
            **dict(hyperparameters or {}),
        )
    else:
        model, backbone, image_size = pipeline.head.name, pipeline.backbone.name, pipeline.image_size
    start = time.perf_counter()
    if isinstance(pipeline.head, TrainableHead):
        pipeline.head.fit_samples(pipeline, train, progress=progress, validation=validation)
    else:
        # Streamed in a seeded random order: bounded memory, and PatchCore's coreset chunks are random
        # samples of the training images.
        order = np.random.default_rng(seed).permutation(len(train))
        batches = iter_features(
            pipeline, [train[i] for i in order], batch_size=batch_size, progress=progress, desc="fit"
        )
        pipeline.head.fit_stream(batches, len(train), progress=progress)
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
        aggregation_border=pipeline.backbone.aggregation_border,
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
    save_run(pipeline, config, run_dir, force=force)
    if pq_codebook:
        from edgead.edge.pq import train_codebook

        train_codebook(run_dir, pipeline=pipeline, samples=train, seed=seed, batch_size=batch_size, progress=progress)
    return pipeline, config
