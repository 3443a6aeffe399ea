"""SqueezeNet 1.1 (Iandola et al., 2016), the lean extractor of DifferSqueezeNet.

Module names follow torchvision's ``squeezenet1_1`` (``features.N``, ``squeeze``, ``expand1x1``,
``expand3x3``) so its published ImageNet checkpoint loads from a local file (``--weights``); the
classifier is left out. SqueezeNet has no stride-32 stage: its four stages end at strides 2, 4, 8, 16.
"""

import torch
from torch import Tensor, nn

from edgead.backbones.base import init_conv_weights


class Fire(nn.Module):
    """1x1 squeeze, then 1x1 and 3x3 expands side by side, concatenated (each followed by a ReLU)."""

    def __init__(self, in_channels: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], dim=1
        )


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(3, stride=2, ceil_mode=True)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 trunk without the classifier.

    Stages: [conv 3x3/2 + ReLU (s2, 64ch), pool + fire 2-3 (s4, 128ch), pool + fire 4-5 (s8, 256ch),
    pool + fire 6-9 (s16, 512ch)].
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(inplace=True),
            _pool(), Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
            _pool(), Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
            _pool(), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )  # fmt: skip
        self.stage_strides: list[int] = [2, 4, 8, 16]
        self.stage_channels: list[int] = [64, 128, 256, 512]
        self._bounds = (0, 2, 5, 8, 13)  # features[bounds[i]:bounds[i + 1]] is stage i
        init_conv_weights(self)

    @property
    def stages(self) -> nn.ModuleList:
        """Slices of ``features`` (built on access, not registered, so keys stay torchvision's)."""
        b = self._bounds
        return nn.ModuleList([self.features[b[i] : b[i + 1]] for i in range(len(b) - 1)])

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def squeezenet1_1() -> SqueezeNet:
    """SqueezeNet 1.1 (random init)."""
    return SqueezeNet()
