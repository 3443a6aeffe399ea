"""The networks that go on the IMX500: a fitted run as one plain module, image in, patch scores out.

Used inside the isolated IMX500 toolchain (the worker quantizes and converts them) and in edgead's own
environment (``edgead budget --device imx500`` traces them, tests compare them with the heads), so this
module needs torch and nothing else of the training stack.

    image [1, 3, S, S], RGB scaled to 0..1  ->  patch scores [1, 1, S/8, S/8]

Each net is static and 4D-only (convolutions, pooling, resizes, element-wise ops and channel
reductions), with the run's normalisation folded in, so the converter sees nothing it refuses:
- TinyGLASS: backbone + adaptor (feature standardisation folded in) + discriminator;
- student: teacher + student + autoencoder + the discrepancy as one last 1x1 convolution;
- PatchCore: backbone + 3x3 aggregation + the memory bank as 1x1 convolutions. For a fixed bank the
  nearest-neighbour search is ``d^2 = |x - c|^2 - max_j (2 (x - c).m_j - |m_j|^2)`` with ``m_j`` the
  bank centred on its mean ``c``: each chunk of the bank is one 1x1 convolution (weights 2 m_j, bias
  -|m_j|^2) followed by a ReduceMax over its channels, the chunks' maxima are combined by an element-wise
  Max. The converter refuses ReduceMin, and one 4096-channel convolution needs more working memory than
  the sensor has, while chunks of 1024 fit (docs/results/sensor_bank.md).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def plain_convolutions(module):
    """Replace every Conv2d subclass (e.g. the backbone's SameConv2d) by ZeroPad2d + a plain Conv2d.

    MCT traces with torch.fx and reads a convolution's settings from ``nn.Conv2d`` modules; a subclass
    with its own ``forward`` is traced into a functional ``conv2d`` whose ``groups`` MCT cannot read
    (``KeyError: 'groups'`` in its batch-norm folding). Same weights, same output.
    """

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
            conv = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                dilation=child.dilation,
                groups=child.groups,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            )
            conv.load_state_dict(child.state_dict())
            extra_pad = getattr(child, "extra_pad", None)
            setattr(module, name, nn.Sequential(nn.ZeroPad2d(extra_pad), conv) if extra_pad else conv)
        else:
            plain_convolutions(child)
    return module


def sensor_features(pipeline):
    """Preprocess + frozen backbone as a plain module (0..1 image -> features), traceable by torch.fx.

    FeatureExtractor.forward without its dynamic shape check (which MCT's tracer cannot follow), and with
    plain convolutions; for the student model the backbone slot's teacher is taken.
    """

    backbone = getattr(pipeline.backbone, "teacher", pipeline.backbone)
    layers = tuple(backbone.layers)
    # Integer upsampling factor of each chosen stage to the finest chosen stride (static shapes).
    scales = tuple(s // backbone.stride for s in backbone.layer_strides)

    class SensorFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("input_mean", pipeline.mean.clone())
            self.register_buffer("input_std", pipeline.std.clone())
            self.stages = plain_convolutions(copy.deepcopy(backbone.stages))
            self.pool = backbone.pool

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = (images - self.input_mean) / self.input_std
            feats = []
            for i, stage in enumerate(self.stages):
                x = stage(x)
                if i in layers:
                    feats.append(self.pool(x))
            resized = [
                f
                if scale == 1
                else F.interpolate(f, scale_factor=float(scale), mode="bilinear", align_corners=False)
                for f, scale in zip(feats, scales, strict=True)
            ]
            return resized[0] if len(resized) == 1 else torch.cat(resized, dim=1)

    return SensorFeatures()


def fold_affine_into_conv(conv, scale, shift):
    """A new conv computing ``conv(x) * scale + shift`` (per output channel), exactly in float64."""

    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    with torch.no_grad():
        folded.weight.copy_((weight * scale.view(-1, 1, 1, 1)).float())
        folded.bias.copy_((bias * scale + shift).float())
    return folded


def build_tinyglass_sensor_net(pipeline):
    """Preprocess + backbone + TinyGLASS head as one plain module: 0..1 image -> patch scores."""

    head = pipeline.head
    mean = head.feature_mean_.flatten().double()
    std = head.feature_std_.flatten().double()
    adaptor = head.adaptor
    # adaptor((f - m) / s) = conv(W / s, f) + (b - W @ (m / s)): fold the standardisation, exactly.
    weight = adaptor.weight.detach().double()  # [C, C, 1, 1]
    bias = adaptor.bias.detach().double() if adaptor.bias is not None else torch.zeros(weight.shape[0])
    folded = nn.Conv2d(adaptor.in_channels, adaptor.out_channels, kernel_size=1, bias=True)
    with torch.no_grad():
        folded.weight.copy_((weight / std.view(1, -1, 1, 1)).float())
        folded.bias.copy_((bias - (weight[:, :, 0, 0] * (mean / std).view(1, -1)).sum(dim=1)).float())

    class SensorNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = sensor_features(pipeline)
            self.adaptor = folded
            self.discriminator = head.discriminator

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.discriminator(self.adaptor(self.features(images)))

    return SensorNet().eval()


def build_student_sensor_net(pipeline):
    """Teacher + student (+ autoencoder) + discrepancy as one plain module: 0..1 image -> patch scores.

    The head's channel slices and standardisation are folded away, so the graph is convolutions, ReLUs,
    resizes, one subtraction and one square per branch, a concat and a last 1x1 convolution:
    - the student's last 1x1 convolution is split into its teacher half and its autoencoder half, and
      the teacher half is de-standardised (``y * std + mean``), exactly;
    - mean_c(((t - m) / s - y)^2) = sum_c (t - y')^2 / (C s_c^2): the per-channel weights, the map
      quantile normalisation and the 0.5 / 0.5 average become the weights and bias of one 1x1
      convolution over [(t - y')^2 | (a - y_ae)^2].
    """

    head, extractor = pipeline.head, pipeline.backbone
    c = head.channels
    mean = head.teacher_mean_.flatten().double()
    std = head.teacher_std_.flatten().double()
    q = head.quantiles_.flatten().double()
    last = extractor.student.layers[-1]
    trunk = copy.deepcopy(extractor.student.layers[:-1])

    def half(rows: slice):
        conv = nn.Conv2d(last.in_channels, c, 1)
        with torch.no_grad():
            conv.weight.copy_(last.weight[rows])
            conv.bias.copy_(last.bias[rows])
        return conv

    to_teacher = fold_affine_into_conv(half(slice(0, c)), std, mean)
    # Normalised map = a * raw + b with a = 0.1 / (q_high - q_low), b = -a q_low, halved when averaged.
    weight_st = 0.1 / (q[1] - q[0]) / (c * std**2)
    bias = -0.1 * q[0] / (q[1] - q[0])
    weights = [weight_st]
    if head.autoencoder:
        weights = [0.5 * weight_st, torch.full((c,), 0.05 / (q[3] - q[2]) / c, dtype=torch.float64)]
        bias = 0.5 * bias - 0.05 * q[2] / (q[3] - q[2])
    combine = nn.Conv2d(c * len(weights), 1, 1)
    with torch.no_grad():
        combine.weight.copy_(torch.cat(weights).view(1, -1, 1, 1).float())
        combine.bias.fill_(float(bias))

    class SensorNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = sensor_features(pipeline)
            self.student = trunk
            self.to_teacher = to_teacher
            self.to_autoencoder = half(slice(c, 2 * c)) if head.autoencoder else None
            self.autoencoder = copy.deepcopy(extractor.autoencoder)
            self.combine = combine

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = (images - self.features.input_mean) / self.features.input_std  # what student and autoencoder see
            hidden = self.student(x)
            difference = self.features(images) - self.to_teacher(hidden)
            squares = difference * difference
            if self.to_autoencoder is not None:
                difference_ae = self.autoencoder(x) - self.to_autoencoder(hidden)
                squares = torch.cat([squares, difference_ae * difference_ae], dim=1)
            return self.combine(squares)

    return SensorNet().eval()




SENSOR_BANK_CHUNK = 1024  # bank entries per 1x1 convolution: 4 chunks of 1024 fit where 1 of 4096 does not


class PatchCoreSensorNet(nn.Module):
    """Backbone + aggregation + exact nearest-neighbour distance to a fixed bank, in chunks.

    Returns each patch's distance to its nearest bank entry: the PatchCore head's patch scores as its
    exact search computes them (``exact_search``), so the host's postprocess and threshold are the run's.
    """

    def __init__(self, pipeline, chunk_size: int = SENSOR_BANK_CHUNK) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        bank = pipeline.head.memory_bank_.double()
        centre = bank.mean(dim=0)
        bank = bank - centre
        channels = bank.shape[1]
        self.features = sensor_features(pipeline)
        # x - c as a depthwise 1x1 convolution (a plain op for every quantizer), exact in float
        self.centre = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
        # |x - c|^2: the squares summed over channels by a 1x1 convolution of ones
        self.square_sum = nn.Conv2d(channels, 1, 1, bias=False)
        self.chunks = nn.ModuleList()
        with torch.no_grad():
            self.centre.weight.fill_(1.0)
            self.centre.bias.copy_((-centre).float())
            self.square_sum.weight.fill_(1.0)
            for start in range(0, len(bank), chunk_size):
                entries = bank[start : start + chunk_size]
                conv = nn.Conv2d(channels, len(entries), 1, bias=True)
                conv.weight.copy_((2 * entries).view(len(entries), channels, 1, 1).float())
                conv.bias.copy_((-(entries * entries).sum(dim=1)).float())
                self.chunks.append(conv)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        centred = self.centre(self.features(images))
        best = None
        for conv in self.chunks:
            chunk_best = torch.amax(conv(centred), dim=1, keepdim=True)
            best = chunk_best if best is None else torch.maximum(best, chunk_best)
        squared = torch.relu(self.square_sum(centred * centred) - best)
        return torch.sqrt(squared)


def build_patchcore_sensor_net(pipeline, chunk_size: int = SENSOR_BANK_CHUNK) -> nn.Module:
    """Backbone + aggregation + the memory bank as chunked 1x1 convolutions: 0..1 image -> patch distances."""
    return PatchCoreSensorNet(pipeline, chunk_size).eval()


SENSOR_NETS = {
    "tinyglass": build_tinyglass_sensor_net,
    "student": build_student_sensor_net,
    "patchcore": build_patchcore_sensor_net,
}
OUTPUT_MEANINGS = {
    "tinyglass": "patch anomaly scores in 0..1 (TinyGLASS discriminator, sigmoid)",
    "student": "patch anomaly scores, normalised discrepancy (about 0 on normal patches, 0.1 at the normal 99.5% quantile)",
    "patchcore": "patch scores: each patch's distance to its nearest memory-bank entry (the run's units)",
}


def build_sensor_net(pipeline, **options) -> nn.Module:
    """The network that goes on the sensor for a fitted run (TinyGLASS, student, PatchCore): image -> patch
    scores. ``options`` go to the model's builder (PatchCore: ``chunk_size``)."""
    pipeline.head.check_fitted()
    return SENSOR_NETS[pipeline.head.name](pipeline, **options)
