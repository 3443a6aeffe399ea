"""PatchCore (Roth et al., CVPR 2022): a memory bank of normal patch features, scored by kNN.

Locally aware patch features come from the backbone (3x3 aggregation, two stages at one stride).
The bank is subsampled by greedy k-center coreset selection on a random projection (chunk by chunk,
so that fitting takes time linear in the number of training images), test patches
are scored by their distance to the nearest bank entry (faiss), and the image score is the
largest patch score reweighted by how dense the bank is around its nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from edgead.errors import DatasetError
from edgead.models.base import Head
from edgead.progress import progress as progress_bar
from edgead.validation import BankSize, Ratio, Seed, hyperparameters


def random_projection(dim: int, projection_dim: int, generator: torch.Generator) -> torch.Tensor | None:
    """A Johnson-Lindenstrauss projection [dim, projection_dim], or None when it would not shrink."""
    if dim <= projection_dim:
        return None
    return torch.randn(dim, projection_dim, generator=generator) / projection_dim**0.5


def farthest_points(
    points: torch.Tensor, n_select: int, generator: torch.Generator, progress: bool = False
) -> torch.Tensor:
    """Indices of ``n_select`` rows of ``points`` chosen by greedy k-center (farthest-point) selection."""
    n_total = points.shape[0]
    if n_select >= n_total:
        return torch.arange(n_total)
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


def greedy_coreset(
    features: torch.Tensor, n_select: int, projection_dim: int = 128, seed: int = 0, progress: bool = False
) -> torch.Tensor:
    """Indices of ``n_select`` rows chosen by greedy k-center selection over the whole of ``features``.

    Distances are computed on a Johnson-Lindenstrauss random projection to ``projection_dim``
    dimensions, which keeps the selection close to exact while making each step cheap. Each selected
    row costs one pass over all rows: use :class:`ChunkedCoreset` for large pools.
    """
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    projection = random_projection(points.shape[1], projection_dim, generator)
    if projection is not None:
        points = points @ projection
    return farthest_points(points, n_select, generator, progress=progress)


class ChunkedCoreset:
    """Greedy k-center selection over a stream of patches, one chunk of ``chunk_size`` patches at a time.

    The bank is the union of the coresets of consecutive chunks, each chunk keeping ``ratio`` of its
    patches. A greedy coreset of the whole pool makes one pass over the pool per selected entry, so its
    cost grows with (pool size) x (bank size), quadratically in the number of training images; per chunk
    it is (chunk size) x (chunk's share of the bank), so the total grows linearly, the memory held is one
    chunk plus the bank, and a chunk's projection (``chunk_size`` x ``projection_dim`` floats) stays in
    cache. Feed the patches of images in a random order so that every chunk is a random sample of
    images (``edgead fit`` shuffles them).
    """

    def __init__(self, ratio: float, chunk_size: int, projection_dim: int = 128, seed: int = 0) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.ratio = ratio
        self.chunk_size = chunk_size
        self.projection_dim = projection_dim
        self.generator = torch.Generator().manual_seed(seed)
        self._projection: torch.Tensor | None = None
        self._projection_made = False
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self._selected: list[torch.Tensor] = []
        self._seen = 0
        self._kept = 0

    def add(self, patches: torch.Tensor) -> None:
        """Take patches [M, C]; selects from every chunk as soon as it is full."""
        patches = patches.float()
        while len(patches):
            take = min(len(patches), self.chunk_size - self._buffered)
            self._buffer.append(patches[:take])
            self._buffered += take
            patches = patches[take:]
            if self._buffered == self.chunk_size:
                self._select_buffer()

    def finish(self) -> torch.Tensor:
        """The selected patches [K, C] of every chunk, the last (partial) one included."""
        if self._buffered:
            self._select_buffer()
        if not self._selected:
            raise ValueError("no patches were added to the coreset")
        return torch.cat(self._selected)

    def _select_buffer(self) -> None:
        chunk = torch.cat(self._buffer)
        self._buffer, self._buffered = [], 0
        if not self._projection_made:
            self._projection = random_projection(chunk.shape[1], self.projection_dim, self.generator)
            self._projection_made = True
        points = chunk @ self._projection if self._projection is not None else chunk
        # Rounded on the running total, so the bank holds round(ratio x patches seen), never more.
        self._seen += len(chunk)
        n_select = int(round(self._seen * self.ratio)) - self._kept
        if n_select < 1 and self._kept:
            return
        n_select = max(1, n_select)
        self._kept += n_select
        self._selected.append(chunk[farthest_points(points, n_select, self.generator)].clone())


KNN_METHODS: tuple[str, ...] = ("hnsw", "flat")


class NearestNeighbourIndex:
    """L2 nearest-neighbour search over the memory bank.

    ``"flat"`` is exact (faiss ``IndexFlatL2``; torch when faiss is missing). ``"hnsw"`` is faiss's
    graph index (``IndexHNSWFlat``): with a 20,000-entry bank it searches an image's 1024 patches several
    times faster than the exact search at a recall@1 above 0.999 (docs/results/patchcore_knn.md). It
    returns the exact distance of the neighbour it finds, so a miss can only raise a patch score. The
    graph is built single-threaded, so the same bank always gives the same graph and the same scores.
    """

    def __init__(
        self, bank: torch.Tensor, method: str = "flat", hnsw_neighbours: int = 32, ef_search: int = 32
    ) -> None:
        if method not in KNN_METHODS:
            raise ValueError(f"knn must be one of {', '.join(KNN_METHODS)}, got {method!r}")
        self.bank = bank.float().contiguous()
        self.method = method
        try:
            import faiss
        except ImportError:  # pragma: no cover - faiss is a dependency, torch is the fallback
            self.index = None
            return
        dim = self.bank.shape[1]
        if method == "flat":
            self.index = faiss.IndexFlatL2(dim)
            self.index.add(self.bank.numpy())
            return
        self.index = faiss.IndexHNSWFlat(dim, hnsw_neighbours)
        self.index.hnsw.efConstruction = 64
        self.index.hnsw.efSearch = ef_search
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # parallel insertion would make the graph depend on thread timing
        try:
            self.index.add(self.bank.numpy())
        finally:
            faiss.omp_set_num_threads(threads)

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances and indices of the k nearest bank rows (as found), each [Q, k]."""
        queries = queries.float().contiguous()
        if self.index is None:
            dist, idx = torch.cdist(queries, self.bank).topk(k, dim=1, largest=False)
            return dist, idx
        dist2, idx = self.index.search(queries.numpy(), k)
        idx = torch.from_numpy(idx).long()
        if self.method == "flat":
            return torch.from_numpy(np.sqrt(np.maximum(dist2, 0))), idx
        idx = idx.clamp_min(0)  # -1 only if the graph returns fewer than k entries (k > bank size)
        return torch.linalg.vector_norm(self.bank[idx] - queries[:, None, :], dim=2), idx


@contextmanager
def exact_search(head: Head) -> Iterator[None]:
    """Inside this block a PatchCore head searches exactly, as its exported graph does (parity checks)."""
    previous = getattr(head, "_exact", None)
    if previous is None:
        yield
        return
    head._exact = True
    try:
        yield
    finally:
        head._exact = previous


class PatchCore(Head):
    """Memory-bank head. ``coreset_ratio`` trades accuracy for kNN latency and run-folder size.

    Defaults: a 10% coreset (at most 20,000 entries, PatchCore's and anomalib's ratio; 2% cost screw 7
    points), faiss HNSW search with exact maxima, the anomaly map's maximum as the image score.
    ``bank_size`` (None: off) reduces the fitted bank to that many entries by a second greedy coreset
    over the whole bank: a smaller bank for a small device (the IMX500 holds the default bank, 6.3 MB of its
    8 MB; 4096 entries use 3.9 MB).
    """

    name: ClassVar[str] = "patchcore"
    fitted_buffers: ClassVar[tuple[str, ...]] = ("memory_bank_", "bank_neighbours_")

    @hyperparameters
    def __init__(
        self,
        coreset_ratio: Ratio = 0.1,
        max_bank_size: BankSize = 20000,
        num_neighbours: Annotated[int, Field(ge=1, le=1000)] = 9,
        projection_dim: Annotated[int, Field(ge=1, le=4096)] = 128,
        seed: Seed = 0,
        chunk_size: BankSize = 16384,
        knn: Literal["hnsw", "flat"] = "hnsw",
        ef_search: Annotated[int, Field(ge=1, le=4096)] = 16,
        hnsw_neighbours: Annotated[int, Field(ge=1, le=256)] = 32,
        image_score: Literal["map_max", "reweighted"] = "map_max",
        bank_size: BankSize | None = None,
    ) -> None:
        super().__init__()
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.num_neighbours = num_neighbours
        self.projection_dim = projection_dim
        self.seed = seed
        self.chunk_size = chunk_size
        self.knn = knn
        self.ef_search = ef_search
        self.hnsw_neighbours = hnsw_neighbours
        self.image_score = image_score
        self.bank_size = bank_size
        self._index: NearestNeighbourIndex | None = None
        self._exact = False  # see exact_search()

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "coreset_ratio": self.coreset_ratio,
            "max_bank_size": self.max_bank_size,
            "num_neighbours": self.num_neighbours,
            "projection_dim": self.projection_dim,
            "seed": self.seed,
            "chunk_size": self.chunk_size,
            "knn": self.knn,
            "ef_search": self.ef_search,
            "hnsw_neighbours": self.hnsw_neighbours,
            "image_score": self.image_score,
            "bank_size": self.bank_size,
        }

    @staticmethod
    def to_patches(features: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] -> [N*h*w, C]."""
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    def fit(self, features: torch.Tensor, progress: bool = False) -> PatchCore:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(self.seed))
        batches = (features[order[i : i + 16]] for i in range(0, len(features), 16))
        return self.fit_stream(batches, len(features), progress=progress)

    def fit_stream(self, batches: Iterable[torch.Tensor], total: int, progress: bool = False) -> PatchCore:
        """Fit from feature batches of ``total`` images in bounded memory (see :class:`ChunkedCoreset`).

        The bank keeps ``coreset_ratio`` of the patches, or fewer so that it stays within
        ``max_bank_size`` entries: the ratio is lowered up front from ``total``.
        """
        coreset: ChunkedCoreset | None = None
        for features in batches:
            if coreset is None:
                pool = total * features.shape[2] * features.shape[3]
                ratio = min(self.coreset_ratio, self.max_bank_size / pool)
                coreset = ChunkedCoreset(ratio, self.chunk_size, self.projection_dim, self.seed)
            coreset.add(self.to_patches(features))
        if coreset is None:
            raise DatasetError("PatchCore needs at least one training image")
        bank = coreset.finish().contiguous()
        if self.bank_size is not None and len(bank) > self.bank_size:
            # The same greedy k-center rule once more, over the whole bank: a smaller bank that still
            # covers every region of the pool.
            keep = greedy_coreset(bank, self.bank_size, self.projection_dim, self.seed, progress=progress)
            bank = bank[keep].contiguous()
        # Each bank entry's neighbours in the bank (itself first), for the image-score reweighting only.
        k = min(self.num_neighbours, len(bank))
        if self.image_score == "reweighted":
            _, neighbours = NearestNeighbourIndex(bank).search(bank, k)
        else:
            neighbours = torch.empty(0, k, dtype=torch.long)
        self.set_fitted(memory_bank_=bank, bank_neighbours_=neighbours)
        return self

    def on_fitted(self) -> None:
        self._index = NearestNeighbourIndex(
            self.memory_bank_, self.knn, hnsw_neighbours=self.hnsw_neighbours, ef_search=self.ef_search
        )
        centre = self.memory_bank_.mean(dim=0, keepdim=True)
        bank = self.memory_bank_ - centre
        # Non-persistent buffers: constants of the model (budgets see them as such), never saved.
        self.register_buffer("bank_centre", centre, persistent=False)
        self.register_buffer("centred_bank", bank, persistent=False)
        self.register_buffer("centred_bank_norms", (bank * bank).sum(1), persistent=False)

    def _search(self, queries: torch.Tensor, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest bank entry of each query: the faiss index when running, a matrix product when exact.

        The matrix-product form (|q|^2 - 2 q.m + |m|^2, then min) is what the exported graph computes,
        with the bank inside the ONNX graph as a constant; it is used while exporting, inside
        :func:`exact_search` and for ``exact=True``. Both sides are centred on the bank's mean first:
        smaller norms, less float32 cancellation in the small distances.
        """
        if self._traced():
            centre = self.memory_bank_.mean(dim=0, keepdim=True)
            bank, queries = self.memory_bank_ - centre, queries - centre
            squared = (queries * queries).sum(1, keepdim=True) - 2 * queries @ bank.T + (bank * bank).sum(1)
            best, idx = squared.min(dim=1)
            return best.clamp_min(0).sqrt(), idx
        if exact:  # the same computation, with the centred bank computed once
            if getattr(self, "centred_bank", None) is None:
                self.on_fitted()
            centre, bank, bank_squared = self.bank_centre, self.centred_bank, self.centred_bank_norms
            queries = queries - centre
            squared = (queries * queries).sum(1, keepdim=True) - 2 * queries @ bank.T + bank_squared
            best, idx = squared.min(dim=1)
            return best.clamp_min(0).sqrt(), idx
        if self._index is None:
            self.on_fitted()
        dist, idx = self._index.search(queries, 1)
        return dist[:, 0], idx[:, 0]

    def _nearest(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, each patch's nearest bank entry, both [N, h, w].

        With an approximate index, each image's largest distances are searched again exactly until its
        maximum is exact: a miss can only overestimate a distance, so the image's top patch (what the
        image score and the decision rest on) is then the exact search's, at the cost of a few queries.
        """
        self.check_fitted()
        n, c, h, w = features.shape
        queries = self.to_patches(features)
        dist, idx = self._search(queries)
        dist, idx = dist.view(n, h * w).clone(), idx.view(n, h * w).clone()
        if self._index is not None and self._index.method != "flat" and not self._traced():
            self._make_maxima_exact(queries.view(n, h * w, c), dist, idx, (h, w))
        return dist.view(n, h, w), idx.view(n, h, w)

    def _traced(self) -> bool:
        return self._exact or torch.jit.is_tracing() or torch.compiler.is_exporting()

    def _make_maxima_exact(
        self,
        queries: torch.Tensor,
        dist: torch.Tensor,
        idx: torch.Tensor,
        grid: tuple[int, int],
        step: int = 8,
    ) -> None:
        """Make each image's largest distance and its 3x3 neighbourhood exact (in place).

        The ``step`` largest unchecked distances are searched again exactly until the argmax is a checked
        one (a miss only overestimates, so that argmax is the exact search's); then its eight neighbours,
        whose values the blurred map mixes into its maximum (the image score), are checked too.
        """
        h, w = grid
        checked = torch.zeros_like(dist, dtype=torch.bool)
        for i in range(len(dist)):
            while not checked[i, dist[i].argmax()]:
                unchecked = dist[i].masked_fill(checked[i], float("-inf"))
                self._check(queries[i], dist[i], idx[i], checked[i], unchecked.topk(min(step, int((~checked[i]).sum()))).indices)
            top = int(dist[i].argmax())
            y, x = divmod(top, w)
            around = [(y + dy) * w + x + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                      if 0 <= y + dy < h and 0 <= x + dx < w]  # fmt: skip
            rows = torch.tensor([r for r in around if not checked[i, r]], dtype=torch.long)
            if len(rows):
                self._check(queries[i], dist[i], idx[i], checked[i], rows)

    def _check(
        self, queries: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor, checked: torch.Tensor, rows: torch.Tensor
    ) -> None:
        dist[rows], idx[rows] = self._search(queries[rows], exact=True)
        checked[rows] = True

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        dist, _ = self._nearest(features)
        return dist.unsqueeze(1)

    def image_scores(self, features: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor | None:
        """The maximum of the anomaly map (``image_score="map_max"``, the default: the score is where the
        heat map is reddest), or the paper's reweighted max patch score (``"reweighted"``):
        s = (1 - softmax(d to N_b(m*))[m*]) * s*. On the four shared datasets the map's maximum scores as
        well or better (docs/results/patchcore_defaults.md)."""
        if self.image_score == "map_max":
            return None
        if len(self.bank_neighbours_) != len(self.memory_bank_):
            raise RuntimeError("this PatchCore head was fitted without the reweighting's bank neighbours")
        n, c, h, w = features.shape
        flat_scores = patch_scores.view(n, -1)
        best = flat_scores.argmax(dim=1)
        s_star = flat_scores.gather(1, best[:, None]).squeeze(1)
        patches = self.to_patches(features).view(n, h * w, c)
        test_patch = patches.gather(1, best.view(n, 1, 1).expand(n, 1, c)).squeeze(1)  # [N, C]
        _, idx = self._search(test_patch, exact=True)
        support = self.bank_neighbours_[idx]  # [N, k], m* first
        dists = torch.linalg.vector_norm(self.memory_bank_[support] - test_patch[:, None, :], dim=2)
        weights = 1.0 - torch.softmax(dists, dim=1)[:, 0]
        return weights * s_star
