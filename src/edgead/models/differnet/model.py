"""DifferNet's part that ships: the image at several scales through one lean frozen CNN, then a flow.

DifferNet (Rudolph et al., WACV 2021) and its lean variant DifferSqueezeNet (Manrique Franco and Rudek)
describe an image by the average-pooled features of a frozen CNN at three scales (full, 1/2, 1/4) and
model the density of that vector with a normalizing flow trained by maximum likelihood on normal
images; an image is anomalous where its negative log-likelihood is high.

- :class:`MultiScalePooled` is the pipeline's backbone slot: [N, 3, S, S] -> [N, C x scales, 1, 1]. The
  smaller scales come from 2x2 / 4x4 average pooling of the image (an exact, antialiased downscale
  that exports as one AveragePool), so the whole slot is one static 4D graph.
- :class:`DifferNet` (the head) standardises that vector with the training set's channel statistics and
  runs the flow: ``blocks`` FrEIA affine coupling blocks (one-sided, each after a fixed random
  permutation), subnetworks of two 1x1 convolutions with ``hidden`` units (the flow stays 4D too).
  Its patch-score "map" is one value per image: the NLL per dimension.

What stays in torch (not in the exported graph): the test-time rotations the image score is averaged
over, and the gradient maps (the gradient of the NLL with respect to the input image) that localise a
defect. The exported graph scores one unrotated view and its map is that score everywhere. The training
recipe is in :mod:`edgead.models.differnet.train`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgead.errors import SizeError, UsageError
from edgead.models.base import Pipeline, TrainableHead
from edgead.models.student.model import BACKBONE_DESCRIPTION, describe_as
from edgead.validation import (
    BatchSize,
    Epochs,
    NonNegativeFloat,
    PositiveFloat,
    Seed,
    Views,
    check_memory,
    hyperparameters,
)

MIN_SCALE_SIDE = 32  # the smallest scale must still give the backbone a non-empty deepest stage
MAX_SCALES = 7  # 2048 px (the largest image size) halved 6 times is MIN_SCALE_SIDE


def check_scales(image_size: int, scales: int) -> None:
    """Raise SizeError unless ``image_size`` halves ``scales - 1`` times to at least MIN_SCALE_SIDE."""
    factor = 2 ** (scales - 1)
    if image_size % factor or image_size // factor < MIN_SCALE_SIDE:
        raise SizeError(
            f"differnet with {scales} scales needs an input side divisible by {factor} whose smallest "
            f"scale is at least {MIN_SCALE_SIDE} px, not {image_size} (try --image-size 448)"
        )


class MultiScalePooled(nn.Module):
    """The backbone at ``scales`` image scales (S, S/2, S/4, ...), each map average-pooled to one vector."""

    def __init__(self, backbone: nn.Module, image_size: int, scales: int) -> None:
        super().__init__()
        check_scales(image_size, scales)
        self.backbone = backbone
        self.scales = scales
        describe_as(self, backbone, BACKBONE_DESCRIPTION)
        self.out_channels = backbone.out_channels * scales
        self.stride = image_size  # one vector per image: a 1 x 1 grid of "patches"
        self.layer_strides = (image_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for k in range(self.scales):
            scaled = x if k == 0 else F.avg_pool2d(x, 2**k)
            parts.append(self.backbone(scaled).mean(dim=(2, 3), keepdim=True))
        return torch.cat(parts, dim=1)


def subnet(hidden: int):  # noqa: ANN201 (FrEIA's subnet_constructor signature)
    """FrEIA's subnet constructor: 1x1 conv -> ReLU -> 1x1 conv (DifferNet's fully connected s/t network,
    as convolutions on the 1 x 1 grid so the exported flow stays 4D)."""

    def build(channels_in: int, channels_out: int) -> nn.Module:
        last = nn.Conv2d(hidden, channels_out, 1)
        nn.init.zeros_(last.weight)  # every block starts as the identity (Glow's zero init): the
        nn.init.zeros_(last.bias)  # untrained flow is the standard normal on standardised features
        return nn.Sequential(nn.Conv2d(channels_in, hidden, 1), nn.ReLU(), last)

    return build


def build_flow(dims: int, blocks: int, hidden: int, clamp: float, seed: int) -> nn.Module:
    """``blocks`` x (fixed random permutation, one-sided affine coupling) on [N, dims, 1, 1] (FrEIA)."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    numpy_state = np.random.get_state()  # FrEIA's PermuteRandom reseeds numpy's global generator
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            flow = Ff.SequenceINN(dims, 1, 1)
            for k in range(blocks):
                flow.append(Fm.PermuteRandom, seed=seed + k)
                flow.append(Fm.AffineCouplingOneSided, subnet_constructor=subnet(hidden), clamp=clamp)
    finally:
        np.random.set_state(numpy_state)
    return flow


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image [N, 3, S, S] (0..1) rotated about its centre by its angle (bilinear); the corners that
    come into view are black, as torchvision's RandomRotation fills them (DifferNet's augmentation)."""
    radians = degrees.float() * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DifferNet(TrainableHead):
    """Normalizing-flow head: NLL of the multi-scale pooled feature vector under the flow."""

    name: ClassVar[str] = "differnet"
    fitted_buffers: ClassVar[tuple[str, ...]] = ("feature_mean_", "feature_std_")
    int8_head_weights: ClassVar[bool] = True  # the flow is 92% of the weights: int8 in INT8 files

    @hyperparameters
    def __init__(
        self,
        scales: Annotated[int, Field(ge=1, le=MAX_SCALES)] = 3,
        blocks: Annotated[int, Field(ge=1, le=64)] = 8,
        hidden: Annotated[int, Field(ge=1, le=65_536)] = 2048,
        clamp: PositiveFloat = 3.0,
        epochs: Epochs = 24,
        views: Views = 16,
        rotation: NonNegativeFloat = 180.0,
        batch_size: BatchSize = 96,
        lr: PositiveFloat = 2e-4,
        weight_decay: NonNegativeFloat = 1e-5,
        test_transforms: Annotated[int, Field(ge=1, le=360)] = 16,
        seed: Seed = 0,
    ) -> None:
        super().__init__()
        if rotation > 180:
            raise UsageError(f"bad hyperparameter for model 'differnet': rotation is at most 180 degrees, not {rotation}")
        self.scales = scales
        self.blocks = blocks
        self.hidden = hidden
        self.clamp = clamp
        self.epochs = epochs
        self.views = views
        self.rotation = rotation
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.test_transforms = test_transforms
        self.seed = seed
        self.flow: nn.Module | None = None

    def hyperparameters(self) -> dict[str, Any]:
        names = "scales blocks hidden clamp epochs views rotation batch_size lr weight_decay test_transforms seed"
        return {name: getattr(self, name) for name in names.split()}

    def default_layers(self, backbone: str) -> tuple[int, ...]:
        """One stage, pooled: SqueezeNet's stride-4 fire output (128 channels, the paper's 128 x 3 scales),
        otherwise the stride-16 stage (EfficientNet-Lite0: 112 channels, 336 dimensions over 3 scales)."""
        return (1,) if backbone == "squeezenet1_1" else (3,)

    def check_sizes(self, image_size: int, backbone: nn.Module | None = None) -> None:
        """The scales must fit the image; the flow's weights (with Adam's state) must fit in memory."""
        check_scales(image_size, self.scales)
        if backbone is None:
            return
        dims = backbone.out_channels * self.scales
        weights = self.blocks * (dims // 2 + 1 + dims) * self.hidden  # each coupling's subnet: D/2 -> hidden -> D
        check_memory(
            f"bad hyperparameter for model 'differnet': a flow of {self.blocks} blocks with hidden {self.hidden} "
            f"on {dims} dimensions",
            16 * weights,
            "use a smaller hidden or fewer blocks or scales",
        )

    def build_extractor(self, backbone: nn.Module, image_size: int) -> nn.Module:
        return MultiScalePooled(backbone, image_size, self.scales)

    def attach(self, in_channels: int) -> None:
        self.dims = in_channels
        self.flow = build_flow(in_channels, self.blocks, self.hidden, self.clamp, self.seed)

    def latent_energy_and_log_det(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """0.5 |z|^2 and the flow's log-determinant, each per dimension [N], of pooled features [N, D, 1, 1]:
        the two terms of the NLL (DifferNet's own score is the first alone)."""
        z, log_jac_det = self.flow((features - self.feature_mean_) / self.feature_std_)
        return 0.5 * (z**2).sum(dim=(1, 2, 3)) / self.dims, log_jac_det / self.dims

    def nll(self, features: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per dimension [N] of pooled features [N, D, 1, 1] (the constant log 2 pi
        and the standardisation's log-determinant left out: they are the same for every image)."""
        energy, log_det = self.latent_energy_and_log_det(features)
        return energy - log_det

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        return self.nll(features).view(-1, 1, 1, 1)

    def image_scores(self, features: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor:
        return patch_scores.flatten()

    def test_angles(self) -> torch.Tensor:
        """The test-time rotations: ``test_transforms`` angles evenly spread over the training range
        (the full circle from 0 for ``rotation`` 180, else from -rotation to +rotation)."""
        if self.rotation == 0 or self.test_transforms == 1:
            return torch.zeros(1)
        if self.rotation >= 180:
            return torch.arange(self.test_transforms) * (360 / self.test_transforms)
        return torch.linspace(-self.rotation, self.rotation, self.test_transforms)

    def predict_images(self, pipeline: Pipeline, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps [N, 1, S, S] and image scores (the NLL averaged over the test-time rotations) [N]:
        DifferNet's scoring, in torch.

        The map is the gradient map rescaled so that its maximum is the image score and its zero gradient
        lies |score| below it, as every other head's map peaks at its image score: thresholds, overlays and
        normalisation read maps and scores on one scale."""
        with torch.no_grad():
            scores = torch.stack(
                [self.nll(pipeline.features(rotate(images, angle.expand(len(images))))) for angle in self.test_angles()]
            ).mean(dim=0)
        gradients = self.gradient_maps(pipeline, images)
        relative = gradients / gradients.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        score = scores.view(-1, 1, 1, 1)
        return score - (1 - relative) * score.abs(), scores

    def gradient_maps(self, pipeline: Pipeline, images: torch.Tensor) -> torch.Tensor:
        """|d NLL / d image| summed over the colour channels, smoothed like every other map (Gaussian)."""
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.nll(pipeline.features(x)).sum(), x)
        return pipeline.postprocess(gradient.abs().sum(dim=1, keepdim=True))

    def fit_samples(
        self, pipeline: Pipeline, samples: list, progress: bool = False, validation: list | None = None
    ) -> DifferNet:
        from edgead.models.differnet.train import train_differnet

        train_differnet(self, pipeline, samples, progress=progress)
        return self
