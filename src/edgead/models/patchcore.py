"""PatchCore (Roth et al., CVPR 2022): a memory bank of normal patch features, scored by kNN.

Locally aware patch features come from the backbone (3x3 aggregation, two stages at one stride).
The bank is subsampled by greedy k-center coreset selection on a random projection, test patches
are scored by their distance to the nearest bank entry (faiss), and the image score is the
largest patch score reweighted by how dense the bank is around its nearest neighbour.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from edgead.models.base import Head
from edgead.progress import progress as progress_bar


def greedy_coreset(
    features: torch.Tensor, n_select: int, projection_dim: int = 128, seed: int = 0, progress: bool = False
) -> torch.Tensor:
    """Indices of ``n_select`` rows chosen by greedy k-center (farthest-point) selection.

    Distances are computed on a Johnson-Lindenstrauss random projection to ``projection_dim``
    dimensions, which keeps the selection close to exact while making each step cheap.
    """
    n_total = features.shape[0]
    if n_select >= n_total:
        return torch.arange(n_total)
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if points.shape[1] > projection_dim:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection
    squared_norms = (points**2).sum(1)

    def squared_distances_to(row: int) -> torch.Tensor:
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product, no [M, d] temporary.
        return squared_norms - 2 * (points @ points[row]) + squared_norms[row]

    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = int(torch.randint(n_total, (1,), generator=generator))
    min_dist = squared_distances_to(int(selected[0]))
    for i in progress_bar(range(1, n_select), "coreset", progress):
        selected[i] = torch.argmax(min_dist)
        torch.minimum(min_dist, squared_distances_to(int(selected[i])), out=min_dist)
    return selected


class NearestNeighbourIndex:
    """Exact L2 nearest-neighbour search over the memory bank: faiss when installed, else torch."""

    def __init__(self, bank: torch.Tensor) -> None:
        self.bank = bank.float().contiguous()
        try:
            import faiss
        except ImportError:  # pragma: no cover - faiss is a dependency, torch is the fallback
            self.index = None
        else:
            self.index = faiss.IndexFlatL2(self.bank.shape[1])
            self.index.add(self.bank.numpy())

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances and indices of the k nearest bank rows, each [Q, k]."""
        queries = queries.float().contiguous()
        if self.index is not None:
            dist2, idx = self.index.search(queries.numpy(), k)
            return torch.from_numpy(np.sqrt(np.maximum(dist2, 0))), torch.from_numpy(idx).long()
        dist, idx = torch.cdist(queries, self.bank).topk(k, dim=1, largest=False)
        return dist, idx


class PatchCore(Head):
    """Memory-bank head. ``coreset_ratio`` trades accuracy for kNN latency and run-folder size."""

    name: ClassVar[str] = "patchcore"
    fitted_buffers: ClassVar[tuple[str, ...]] = ("memory_bank_", "bank_neighbours_")

    def __init__(
        self,
        coreset_ratio: float = 0.02,
        max_bank_size: int = 20000,
        num_neighbours: int = 9,
        projection_dim: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.num_neighbours = num_neighbours
        self.projection_dim = projection_dim
        self.seed = seed
        self._index: NearestNeighbourIndex | None = None

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "max_bank_size": self.max_bank_size,
            "num_neighbours": self.num_neighbours,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
        }

    @staticmethod
    def to_patches(features: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] -> [N*h*w, C]."""
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    def fit(self, features: torch.Tensor, progress: bool = False) -> PatchCore:
        patches = self.to_patches(features)
        n_select = min(self.max_bank_size, max(1, int(round(len(patches) * self.coreset_ratio))))
        selected = greedy_coreset(patches, n_select, self.projection_dim, self.seed, progress=progress)
        bank = patches[selected].contiguous()
        # Each bank entry's neighbours in the bank (itself first), for the image-score reweighting.
        k = min(self.num_neighbours, len(bank))
        _, neighbours = NearestNeighbourIndex(bank).search(bank, k)
        self.set_fitted(memory_bank_=bank, bank_neighbours_=neighbours)
        return self

    def on_fitted(self) -> None:
        self._index = NearestNeighbourIndex(self.memory_bank_)

    def _search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest bank entry of each query: faiss when running, a matrix product while exporting.

        The exported form (|q|^2 - 2 q.m + |m|^2, then min) keeps the bank inside the ONNX graph as a
        constant and gives the same neighbours as the exact faiss search. Both sides are centred on the
        bank's mean first: smaller norms, less float32 cancellation in the small distances.
        """
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            centre = self.memory_bank_.mean(dim=0, keepdim=True)
            bank, queries = self.memory_bank_ - centre, queries - centre
            squared = (queries * queries).sum(1, keepdim=True) - 2 * queries @ bank.T + (bank * bank).sum(1)
            best, idx = squared.min(dim=1)
            return best.clamp_min(0).sqrt(), idx
        if self._index is None:
            self.on_fitted()
        dist, idx = self._index.search(queries, 1)
        return dist[:, 0], idx[:, 0]

    def _nearest(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, each patch's nearest bank entry, both [N, h, w]."""
        self.check_fitted()
        n, _, h, w = features.shape
        dist, idx = self._search(self.to_patches(features))
        return dist.view(n, h, w), idx.view(n, h, w)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        dist, _ = self._nearest(features)
        return dist.unsqueeze(1)

    def external_macs(self, features_shape: tuple[int, ...]) -> int:
        """The exact kNN search runs in faiss, outside torch: patches x bank entries x channels."""
        n, c, h, w = features_shape
        return n * h * w * len(self.memory_bank_) * c if self.memory_bank_ is not None else 0

    def image_scores(self, features: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor:
        """The paper's reweighted max patch score: s = (1 - softmax(d to N_b(m*))[m*]) * s*."""
        n, c, h, w = features.shape
        flat_scores = patch_scores.view(n, -1)
        best = flat_scores.argmax(dim=1)
        s_star = flat_scores.gather(1, best[:, None]).squeeze(1)
        patches = self.to_patches(features).view(n, h * w, c)
        test_patch = patches.gather(1, best.view(n, 1, 1).expand(n, 1, c)).squeeze(1)  # [N, C]
        _, idx = self._search(test_patch)
        support = self.bank_neighbours_[idx]  # [N, k], m* first
        dists = torch.linalg.vector_norm(self.memory_bank_[support] - test_patch[:, None, :], dim=2)
        weights = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weights * s_star
