"""ResNet-18 and Wide-ResNet-50-2 (He et al., 2016; Zagoruyko & Komodakis, 2016).

Module names follow torchvision (``conv1``, ``bn1``, ``layer1..4``, ``downsample.0/1``) so its
published ImageNet checkpoints load from a local file; the classifier (``fc``) is left out. The
bottleneck puts the stride on the 3x3 convolution ("ResNet v1.5"), as torchvision does.
"""

from torch import Tensor, nn

from edgead.backbones.base import init_conv_weights


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, groups=groups, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a skip (ResNet-18/34). ``width`` is ignored (no inner width)."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), with a skip (ResNet-50 family)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        width = width or planes
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """ResNet trunk without the classifier.

    Stages: [conv1/bn1/relu/maxpool (s4, 64ch), layer1 (s4), layer2 (s8), layer3 (s16), layer4 (s32)].

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        repeats: blocks per layer, e.g. (2, 2, 2, 2) for ResNet-18.
        width_factor: inner width of bottlenecks relative to ``planes`` (2 for Wide-ResNet-50-2).
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        repeats: tuple[int, int, int, int],
        width_factor: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        layers: list[nn.Sequential] = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), repeats, strict=True)):
            stride = 1 if i == 0 else 2
            out_ch = planes * block.expansion
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
            blocks = [block(in_ch, planes, stride, downsample, width=planes * width_factor)]
            blocks += [block(out_ch, planes, width=planes * width_factor) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.stage_strides: list[int] = [4, 4, 8, 16, 32]
        self.stage_channels: list[int] = [64] + [p * block.expansion for p in (64, 128, 256, 512)]
        init_conv_weights(self)

    @property
    def stages(self) -> nn.ModuleList:
        """Stem and the four layers (built on access, not registered, so keys stay torchvision's)."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return nn.ModuleList([stem, self.layer1, self.layer2, self.layer3, self.layer4])

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def resnet18() -> ResNet:
    """ResNet-18 (random init)."""
    return ResNet(BasicBlock, (2, 2, 2, 2))


def wide_resnet50_2() -> ResNet:
    """Wide-ResNet-50-2: ResNet-50 with bottlenecks twice as wide inside (random init)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width_factor=2)
