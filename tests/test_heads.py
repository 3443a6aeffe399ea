"""PatchCore and PaDiM heads on hand-made features, where the right answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgead.models import Padim, PatchCore, create_head
from edgead.models.patchcore import NearestNeighbourIndex, greedy_coreset
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
    head = PatchCore(coreset_ratio=0.1, num_neighbours=5).fit(normal_features())
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


def test_unfitted_head_and_bad_hyperparameters():
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCore()(normal_features(n=1))
    with pytest.raises(ValueError):
        PatchCore(coreset_ratio=0)
    from edgead.errors import EdgeadError

    with pytest.raises(EdgeadError, match="unknown model"):
        create_head("nope")
    with pytest.raises(EdgeadError, match="bad hyperparameters"):
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
