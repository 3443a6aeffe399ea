"""PaDiM (Defard et al., ICPR 2020): one multivariate Gaussian per feature-map position.

A test patch is scored by its Mahalanobis distance to the Gaussian of its position. A seeded random
subset of channels keeps the covariance matrices small, as in the paper.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from edgead.models.base import Head


class Padim(Head):
    """Gaussian-per-position head. ``n_features`` channels are kept (all if None or larger than C)."""

    name: ClassVar[str] = "padim"
    fitted_buffers: ClassVar[tuple[str, ...]] = ("channel_index_", "mean_", "cov_inv_")

    def __init__(self, n_features: int | None = 100, epsilon: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        self.n_features = n_features
        self.epsilon = epsilon
        self.seed = seed

    def hyperparameters(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "epsilon": self.epsilon, "seed": self.seed}

    def fit(self, features: torch.Tensor, progress: bool = False) -> Padim:
        n, c, h, w = features.shape
        if n < 2:
            raise ValueError("PaDiM needs at least 2 training images to estimate a covariance")
        if self.n_features is None or self.n_features >= c:
            channel_index = torch.arange(c)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            channel_index = torch.randperm(c, generator=generator)[: self.n_features].sort().values
        x = features[:, channel_index].double().flatten(2).permute(2, 0, 1)  # [h*w, N, d]
        mean = x.mean(dim=1)  # [h*w, d]
        centred = x - mean[:, None, :]
        cov = centred.transpose(1, 2) @ centred / (n - 1)
        cov += self.epsilon * torch.eye(len(channel_index), dtype=cov.dtype)
        cov_inv = torch.linalg.inv(cov)
        self.set_fitted(channel_index_=channel_index, mean_=mean.float(), cov_inv_=cov_inv.float())
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        n, _, h, w = features.shape
        x = features.index_select(1, self.channel_index_).flatten(2).permute(2, 0, 1)  # [h*w, N, d]
        delta = x - self.mean_[:, None, :]
        squared = ((delta @ self.cov_inv_) * delta).sum(dim=2)  # [h*w, N]
        return squared.clamp_min(0).sqrt().permute(1, 0).reshape(n, 1, h, w)
