"""Postprocess: patch scores -> anomaly map at input size -> image score.

Written as fixed 4D convolutions so that the same module exports to one static graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """A normalised 1D Gaussian, truncated at 4 sigma (the usual PatchCore/anomalib choice)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


class Postprocess(nn.Module):
    """Upsample patch scores to the input size and smooth them with a Gaussian (sigma 4 by default).

    The blur is two separable convolutions with reflect padding, so the map's border is not pulled
    towards zero.
    """

    def __init__(self, image_size: int, sigma: float = 4.0) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.sigma = float(sigma)
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.radius = kernel.numel() // 2
        self.register_buffer("kernel_x", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_y", kernel.view(1, 1, -1, 1), persistent=False)

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        amap = F.interpolate(patch_scores, size=size, mode="bilinear", align_corners=False)
        if self.radius > 0:
            r = self.radius
            amap = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="reflect"), self.kernel_x)
            amap = F.conv2d(F.pad(amap, (0, 0, r, r), mode="reflect"), self.kernel_y)
        return amap


def max_score(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Image score = the map's maximum, one value per image."""
    return torch.amax(anomaly_map, dim=(1, 2, 3))
