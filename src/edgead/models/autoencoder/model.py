"""The autoencoder baseline that ships: image -> reconstruction -> per-pixel error (L2 or SSIM).

The classic edge baseline (Bergmann et al., "Improving unsupervised defect segmentation by applying
structural similarity to autoencoders", 2019): a convolutional autoencoder trained on normal images
only, with no ImageNet weights, through a narrow code, so that what it never saw (a defect) comes back
wrong. It works at half the input side (a 2x2 average pool first) to stay cheap.

:class:`Reconstruction` sits in the pipeline's backbone slot and returns [downsampled image |
reconstruction] as one 4D tensor at stride 2; :class:`ReconstructionError` (the head) turns it into
the error map: mean squared error over the channels, or 1 - SSIM (7x7 uniform window, per channel,
averaged), divided by the mean error of the normal validation images. Training: :mod:`.train`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from edgead.errors import SizeError
from edgead.models.base import Pipeline, TrainableHead
from edgead.models.student.model import (
    BACKBONE_DESCRIPTION,
    conv,
    describe_as,
    image_encoder,
    upsampling_steps,
)
from edgead.validation import (
    BatchSize,
    Channels,
    NonNegativeFloat,
    PositiveFloat,
    Seed,
    Steps,
    Width,
    check_memory,
    hyperparameters,
)

SSIM_WINDOW = 7


class ConvAutoencoder(nn.Module):
    """Encoder: five 4x4/2 convolutions and one that folds what is left into a ``code``-dim vector.
    Decoder: six (resize x2, 3x3 convolution) steps back to the side it was given, then a 3x3 to RGB."""

    def __init__(self, side: int, code: int = 128, width: int = 32) -> None:
        super().__init__()
        w = width
        self.encoder = image_encoder((w, w, 2 * w, 2 * w, 4 * w), code, side)
        sizes = (side // 32, side // 16, side // 8, side // 4, side // 2, side)
        steps = upsampling_steps(code, sizes, (4 * w, 2 * w, 2 * w, w, w, w))
        self.decoder = nn.Sequential(*steps, conv(w, 3, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))


class Reconstruction(nn.Module):
    """The backbone slot of the autoencoder model: [image at half side | its reconstruction], stride 2.

    The ImageNet backbone the pipeline was built with is not used (nor saved): only its input
    normalisation and its name for the run config are kept.
    """

    stride = 2
    out_channels = 6

    def __init__(self, backbone: nn.Module, image_size: int, code: int, width: int, seed: int) -> None:
        super().__init__()
        if image_size % 64:
            raise ValueError(f"the autoencoder model needs an input side that is a multiple of 64, not {image_size}")
        self.down = nn.AvgPool2d(2)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.autoencoder = ConvAutoencoder(image_size // 2, code=code, width=width)
        describe_as(self, backbone, BACKBONE_DESCRIPTION)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = self.down(x)
        return torch.cat([small, self.autoencoder(small)], dim=1)


def ssim_map(a: torch.Tensor, b: torch.Tensor, value_range: float = 2.0) -> torch.Tensor:
    """Per-pixel SSIM [N, C, H, W] with a uniform 7x7 window (inputs on a ``value_range`` wide scale)."""
    pool = nn.functional.avg_pool2d
    kw = {"kernel_size": SSIM_WINDOW, "stride": 1, "padding": SSIM_WINDOW // 2, "count_include_pad": False}
    c1, c2 = (0.01 * value_range) ** 2, (0.03 * value_range) ** 2
    mu_a, mu_b = pool(a, **kw), pool(b, **kw)
    var_a = pool(a * a, **kw) - mu_a * mu_a
    var_b = pool(b * b, **kw) - mu_b * mu_b
    cov = pool(a * b, **kw) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))


def reconstruction_error(image: torch.Tensor, reconstruction: torch.Tensor, error: str) -> torch.Tensor:
    """[N, 1, H, W]: mean over channels of the squared error, or of 1 - SSIM."""
    if error == "l2":
        return ((image - reconstruction) ** 2).mean(dim=1, keepdim=True)
    return (1 - ssim_map(image, reconstruction)).mean(dim=1, keepdim=True)


class ReconstructionError(TrainableHead):
    """Error map of the reconstruction, in units of the normal validation images' mean error."""

    name: ClassVar[str] = "autoencoder"
    fitted_buffers: ClassVar[tuple[str, ...]] = ("normal_error_",)

    @hyperparameters
    def __init__(
        self,
        error: Literal["l2", "ssim"] = "ssim",
        code: Channels = 128,
        width: Width = 32,
        steps: Steps = 1000,
        batch_size: BatchSize = 8,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 1e-5,
        seed: Seed = 0,
    ) -> None:
        super().__init__()
        self.error = error
        self.code = code
        self.width = width
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    def hyperparameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in "error code width steps batch_size lr weight_decay seed".split()}

    def check_sizes(self, image_size: int, backbone: nn.Module | None = None) -> None:
        """The side must halve six times; weights (with Adam's state) and a batch's activations must fit."""
        if image_size % 64:
            raise SizeError(f"the autoencoder model needs an input side that is a multiple of 64, not {image_size}")
        w, side = self.width, image_size // 2
        # ~384 w^2 in the 4x4 and 3x3 convolutions, the folding convolution, the decoder's first step
        weights = 384 * w**2 + 4 * w * self.code * (side // 32) ** 2 + 36 * w * self.code
        activations = 2 * 3 * w * side**2  # outputs kept for backward and their gradients, per image
        check_memory(
            f"bad hyperparameter for model 'autoencoder': width {w}, code {self.code} and batch_size "
            f"{self.batch_size} at image size {image_size}",
            16 * weights + 4 * self.batch_size * activations,
            "use a smaller width, code, batch_size or image size",
        )

    def build_extractor(self, backbone: nn.Module, image_size: int) -> nn.Module:
        return Reconstruction(backbone, image_size, self.code, self.width, self.seed)

    def raw_error(self, features: torch.Tensor) -> torch.Tensor:
        return reconstruction_error(features[:, :3], features[:, 3:], self.error)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        return self.raw_error(features) / self.normal_error_

    def fit_samples(
        self, pipeline: Pipeline, samples: list, progress: bool = False, validation: list | None = None
    ) -> ReconstructionError:
        from edgead.models.autoencoder.train import train_autoencoder

        train_autoencoder(self, pipeline, samples, validation, progress=progress)
        return self
