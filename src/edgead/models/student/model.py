"""The student model that ships to the device: teacher + student (+ autoencoder) -> one discrepancy map.

Knowledge distillation as EfficientAD (Batzner et al., WACV 2024) does it, sized for an 8 MB sensor:

- **teacher**: the frozen pretrained backbone's features (EfficientNet-Lite0 stride 8 + 16 by default),
  standardised per channel with statistics of the normal training images;
- **student**: a patch description network (plain 3x3/4x4 convolutions and ReLUs, no depthwise, no
  normalisation layers) trained from scratch to regress the standardised teacher features on normal
  images; where it fails to (on defects it never saw) the squared difference is large;
- **autoencoder** (optional): encodes the whole image into one small code and decodes the teacher
  features from it; the student's second half of output channels regresses the autoencoder's output.
  Their difference flags global, "logical" anomalies (a missing part, a wrong arrangement) that a
  patch-local student reproduces fine.

:class:`TeacherStudent` puts the three networks side by side behind the pipeline's backbone slot and
returns ONE 4D tensor (teacher | student | student-ae | autoencoder channels), so everything that cuts,
exports or quantises the pipeline treats it like any backbone. :class:`Student` (the head) turns that
tensor into the anomaly map: per-position mean squared differences, each normalised with quantiles of
the normal validation images' maps (never the test set), averaged. Every op is a 4D convolution,
pooling, resize or pointwise op with static shapes. The training recipe is in
:mod:`edgead.models.student.train`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from edgead.errors import UsageError
from edgead.models.base import Pipeline, TrainableHead
from edgead.validation import (
    BatchSize,
    NonNegativeFloat,
    PositiveFloat,
    Ratio,
    Seed,
    Steps,
    Views,
    Width,
    check_memory,
    hyperparameters,
)

STUDENT_STRIDE = 8  # the student's output stride: the teacher's finest default stage (stride 8)


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """A plain convolution giving ``size / stride``: a 3x3 (any stride) or a 4x4 with stride 2."""
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2)


def image_encoder(channels: tuple[int, ...], code: int, side: int) -> nn.Sequential:
    """4x4/2 convolutions + ReLU through ``channels``, then one convolution as large as what is left of
    ``side``, which folds the whole image into a ``code``-dim vector (1 x 1)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((3, *channels[:-1]), channels, strict=True):
        layers += [conv(c_in, c_out, 4, stride=2), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(channels[-1], code, side // 2 ** len(channels)))
    return nn.Sequential(*layers)


def upsampling_steps(in_channels: int, sizes: tuple[int, ...], channels: tuple[int, ...]) -> list[nn.Module]:
    """For each size: a bilinear resize to it (a static Resize op), a 3x3 convolution, a ReLU."""
    steps: list[nn.Module] = []
    for size, c_out in zip(sizes, channels, strict=True):
        steps += [nn.Upsample(size=(size, size), mode="bilinear"), conv(in_channels, c_out, 3), nn.ReLU(inplace=True)]
        in_channels = c_out
    return steps


def describe_as(module: nn.Module, backbone: nn.Module, names: tuple[str, ...]) -> None:
    """Give a backbone-slot module the attributes edgead reads from a backbone (name, layers, input
    normalisation, ...), taken from the backbone the pipeline was built with."""
    for name in names:
        setattr(module, name, getattr(backbone, name))


BACKBONE_DESCRIPTION = ("name", "layers", "mean", "std", "aggregation_border")


class PatchDescriptionNet(nn.Module):
    """EfficientAD's student in spirit: a few plain convolutions with a ~50 px receptive field.

    Stride 8 in three steps (4x4/2, 4x4/2, 3x3/2), then two 3x3 at stride 8 and a 1x1 projection to
    ``out_channels``. ``width`` sets the channels (width, 2 width, 4 width, 4 width): 32 is about 0.45M
    parameters and 0.6 GMAC at 256 x 256.
    """

    def __init__(self, out_channels: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.layers = nn.Sequential(
            conv(3, w, 4, stride=2), nn.ReLU(inplace=True),
            conv(w, 2 * w, 4, stride=2), nn.ReLU(inplace=True),
            conv(2 * w, 4 * w, 3, stride=2), nn.ReLU(inplace=True),
            conv(4 * w, 4 * w, 3), nn.ReLU(inplace=True),
            conv(4 * w, 4 * w, 3), nn.ReLU(inplace=True),
            nn.Conv2d(4 * w, out_channels, 1),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def description_net_memory(width: int, side: int, batch: int) -> float:
    """Bytes to train a :class:`PatchDescriptionNet` on ``batch`` images of ``side`` px (an estimate that
    errs low): float32 weights, gradients and Adam's two moments (about 392 width^2 weights), plus every
    layer's output kept for the backward pass and its gradient (0.56 width x side^2 values per image)."""
    return 16 * 392 * width**2 + 4 * 2 * batch * 0.5625 * width * side**2


class FeatureAutoencoder(nn.Module):
    """Image -> one ``code``-dim vector -> teacher-like features at stride 8 (EfficientAD's autoencoder).

    The encoder halves the side five times (4x4/2 convolutions) and a last convolution as large as what
    is left folds it into a 1x1 code; the decoder upsamples to fixed sizes (static Resize ops) with a
    3x3 convolution after each step. Built for one input side (``image_size``, a multiple of 32).
    """

    def __init__(self, out_channels: int, image_size: int, code: int = 64, width: int = 32) -> None:
        super().__init__()
        w = width
        grid = image_size // STUDENT_STRIDE
        self.encoder = image_encoder((w, w, 2 * w, 2 * w, 2 * w), code, image_size)
        sizes = (max(1, grid // 8), max(1, grid // 4), max(1, grid // 2), grid)
        steps = upsampling_steps(code, sizes, (2 * w,) * 4)
        steps += [conv(2 * w, 2 * w, 3), nn.ReLU(inplace=True), conv(2 * w, out_channels, 3)]
        self.decoder = nn.Sequential(*steps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))


class TeacherStudent(nn.Module):
    """The pipeline's backbone slot for the student model: [teacher | student (| student-ae | autoencoder)].

    The teacher is the frozen feature extractor; the student and the autoencoder are trained by the
    recipe. Exposes what the rest of edgead reads from a backbone (name, layers, stride, channels,
    input normalisation), delegated to the teacher.
    """

    def __init__(self, teacher: nn.Module, image_size: int, width: int, autoencoder: bool, seed: int) -> None:
        super().__init__()
        if image_size % 32:
            raise ValueError(f"the student model needs an input side that is a multiple of 32, not {image_size}")
        if teacher.stride != STUDENT_STRIDE:
            raise ValueError(
                f"the student regresses stride-{STUDENT_STRIDE} teacher features; layers {teacher.layers} "
                f"give stride {teacher.stride} (use --layers 2,3 or 2)"
            )
        self.teacher = teacher
        self.teacher_channels = teacher.out_channels
        channels = self.teacher_channels
        with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG
            torch.manual_seed(seed)
            self.student = PatchDescriptionNet(2 * channels if autoencoder else channels, width=width)
            self.autoencoder = FeatureAutoencoder(channels, image_size) if autoencoder else None
        describe_as(self, teacher, (*BACKBONE_DESCRIPTION, "stride", "layer_strides"))
        self.out_channels = channels * (4 if autoencoder else 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.teacher(x), self.student(x)]
        if self.autoencoder is not None:
            parts.append(self.autoencoder(x))
        return torch.cat(parts, dim=1)


class Student(TrainableHead):
    """Discrepancy head: standardise the teacher, square the differences, normalise, combine."""

    name: ClassVar[str] = "student"
    fitted_buffers: ClassVar[tuple[str, ...]] = ("teacher_mean_", "teacher_std_", "quantiles_")

    @hyperparameters
    def __init__(
        self,
        width: Width = 32,
        autoencoder: bool = True,
        steps: Steps = 2000,
        batch_size: BatchSize = 8,
        views: Views = 4,
        lr: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 1e-5,
        hard_quantile: Ratio = 0.999,
        penalty: bool = True,
        quantile_low: Ratio = 0.9,
        quantile_high: Ratio = 0.995,
        seed: Seed = 0,
    ) -> None:
        super().__init__()
        if not quantile_low < quantile_high:
            raise UsageError(
                f"bad hyperparameter for model 'student': quantile_low ({quantile_low}) must be below "
                f"quantile_high ({quantile_high})"
            )
        self.width = width
        self.autoencoder = autoencoder
        self.steps = steps
        self.batch_size = batch_size
        self.views = views
        self.lr = lr
        self.weight_decay = weight_decay
        self.hard_quantile = hard_quantile
        self.penalty = penalty
        self.quantile_low = quantile_low
        self.quantile_high = quantile_high
        self.seed = seed
        self.channels: int | None = None

    def hyperparameters(self) -> dict[str, Any]:
        names = (
            "width autoencoder steps batch_size views lr weight_decay hard_quantile penalty quantile_low quantile_high seed"
        ).split()
        return {name: getattr(self, name) for name in names}

    def check_sizes(self, image_size: int, backbone: nn.Module | None = None) -> None:
        check_memory(
            f"bad hyperparameter for model 'student': width {self.width} with batch_size {self.batch_size} at "
            f"image size {image_size}",
            description_net_memory(self.width, image_size, self.batch_size),
            "use a smaller width, batch_size or image size",
        )

    def build_extractor(self, backbone: nn.Module, image_size: int) -> nn.Module:
        return TeacherStudent(backbone, image_size, self.width, self.autoencoder, self.seed)

    def attach(self, in_channels: int) -> None:
        self.channels = in_channels // (4 if self.autoencoder else 2)

    def distances(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw per-position squared differences: student vs teacher, and student vs autoencoder."""
        c = self.channels
        teacher = (features[:, :c] - self.teacher_mean_) / self.teacher_std_
        student_teacher = ((teacher - features[:, c : 2 * c]) ** 2).mean(dim=1, keepdim=True)
        if not self.autoencoder:
            return student_teacher, None
        student_ae = ((features[:, 3 * c : 4 * c] - features[:, 2 * c : 3 * c]) ** 2).mean(dim=1, keepdim=True)
        return student_teacher, student_ae

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        student_teacher, student_ae = self.distances(features)
        q = self.quantiles_  # [1, 2 or 4, 1, 1]: 4D slices keep the exported graph 4D-only
        out = 0.1 * (student_teacher - q[:, 0:1]) / (q[:, 1:2] - q[:, 0:1])
        if student_ae is not None:
            out = 0.5 * out + 0.05 * (student_ae - q[:, 2:3]) / (q[:, 3:4] - q[:, 2:3])
        return out

    def fit_samples(
        self, pipeline: Pipeline, samples: list, progress: bool = False, validation: list | None = None
    ) -> Student:
        from edgead.models.student.train import train_student

        train_student(self, pipeline, samples, validation, progress=progress)
        return self
