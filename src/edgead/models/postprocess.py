"""Postprocess: patch scores -> anomaly map at input size -> image score.

Written as fixed 4D convolutions so that the same module exports to one static graph.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """A normalised 1D Gaussian, truncated at 4 sigma (the usual PatchCore/anomalib choice)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def resize_blur_matrix(n: int, size: int, kernel: np.ndarray) -> np.ndarray:
    """[size, n]: bilinear upsampling of n values to ``size`` (align_corners=False, as torch does it),
    then a convolution with the odd, symmetric ``kernel`` over reflect-padded ends, along one axis."""
    matrix = np.zeros((size, n))
    source = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), n - 1)
    high = np.minimum(low + 1, n - 1)
    weight = source - low
    np.add.at(matrix, (np.arange(size), low), 1 - weight)
    np.add.at(matrix, (np.arange(size), high), weight)
    radius = len(kernel) // 2
    if radius:
        padded = np.pad(matrix, ((radius, radius), (0, 0)), mode="reflect")
        matrix = sum(k * padded[i : i + size] for i, k in enumerate(kernel))
    return matrix.astype(np.float32)


class Postprocess(nn.Module):
    """Upsample patch scores to the input size and smooth them with a Gaussian (sigma 4 by default).

    Bilinear upsampling (align_corners=False) and a Gaussian blur with reflect padding are both linear
    and separable, so together they are one matrix per axis: ``map = A_h @ scores @ A_w^T`` with
    ``A = blur @ upsample`` of shape [S, h]. Two small matrix products replace a full-size two-pass
    convolution (33 taps per pixel and pass at sigma 4): the same map to float rounding, ~10x fewer
    multiply-accumulates, and a static 4D graph (MatMul with constant [1, 1, S, h] operands).
    Reflect padding keeps the map's border from being pulled towards zero. ``grid`` (the patch-score
    grid side, when known) builds its matrix up front; other grid sizes get theirs on first use.
    """

    def __init__(self, image_size: int, sigma: float = 4.0, grid: int | None = None) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.sigma = float(sigma)
        self.kernel = gaussian_kernel1d(sigma).numpy() if sigma > 0 else np.ones(1, np.float32)
        self.radius = len(self.kernel) // 2
        if grid:
            self.axis_matrix(grid)

    def axis_matrix(self, n: int) -> torch.Tensor:
        """[1, 1, S, n]: upsampling n values to S = image_size, then the Gaussian blur, along one axis."""
        name = f"axis_matrix_{n}"
        if getattr(self, name, None) is None:
            matrix = torch.from_numpy(resize_blur_matrix(n, self.image_size, self.kernel))
            self.register_buffer(name, matrix.view(1, 1, self.image_size, n), persistent=False)
        return getattr(self, name)

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        h, w = (int(n) for n in patch_scores.shape[-2:])
        return torch.matmul(
            torch.matmul(self.axis_matrix(h), patch_scores), self.axis_matrix(w).transpose(2, 3)
        )


def max_score(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Image score = the map's maximum, one value per image."""
    return torch.amax(anomaly_map, dim=(1, 2, 3))
