"""Batch loops that run a pipeline over samples: feature extraction for fitting, scoring for testing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from edgead.data.datasets import Sample, make_loader
from edgead.models import Pipeline
from edgead.progress import progress as progress_bar


class Predictor(Protocol):
    """What the scoring loops need: a torch Pipeline or a runtime's inferencer (ONNX Runtime, OpenVINO)."""

    image_size: int

    def eval(self) -> Any: ...

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def iter_features(
    pipeline: Pipeline,
    samples: Sequence[Sample],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "features",
) -> Iterator[torch.Tensor]:
    """Backbone features of the samples, one batch [B, C, h, w] at a time (memory stays bounded)."""
    pipeline.eval()
    loader = make_loader(list(samples), pipeline.image_size, batch_size=batch_size)
    for batch in progress_bar(loader, desc, progress):
        with torch.no_grad():
            features = pipeline.features(batch["image"])
        yield features


def extract_features(
    pipeline: Pipeline,
    samples: Sequence[Sample],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Backbone features of every sample, concatenated: [N, C, h, w]."""
    return torch.cat(list(iter_features(pipeline, samples, batch_size, progress, desc)))


@dataclass
class Predictions:
    """Scores and maps for a list of samples, with the ground truth the loader found."""

    samples: list[Sample]
    scores: np.ndarray  # [N]
    maps: np.ndarray  # [N, S, S] float32
    labels: np.ndarray  # [N] int
    masks: np.ndarray  # [N, S, S] bool (all False where no mask)
    has_masks: np.ndarray  # [N] bool


@torch.no_grad()
def predict_samples(
    pipeline: Predictor,
    samples: Sequence[Sample],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "test",
) -> Predictions:
    pipeline.eval()
    samples = list(samples)
    loader = make_loader(samples, pipeline.image_size, batch_size=batch_size)
    scores, maps, labels, masks, has_masks = [], [], [], [], []
    for batch in progress_bar(loader, desc, progress):
        batch_maps, batch_scores = pipeline.predict(batch["image"])
        scores.append(batch_scores.numpy())
        maps.append(batch_maps[:, 0].numpy().astype(np.float32))
        labels.append(np.asarray(batch["label"]))
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
        has_masks.append(np.asarray(batch["has_mask"], dtype=bool))
    return Predictions(
        samples=samples,
        scores=np.concatenate(scores),
        maps=np.concatenate(maps),
        labels=np.concatenate(labels).astype(int),
        masks=np.concatenate(masks),
        has_masks=np.concatenate(has_masks),
    )


@torch.no_grad()
def score_features(pipeline: Pipeline, features: torch.Tensor, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps [N, S, S] and image scores [N] of precomputed features (head + postprocess only)."""
    maps, scores = [], []
    for part in features.split(batch_size):
        batch_maps, batch_scores = pipeline.score_features(part)
        maps.append(batch_maps[:, 0].numpy())
        scores.append(batch_scores.numpy())
    return np.concatenate(maps), np.concatenate(scores)

