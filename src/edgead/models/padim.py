"""PaDiM (Defard et al., ICPR 2020): one multivariate Gaussian per feature-map position.

A test patch is scored by its Mahalanobis distance to the Gaussian of its position. A seeded random
subset of channels keeps the covariance matrices small, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from edgead.errors import DatasetError
from edgead.models.base import Head
from edgead.validation import NonNegativeFloat, Seed, check_memory, hyperparameters


class Padim(Head):
    """Gaussian-per-position head. ``n_features`` channels are kept (all if None or larger than C).

    ``storage`` is the precision the fitted mean and inverse covariance are kept in (run folder and
    exported file); they are computed in float64 and used in float32 either way. float16 halves the
    Gaussians (20.7 MB instead of 41.4 MB at 100 channels and 256 px) at no measured AUROC change on
    the four shared datasets (docs/results/padim_storage.md).
    """

    name: ClassVar[str] = "padim"
    fitted_buffers: ClassVar[tuple[str, ...]] = ("channel_index_", "mean_", "cov_inv_")

    @hyperparameters
    def __init__(
        self,
        n_features: Annotated[int, Field(ge=1, le=4096)] | None = 100,
        epsilon: NonNegativeFloat = 0.01,
        seed: Seed = 0,
        storage: Literal["float16", "float32"] = "float16",
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.epsilon = epsilon
        self.seed = seed
        self.storage = storage

    def hyperparameters(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "epsilon": self.epsilon, "seed": self.seed, "storage": self.storage}

    def check_sizes(self, image_size: int, backbone: nn.Module | None = None) -> None:
        """The float64 covariances (running scatter, batch scatter, inverse) of every position must fit."""
        if backbone is None:
            return
        channels = min(self.n_features or backbone.out_channels, backbone.out_channels)
        positions = (image_size // backbone.stride) ** 2
        check_memory(
            f"bad hyperparameter for model 'padim': n_features {self.n_features} ({channels} channels kept) at "
            f"image size {image_size} ({positions} positions)",
            3 * positions * channels**2 * 8,
            "use a smaller n_features or image size",
        )

    def fit(self, features: torch.Tensor, progress: bool = False) -> Padim:
        return self.fit_stream(features.split(16), len(features), progress=progress)

    def fit_stream(self, batches: Iterable[torch.Tensor], total: int, progress: bool = False) -> Padim:
        """Mean and covariance per position from feature batches, merged batch by batch.

        Only running statistics are held (float64, Chan et al.'s pairwise update), so memory stays
        bounded and time grows linearly with the number of training images.
        """
        channel_index: torch.Tensor | None = None
        n = 0
        mean = scatter = None
        for features in batches:
            c = features.shape[1]
            if channel_index is None:
                channel_index = self.choose_channels(c)
            x = features[:, channel_index].double().flatten(2).permute(2, 0, 1)  # [h*w, B, d]
            b = x.shape[1]
            batch_mean = x.mean(dim=1)
            centred = x - batch_mean[:, None, :]
            batch_scatter = centred.transpose(1, 2) @ centred
            if mean is None:
                mean, scatter = batch_mean, batch_scatter
            else:
                delta = batch_mean - mean
                scatter = scatter + batch_scatter + delta[:, :, None] * delta[:, None, :] * (n * b / (n + b))
                mean = mean + delta * (b / (n + b))
            n += b
        if n < 2:
            raise DatasetError(
                "PaDiM needs at least 2 training images (after the validation split) to estimate a covariance"
            )
        cov = scatter / (n - 1)
        cov += self.epsilon * torch.eye(len(channel_index), dtype=cov.dtype)
        cov_inv = torch.linalg.inv(cov)
        dtype = torch.float16 if self.storage == "float16" else torch.float32
        self.set_fitted(channel_index_=channel_index, mean_=mean.to(dtype), cov_inv_=cov_inv.to(dtype))
        return self

    def on_fitted(self) -> None:
        # The Gaussians in float32 once, not at every forward (a float16 -> float32 copy of 10M values);
        # non-persistent buffers: constants of the model (budgets, export), never saved twice.
        self.register_buffer("float32_mean", self.mean_.float(), persistent=False)
        self.register_buffer("float32_cov_inv", self.cov_inv_.float(), persistent=False)

    def choose_channels(self, c: int) -> torch.Tensor:
        """The seeded random subset of ``n_features`` channels (all of them if that is not fewer)."""
        if self.n_features is None or self.n_features >= c:
            return torch.arange(c)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(c, generator=generator)[: self.n_features].sort().values

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        n, _, h, w = features.shape
        x = features.index_select(1, self.channel_index_).flatten(2).permute(2, 0, 1)  # [h*w, N, d]
        if getattr(self, "float32_cov_inv", None) is None:
            self.on_fitted()
        delta = x - self.float32_mean[:, None, :]
        squared = ((delta @ self.float32_cov_inv) * delta).sum(dim=2)  # [h*w, N]
        return squared.clamp_min(0).sqrt().permute(1, 0).reshape(n, 1, h, w)
