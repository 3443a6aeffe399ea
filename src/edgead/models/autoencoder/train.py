"""The autoencoder baseline's training recipe: reconstruct normal images, with the loss it scores with.

Adam on batches of normal training images (random horizontal and vertical flips only: a colour change
could be a defect); the loss is the error the head scores with (mean squared error, or 1 - SSIM as
Bergmann et al. train AE-SSIM). ``lr`` is divided by 10 for the last 5% of the steps. The last step's
weights are kept. The error scale (``normal_error_``) is the mean error on the normal validation images.
"""

from __future__ import annotations

import torch

from edgead.data.datasets import Sample
from edgead.errors import DatasetError
from edgead.models.autoencoder.model import reconstruction_error
from edgead.models.base import Pipeline
from edgead.models.image_training import decay_at_the_end, load_images, training_step
from edgead.progress import progress as progress_bar


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(2, generator=generator) < 0.5
    if flip[0]:
        images = images.flip(3)
    if flip[1]:
        images = images.flip(2)
    return images


def train_autoencoder(head, pipeline: Pipeline, samples: list[Sample], validation: list[Sample] | None, progress: bool):
    """Fit the autoencoder in ``pipeline.backbone`` and the head's error scale."""
    if len(samples) < 2:
        raise DatasetError("the autoencoder model needs at least 2 training images (after the validation split)")
    extractor = pipeline.backbone
    images = load_images(samples, pipeline.image_size, progress)
    torch.manual_seed(head.seed)
    generator = torch.Generator().manual_seed(head.seed)
    optimiser = torch.optim.Adam(extractor.autoencoder.parameters(), lr=head.lr, weight_decay=head.weight_decay)
    head.history_ = []
    extractor.autoencoder.train()
    for step in progress_bar(range(head.steps), "train autoencoder", progress):
        decay_at_the_end(optimiser, step, head.steps, head.lr)
        index = torch.randint(0, len(images), (head.batch_size,), generator=generator)
        batch = random_flips(pipeline.preprocess(images[index].float() / 255), generator)
        features = extractor(batch)
        loss = reconstruction_error(features[:, :3], features[:, 3:], head.error).mean()
        training_step(optimiser, loss, step, head.steps, head.history_, "autoencoder")
    extractor.autoencoder.eval()
    normal = load_images(validation, pipeline.image_size) if validation else images
    with torch.no_grad():
        errors = [
            head.raw_error(pipeline.features(normal[i : i + head.batch_size].float() / 255)).mean()
            for i in range(0, len(normal), head.batch_size)
        ]
    head.set_fitted(normal_error_=torch.stack(errors).mean().clamp_min(1e-8).view(1, 1, 1, 1))
