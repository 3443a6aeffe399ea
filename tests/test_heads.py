"""PatchCore and PaDiM heads on hand-made features, where the right answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgead.models import Padim, PatchCore, create_head
from edgead.models.patchcore import ChunkedCoreset, NearestNeighbourIndex, exact_search, greedy_coreset
from edgead.models.postprocess import Postprocess, gaussian_kernel1d


def normal_features(n: int = 20, c: int = 16, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g) * 0.1


def test_greedy_coreset_covers_every_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    chosen = greedy_coreset(points, 4, projection_dim=128, seed=0)
    clusters = {int(i) // 50 for i in chosen}
    assert clusters == {0, 1, 2, 3}


def test_chunked_coreset_covers_rare_clusters_in_every_chunk_and_keeps_the_ratio():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(3000, 8, generator=g) * 0.1
    rare = torch.randn(6, 8, generator=g) * 0.1 + 20.0  # 6 far-away patches hidden in a large pool
    pool = torch.cat([common[:1000], rare[:3], common[1000:], rare[3:]])
    coreset = ChunkedCoreset(ratio=0.02, chunk_size=500, projection_dim=4, seed=0)
    for part in pool.split(77):  # batch boundaries that do not match chunk boundaries
        coreset.add(part)
        assert coreset._buffered < 500  # never holds more than one chunk
    bank = coreset.finish()
    assert len(bank) == round(0.02 * len(pool))
    # Every rare patch is selected or has a selected rare neighbour (each chunk covers its outliers).
    assert torch.cdist(rare, bank).min(dim=1).values.max() < 1.0


def test_chunked_coreset_does_not_depend_on_batching():
    pool = normal_features(n=30).permute(0, 2, 3, 1).reshape(-1, 16)
    one, many = (ChunkedCoreset(0.05, 700, projection_dim=8, seed=3) for _ in range(2))
    one.add(pool)
    for part in pool.split(100):
        many.add(part)
    assert torch.equal(one.finish(), many.finish())


def test_patchcore_bank_stays_within_max_bank_size():
    head = PatchCore(coreset_ratio=0.5, max_bank_size=100, chunk_size=256).fit(normal_features(n=20))
    assert len(head.memory_bank_) == 100


def test_padim_streamed_statistics_equal_the_batch_ones():
    features = normal_features(n=37, c=6, h=3, w=2) + torch.linspace(0, 5, 37).view(37, 1, 1, 1)
    streamed = Padim(n_features=None, epsilon=0.0, storage="float32").fit_stream(features.split(5), len(features))
    x = features.double().flatten(2).permute(2, 1, 0)  # [positions, C, N]
    for pos in range(6):
        cov = torch.cov(x[pos])
        assert torch.allclose(streamed.mean_[pos].double(), x[pos].mean(dim=1), atol=1e-6)
        assert torch.allclose(streamed.cov_inv_[pos].double(), torch.linalg.inv(cov), rtol=1e-4, atol=1e-3)


def test_hnsw_index_finds_nearly_every_exact_neighbour_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(3000, 24, generator=g), torch.randn(500, 24, generator=g)
    exact_dist, exact_idx = NearestNeighbourIndex(bank, "flat").search(queries, 1)
    dist, idx = NearestNeighbourIndex(bank, "hnsw").search(queries, 1)
    assert (idx == exact_idx).float().mean() > 0.97
    # The distance returned is the true distance of the neighbour found: never below the exact one.
    assert torch.allclose(dist, torch.linalg.vector_norm(bank[idx[:, 0]] - queries, dim=1)[:, None], atol=1e-4)
    assert torch.all(dist >= exact_dist - 1e-4)
    again_dist, again_idx = NearestNeighbourIndex(bank, "hnsw").search(queries, 1)
    assert torch.equal(idx, again_idx) and torch.equal(dist, again_dist)


def test_exact_search_block_gives_the_exported_kNN():
    head = PatchCore(coreset_ratio=0.25).fit(normal_features())
    test = normal_features(n=2, seed=5)
    with exact_search(head):
        exact = head(test)
    reference = torch.cdist(head.to_patches(test), head.memory_bank_).min(dim=1).values
    assert torch.allclose(exact.flatten(), reference, atol=1e-4)
    assert torch.all(head(test).flatten() >= reference - 1e-4)  # HNSW: the same or a farther neighbour


def test_nearest_neighbour_index_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 24, generator=g), torch.randn(40, 24, generator=g)
    dist, idx = NearestNeighbourIndex(bank).search(queries, 3)
    ref_dist, ref_idx = torch.cdist(queries, bank).topk(3, largest=False)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(dist, ref_dist, atol=1e-4)


@pytest.mark.parametrize("head", [PatchCore(coreset_ratio=0.25), Padim(n_features=8)])
def test_head_localises_an_outlier_patch(head):
    head.fit(normal_features())
    test = normal_features(n=2, seed=1)
    test[1, :, 5, 2] += 3.0  # one clearly abnormal patch in the second image
    scores = head(test)
    assert scores.shape == (2, 1, 8, 8)
    assert torch.argmax(scores[1, 0]).item() == 5 * 8 + 2
    assert scores[1].max() > 5 * scores[0].max()


def test_patchcore_bank_size_and_reweighting():
    head = PatchCore(coreset_ratio=0.1, num_neighbours=5, image_score="reweighted").fit(normal_features())
    assert head.memory_bank_.shape == (128, 16)
    assert head.bank_neighbours_.shape == (128, 5)
    # Each bank entry is its own nearest neighbour.
    assert torch.equal(head.bank_neighbours_[:, 0], torch.arange(128))
    test = normal_features(n=3, seed=2)
    test[2, :, 1, 1] += 2.0
    patch_scores = head(test)
    image_scores = head.image_scores(test, patch_scores)
    raw_max = patch_scores.flatten(1).max(1).values
    assert torch.all(image_scores > 0) and torch.all(image_scores <= raw_max)
    assert torch.argmax(image_scores).item() == 2


def test_patchcore_default_image_score_is_the_maps_maximum():
    from edgead.models import create_pipeline

    pipeline = create_pipeline("patchcore", pretrained=False, image_size=64)
    pipeline.head.fit(pipeline.features(torch.rand(3, 3, 64, 64)))
    maps, scores = pipeline.predict(torch.rand(2, 3, 64, 64))
    assert torch.equal(scores, maps.flatten(1).max(dim=1).values)
    assert len(pipeline.head.bank_neighbours_) == 0  # only the reweighting needs them


def test_unfitted_head_and_bad_hyperparameters():
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCore()(normal_features(n=1))
    with pytest.raises(ValueError):
        PatchCore(coreset_ratio=0)
    from edgead.errors import EdgeadError

    with pytest.raises(EdgeadError, match="unknown model"):
        create_head("nope")
    with pytest.raises(EdgeadError, match="bad hyperparameter"):
        create_head("padim", coreset_ratio=0.1)


def reference_postprocess(patch_scores: torch.Tensor, image_size: int, sigma: float) -> torch.Tensor:
    """Upsample then blur, written out as two separable reflect-padded convolutions."""
    kernel = gaussian_kernel1d(sigma)
    r = kernel.numel() // 2
    amap = F.interpolate(patch_scores, size=(image_size, image_size), mode="bilinear", align_corners=False)
    amap = F.conv2d(F.pad(amap, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(amap, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, -1, 1))


def test_postprocess_matrices_equal_upsampling_then_blurring():
    scores = torch.rand(3, 1, 32, 32)
    post = Postprocess(image_size=256, sigma=4.0)
    assert torch.allclose(post(scores), reference_postprocess(scores, 256, 4.0), atol=1e-6)
    wide = torch.rand(1, 1, 8, 12)  # non-square grids use one matrix per axis
    assert post(wide).shape == (1, 1, 256, 256)


def test_postprocess_upsamples_and_blurs_without_losing_mass():
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33 and abs(kernel.sum().item() - 1) < 1e-6
    post = Postprocess(image_size=64, sigma=4.0)
    patch = torch.zeros(1, 1, 8, 8)
    patch[0, 0, 4, 4] = 1.0
    amap = post(patch)
    assert amap.shape == (1, 1, 64, 64)
    peak = torch.nonzero(amap[0, 0] == amap.max())[0]
    assert 32 <= peak[0] <= 40 and 32 <= peak[1] <= 40  # stays where the anomalous patch was
    assert amap.max() < 1.0  # smoothed
