"""The SimCLR baseline's recipe: NT-Xent on two augmented views of each normal image, then the memory bank.

SimCLR's augmentations, in torch on batches: random resized crop (area 20-100%, to ``crop`` px, which
keeps training cheap; the encoder is fully convolutional), horizontal flip, colour jitter (brightness,
contrast, saturation 0.4, with probability 0.8), greyscale (0.2) and Gaussian blur (0.5). A projection
MLP on the pooled features (training only, not part of the model), NT-Xent at ``temperature``, Adam with
cosine decay. Then PatchCore's memory bank is fitted on the encoder's features of the training images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgead.data.datasets import Sample
from edgead.errors import DatasetError
from edgead.models.base import Pipeline
from edgead.models.image_training import load_images, training_step
from edgead.progress import progress as progress_bar

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def random_resized_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: a crop of 20-100% of the area, aspect 3/4-4/3, resized to ``size`` (one affine grid)."""
    n = len(images)
    area = 0.2 + 0.8 * torch.rand(n, generator=generator)
    aspect = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(4 / 3))
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def simclr_view(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR view of each image in 0..1: crop + flip, colour jitter, greyscale, blur."""
    n = len(images)
    x = random_resized_crop(images, size, generator)
    jitter = (torch.rand(n, 1, 1, 1, generator=generator) < 0.8).float()
    for kind in range(3):
        factor = 1 + jitter * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * 0.4
        grey = (x * _LUMA).sum(dim=1, keepdim=True)
        centre = grey.mean(dim=(2, 3), keepdim=True) if kind == 1 else grey if kind == 2 else 0
        x = (centre + (x - centre) * factor).clamp(0, 1)
    grey = (torch.rand(n, 1, 1, 1, generator=generator) < 0.2).float()
    x = grey * (x * _LUMA).sum(dim=1, keepdim=True).expand_as(x) + (1 - grey) * x
    if torch.rand(1, generator=generator) < 0.5:  # one blur strength per batch keeps it one convolution
        sigma = 0.1 + 1.9 * float(torch.rand(1, generator=generator))
        radius = max(1, round(2 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel, groups=3)
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.transpose(2, 3), groups=3)
    return x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2N - 1 other views of the batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(z1)
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, partners)


def train_simclr(head, pipeline: Pipeline, samples: list[Sample], progress: bool) -> None:
    """Train the encoder in ``pipeline.backbone`` with NT-Xent, then fit the head's memory bank."""
    if len(samples) < 2:
        raise DatasetError("the simclr model needs at least 2 training images (after the validation split)")
    encoder = pipeline.backbone.encoder
    images = load_images(samples, pipeline.image_size, progress)
    torch.manual_seed(head.seed)
    generator = torch.Generator().manual_seed(head.seed)
    projection = nn.Sequential(nn.Linear(head.dim, head.dim), nn.ReLU(inplace=True), nn.Linear(head.dim, 64))
    parameters = [*encoder.parameters(), *projection.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=head.lr, weight_decay=1e-6)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, head.steps)
    batch = min(head.batch_size, len(images))
    head.history_ = []
    encoder.train()
    for step in progress_bar(range(head.steps), "train simclr", progress):
        index = torch.randperm(len(images), generator=generator)[:batch]
        originals = images[index].float() / 255
        views = [pipeline.preprocess(simclr_view(originals, head.crop, generator)) for _ in range(2)]
        embeddings = [projection(encoder(v).mean(dim=(2, 3))) for v in views]
        loss = nt_xent(*embeddings, head.temperature)
        training_step(optimiser, loss, step, head.steps, head.history_, "simclr")
        schedule.step()
    encoder.eval()
    with torch.no_grad():
        features = (
            pipeline.features(images[i : i + 16].float() / 255) for i in range(0, len(images), 16)
        )
        head.fit_stream(features, len(images), progress=progress)
