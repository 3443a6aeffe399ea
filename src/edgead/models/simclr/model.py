"""The SimCLR baseline that ships: a compact CNN's dense features scored by PatchCore's kNN.

SimCLR (Chen et al., ICML 2020) learns features without labels by pulling two augmented views of the
same image together and pushing the other images of the batch away (NT-Xent). Trained on the normal
training images only, with no ImageNet weights, it is the self-supervised baseline of the edge
literature: what a network learns about a product from its own good parts. Scoring is PatchCore's
(memory bank of the normal patches' features, nearest-neighbour distance), so the comparison with the
ImageNet features is the features alone.

:class:`ContrastiveEncoder` sits in the pipeline's backbone slot (a patch description network, the
student model's architecture, stride 8); :class:`SimClr` is PatchCore with that training in front.
Training: :mod:`.train`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from edgead.errors import SizeError
from edgead.models.base import Pipeline, TrainableHead
from edgead.models.patchcore import PatchCore
from edgead.models.student.model import (
    BACKBONE_DESCRIPTION,
    STUDENT_STRIDE,
    PatchDescriptionNet,
    describe_as,
    description_net_memory,
)
from edgead.validation import (
    BatchSize,
    Channels,
    PositiveFloat,
    Ratio,
    Seed,
    Steps,
    Width,
    check_memory,
    hyperparameters,
)


class ContrastiveEncoder(nn.Module):
    """The backbone slot of the SimCLR model: image -> [N, dim, S/8, S/8] features, trained from scratch."""

    stride = STUDENT_STRIDE

    def __init__(self, backbone: nn.Module, dim: int, width: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.encoder = PatchDescriptionNet(dim, width=width)
        self.out_channels = dim
        describe_as(self, backbone, BACKBONE_DESCRIPTION)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class SimClr(PatchCore, TrainableHead):
    """PatchCore on features learned by SimCLR from the normal training images."""

    name: ClassVar[str] = "simclr"

    @hyperparameters
    def __init__(
        self,
        dim: Channels = 128,
        width: Width = 32,
        steps: Steps = 500,
        batch_size: BatchSize = 16,
        crop: Annotated[int, Field(ge=STUDENT_STRIDE, le=2048)] = 128,
        temperature: PositiveFloat = 0.5,
        lr: PositiveFloat = 1e-3,
        coreset_ratio: Ratio = 0.1,
        seed: Seed = 0,
    ) -> None:
        super().__init__(coreset_ratio=coreset_ratio, seed=seed)
        self.dim = dim
        self.width = width
        self.steps = steps
        self.batch_size = batch_size
        self.crop = crop
        self.temperature = temperature
        self.lr = lr

    def hyperparameters(self) -> dict[str, Any]:
        names = "dim width steps batch_size crop temperature lr coreset_ratio seed".split()
        return {name: getattr(self, name) for name in names}

    def check_sizes(self, image_size: int, backbone: nn.Module | None = None) -> None:
        """The crop is a part of the image; training two views of a batch of crops must fit."""
        if self.crop > image_size:
            raise SizeError(
                f"bad hyperparameter for model 'simclr': crop {self.crop} is larger than the image size "
                f"{image_size}; use crop <= {image_size} or a larger --image-size"
            )
        check_memory(
            f"bad hyperparameter for model 'simclr': width {self.width} with batch_size {self.batch_size} "
            f"and crop {self.crop}",
            description_net_memory(self.width, self.crop, 2 * self.batch_size),
            "use a smaller width, batch_size or crop",
        )

    def build_extractor(self, backbone: nn.Module, image_size: int) -> nn.Module:
        return ContrastiveEncoder(backbone, self.dim, self.width, self.seed)

    def fit_samples(
        self, pipeline: Pipeline, samples: list, progress: bool = False, validation: list | None = None
    ) -> SimClr:
        from edgead.models.simclr.train import train_simclr

        train_simclr(self, pipeline, samples, progress=progress)
        return self
