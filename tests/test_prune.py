"""Structured channel pruning: exact slicing, config round trip, refit, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgead.backbones import count_parameters
from edgead.deploy.prune import keep_count, prune_pipeline, prune_run
from edgead.errors import EdgeadError
from edgead.models import create_pipeline


def tinyglass(image_size: int = 64, **kw):
    pipeline = create_pipeline("tinyglass", pretrained=False, image_size=image_size, **kw)
    c = pipeline.backbone.out_channels
    pipeline.head.set_fitted(feature_mean_=torch.zeros(1, c, 1, 1), feature_std_=torch.ones(1, c, 1, 1))
    return pipeline.eval()


def test_keep_count_rounds_to_multiples_of_8():
    assert keep_count(256, 0.5) == 128
    assert keep_count(256, 0.25) == 192
    assert keep_count(240, 0.5) == 120
    assert keep_count(672, 0.25) == 504
    assert keep_count(16, 0.9) == 8  # never below one group of 8


@torch.no_grad()
def test_pruning_dead_channels_changes_nothing():
    """Channels made inert (tiny BN gamma, no output) rank last, are the ones removed, and the output is unchanged."""
    pipeline = tinyglass()
    torch.manual_seed(0)
    for block in pipeline.backbone.stages[3]:
        hidden = block._bn0.num_features
        dead = torch.randperm(hidden)[: hidden - keep_count(hidden, 0.5)]
        block._bn0.weight[dead] = 1e-6
        block._bn0.bias[dead] = 0
        block._bn1.weight[dead] = 0  # the depthwise output of these channels is then 0 after BN + ReLU6
        block._bn1.bias[dead] = 0
    disc = pipeline.head.discriminator
    dead = torch.randperm(256)[:128]
    disc[1].weight[dead] = 1e-6
    disc[3].weight[:, dead] = 0
    images = torch.rand(2, 3, 64, 64)
    before = pipeline(images)
    pruned, summary = prune_pipeline(pipeline, 0.5)
    assert torch.allclose(pruned(images), before, atol=1e-6)
    assert summary["head_hidden"] == [256, 128]
    assert summary["backbone_blocks"]["10"] == [672, 336]
    assert summary["pruned_channels"]["backbone"] == {
        "5": 120,
        "6": 240,
        "7": 240,
        "8": 240,
        "9": 336,
        "10": 336,
    }
    assert summary["params_after"] == count_parameters(pruned) < 0.6 * count_parameters(pipeline)
    # Block outputs keep their channels: the stride-8 features (first 40 channels) are untouched.
    assert pruned.backbone.out_channels == 152


def test_bad_ratio_missing_run_and_unprunable_backbone(tmp_path: Path):
    pipeline = tinyglass()
    for ratio in (0, 1, -0.2, 1.5, float("nan")):
        with pytest.raises(EdgeadError, match="between 0 and 1"):
            prune_pipeline(pipeline, ratio)
    with pytest.raises(EdgeadError, match="between 0 and 1"):
        prune_run(tmp_path / "run", tmp_path / "out", 1.0)
    with pytest.raises(EdgeadError, match="does not exist"):
        prune_run(tmp_path / "missing", tmp_path / "out", 0.5)
    mobilenet = tinyglass(backbone="mobilenet_v2")
    with pytest.raises(EdgeadError, match="cannot be channel-pruned.*efficientnet_lite0"):
        prune_pipeline(mobilenet, 0.5)
    head_only, summary = prune_pipeline(mobilenet, 0.5, backbone=False)
    assert head_only.head.hidden == 128 and "backbone_blocks" not in summary
    padim = create_pipeline("padim", pretrained=False, image_size=64)
    with pytest.raises(EdgeadError, match="nothing to prune"):
        prune_pipeline(padim, 0.5, backbone=False)


def test_prune_a_tinyglass_run(tinyglass_run: Path, tmp_path: Path):
    from edgead.evaluation import evaluate_run
    from edgead.runs import load_run

    original, _ = load_run(tinyglass_run)
    # The pruned head is retrained from its pruned weights, for as many epochs as the first fit.
    pruned, config = prune_run(
        tinyglass_run, tmp_path / "pruned", 0.5, progress=False, hyperparameters={"epochs": 4}
    )
    assert count_parameters(pruned) < 0.6 * count_parameters(original)
    assert config.head["hidden"] == 128 and config.head["epochs"] == 4
    assert config.extra["pruned_channels"]["backbone"]["9"] == 336
    assert config.extra["pruning"]["source_run"] == str(tinyglass_run.resolve())
    # The config rebuilds the pruned shapes, and the saved run predicts what the fitted one did.
    loaded, _ = load_run(tmp_path / "pruned")
    images = torch.rand(2, 3, 128, 128)
    maps, scores = pruned.predict(images)
    loaded_maps, loaded_scores = loaded.predict(images)
    assert torch.allclose(loaded_maps, maps) and torch.allclose(loaded_scores, scores)
    metrics = evaluate_run(tmp_path / "pruned", out_dir=tmp_path / "report", progress=False)
    assert metrics["image_auroc"] > 0.75  # the unpruned run: 0.80 on these 16 test images
    with pytest.raises(EdgeadError, match="must be a new folder"):
        prune_run(tinyglass_run, tinyglass_run, 0.5, progress=False)


def test_prune_a_patchcore_run_refits_its_memory_bank(fitted_run: Path, tmp_path: Path):
    from edgead.evaluation import evaluate_run
    from edgead.runs import load_run

    before, _ = load_run(fitted_run)
    pruned, config = prune_run(fitted_run, tmp_path / "pruned", 0.25, progress=False)
    assert count_parameters(pruned) < count_parameters(before)
    assert "head_hidden" not in config.extra["pruning"]
    assert pruned.head.memory_bank_.shape[1] == before.head.memory_bank_.shape[1] == 152
    loaded, _ = load_run(tmp_path / "pruned")
    images = torch.rand(2, 3, 128, 128)
    assert torch.allclose(loaded.predict(images)[1], pruned.predict(images)[1])
    metrics = evaluate_run(tmp_path / "pruned", out_dir=tmp_path / "report", progress=False)
    assert metrics["image_auroc"] > 0.8
