"""The SimCLR baseline: its loss and views behave, and a short fit gives a working PatchCore on its features."""

from __future__ import annotations

from pathlib import Path

import torch

from edgead.models.simclr.train import nt_xent, simclr_view


def test_nt_xent_prefers_matching_partners():
    z = torch.randn(8, 16)
    matched = nt_xent(z, z + 0.01 * torch.randn_like(z), temperature=0.5)
    shuffled = nt_xent(z, z[torch.randperm(8)], temperature=0.5)
    assert matched < shuffled
    assert matched > 0


def test_views_are_crops_in_range_and_differ():
    images = torch.rand(4, 3, 64, 64)
    generator = torch.Generator().manual_seed(0)
    a, b = simclr_view(images, 32, generator), simclr_view(images, 32, generator)
    assert a.shape == (4, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, b)


def test_simclr_trains_and_scores_with_its_memory_bank(synthetic_dataset: Path, tmp_path: Path):
    from edgead.runs import load_run
    from edgead.training import fit_run

    run = tmp_path / "simclr"
    pipeline, _ = fit_run(
        synthetic_dataset, run, model="simclr", image_size=128, progress=False,
        hyperparameters={"steps": 30, "batch_size": 8, "crop": 64, "dim": 32, "width": 8},
    )  # fmt: skip
    history = pipeline.head.history_
    assert history[-1]["loss"] < history[0]["loss"]
    assert pipeline.head.memory_bank_.shape[1] == 32  # the bank holds the learned features, not ImageNet ones
    loaded, _ = load_run(run)
    images = torch.rand(2, 3, 128, 128)
    torch.testing.assert_close(loaded.predict(images)[1], pipeline.predict(images)[1])
