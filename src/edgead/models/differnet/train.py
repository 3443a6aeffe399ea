"""DifferNet's training recipe, scheduled for a CPU: cached rotated views, then maximum likelihood.

DifferNet trains its flow on freshly augmented images every epoch (random rotations, its only default
augmentation), running the frozen extractor each time. Here the extractor runs once per cached view:
``views`` versions of every training image (view 0 as is, the others rotated by a random angle within
+-``rotation`` degrees, black corners), whose pooled features are kept; the flow then trains for
``epochs`` passes over all cached vectors (batch ``batch_size``, DifferNet's 24 images x 4 transforms)
with DifferNet's Adam settings (lr 2e-4, betas 0.8/0.8, eps 1e-4, weight decay 1e-5). The loss is the
mean NLL per dimension. The last epoch's weights are kept: nothing is selected, and a NaN or infinite
loss stops the fit (nothing is saved).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgead.data.datasets import Sample
from edgead.errors import DatasetError
from edgead.models.base import Pipeline
from edgead.models.differnet.model import rotate
from edgead.models.image_training import load_images, training_step
from edgead.progress import progress as progress_bar

FEATURE_BATCH = 8  # images per extractor pass while caching


@torch.no_grad()
def cache_features(head, pipeline: Pipeline, images: torch.Tensor, progress: bool) -> torch.Tensor:
    """[views x N, D]: the pooled multi-scale features of every cached view of every training image."""
    generator = torch.Generator().manual_seed(head.seed)
    jobs = [(view, start) for view in range(head.views) for start in range(0, len(images), FEATURE_BATCH)]
    features = []
    for view, start in progress_bar(jobs, "extractor features", progress):
        batch = images[start : start + FEATURE_BATCH].float() / 255
        if view > 0 and head.rotation > 0:
            angles = (torch.rand(len(batch), generator=generator) * 2 - 1) * head.rotation
            batch = rotate(batch, angles)
        features.append(pipeline.features(batch).flatten(1))
    return torch.cat(features)


def train_differnet(
    head,
    pipeline: Pipeline,
    samples: list[Sample],
    progress: bool = False,
    on_epoch: Callable[[int], None] | None = None,
) -> None:
    """Fit the standardisation and the flow of ``head`` on the normal training ``samples``.

    ``on_epoch(epoch)`` (1-based), if given, is called after every epoch with the flow in eval mode: a
    benchmark's view of the training curve; it never changes which weights are kept (the last)."""
    if len(samples) < 2:
        raise DatasetError("the differnet model needs at least 2 training images (after the validation split)")
    images = load_images(samples, pipeline.image_size, progress, "load images")
    features = cache_features(head, pipeline, images, progress)
    mean = features.double().mean(dim=0).float()
    std = features.double().std(dim=0).float().clamp_min(1e-6)
    head.set_fitted(feature_mean_=mean.view(1, -1, 1, 1), feature_std_=std.view(1, -1, 1, 1))
    vectors = features.view(len(features), -1, 1, 1)

    torch.manual_seed(head.seed)
    generator = torch.Generator().manual_seed(head.seed)
    optimiser = torch.optim.Adam(
        head.flow.parameters(), lr=head.lr, betas=(0.8, 0.8), eps=1e-4, weight_decay=head.weight_decay
    )
    batches_per_epoch = max(1, len(vectors) // head.batch_size)  # full batches only
    steps = head.epochs * batches_per_epoch
    head.history_ = []
    head.flow.train()
    for step in progress_bar(range(steps), "train flow", progress):
        b = step % batches_per_epoch
        if b == 0:  # a new epoch: a new order
            order = torch.randperm(len(vectors), generator=generator)
        batch = vectors[order[b * head.batch_size : (b + 1) * head.batch_size]]
        training_step(optimiser, head.nll(batch).mean(), step, steps, head.history_, "differnet flow")
        if on_epoch is not None and b == batches_per_epoch - 1:
            head.flow.eval()
            on_epoch((step + 1) // batches_per_epoch)
            head.flow.train()
    head.flow.eval()
