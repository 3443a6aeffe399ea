"""TinyGLASS: the inference graph is static and 4D-only, small enough, and training learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgead.models import create_pipeline
from edgead.models.glass import TinyGlass, focal_loss, project_to_band


def unfitted_tinyglass(image_size: int = 128):
    pipeline = create_pipeline("tinyglass", pretrained=False, image_size=image_size)
    c = pipeline.backbone.out_channels
    pipeline.head.set_fitted(feature_mean_=torch.zeros(1, c, 1, 1), feature_std_=torch.ones(1, c, 1, 1))
    return pipeline.eval()


def test_exported_graph_has_only_4d_tensors():
    pipeline = unfitted_tinyglass()
    program = torch.export.export(pipeline, (torch.rand(1, 3, 128, 128),))
    checked = 0
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op != "call_function" or not node.users:
            continue
        assert isinstance(value, torch.Tensor), (
            f"{node.target} returns {type(value).__name__}, not one tensor"
        )
        assert value.dim() == 4, f"{node.target} makes a {value.dim()}D tensor {tuple(value.shape)}"
        checked += 1
    assert checked > 50  # backbone + head + postprocess were all walked
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    assert len(outputs) == 1  # the single output is the heat map
    assert tuple(outputs[0].meta["val"].shape) == (1, 1, 128, 128)


def test_inference_size_is_small():
    from edgead.backbones.base import count_parameters

    pipeline = unfitted_tinyglass(256)
    params = count_parameters(pipeline)
    assert params < 3_000_000
    head = count_parameters(pipeline.head)
    assert head == 152 * 152 + 152 + 152 * 256 + 256 + 2 * 256 + 256


def test_gas_projection_keeps_points_in_the_band():
    anchors = torch.zeros(100, 8, 1, 1)
    points = torch.randn(100, 8, 1, 1) * torch.logspace(-3, 1, 100).view(-1, 1, 1, 1)
    projected = project_to_band(points, anchors, 0.5, 1.0)
    norms = projected.norm(dim=1).flatten()
    assert torch.all(norms >= 0.5 - 1e-5) and torch.all(norms <= 1.0 + 1e-5)
    # the direction from the anchor is kept
    cosine = torch.nn.functional.cosine_similarity(points.flatten(1), projected.flatten(1))
    assert torch.all(cosine > 0.999)


def test_focal_loss_prefers_right_answers():
    targets = torch.tensor([[0.0], [1.0]])
    assert focal_loss(torch.tensor([[0.1], [0.9]]), targets) < focal_loss(
        torch.tensor([[0.9], [0.1]]), targets
    )


def test_bad_hyperparameters_and_unfitted_use():
    with pytest.raises(ValueError, match="gas"):
        TinyGlass(gas="sphere")
    with pytest.raises(ValueError, match="hard_mining"):
        TinyGlass(hard_mining=1.0)
    pipeline = create_pipeline("tinyglass", pretrained=False, image_size=64)
    with pytest.raises(RuntimeError, match="not fitted"):
        pipeline.predict(torch.rand(1, 3, 64, 64))


def test_tinyglass_learns_synthetic_defects(synthetic_dataset: Path, tmp_path: Path):
    from edgead.data.datasets import open_dataset, split_validation
    from edgead.evaluation import evaluate_run
    from edgead.runs import load_run
    from edgead.training import fit_run

    params = {"epochs": 8, "views": 2}
    pipeline, config = fit_run(
        synthetic_dataset,
        tmp_path / "run",
        model="tinyglass",
        image_size=128,
        progress=False,
        hyperparameters=params,
    )
    history = pipeline.head.history_
    assert history[-1]["loss"] < history[0]["loss"]
    # Model selection on held-out normal images + their LAS versions keeps the best epoch's weights.
    scores = [record["selection"] for record in history]
    best = max(range(len(scores)), key=lambda i: (scores[i], i)) + 1
    assert pipeline.head.selected_epoch_ == best == config.extra["selected_epoch"]
    validation = split_validation(open_dataset(synthetic_dataset).train, fraction=0.1, seed=0)[1]
    selection = pipeline.head._selection_set(pipeline, validation, progress=False)
    assert pipeline.head.selection_score(*selection, pipeline.postprocess) == pytest.approx(scores[best - 1])
    metrics = evaluate_run(tmp_path / "run", out_dir=tmp_path / "report", progress=False)
    assert metrics["image_auroc"] > 0.8
    loaded, _ = load_run(tmp_path / "run")
    images = torch.rand(2, 3, 128, 128)
    assert torch.allclose(loaded.predict(images)[0], pipeline.predict(images)[0])


def test_views_are_augmented_only_when_asked(synthetic_dataset: Path):
    from edgead.data.datasets import open_dataset

    samples = open_dataset(synthetic_dataset).train[:3]
    for augment in (True, False):
        pipeline = create_pipeline("tinyglass", pretrained=False, image_size=64, views=2, augment=augment)
        normal, synthetic, masks = pipeline.head._cache_views(pipeline, samples, progress=False)
        assert normal.shape[0] == synthetic.shape[0] == masks.shape[0] == 6  # view-major: 2 views x 3
        same_normal = torch.equal(normal[:3], normal[3:])
        assert same_normal is not augment  # fixed seed: some of 3 images get augmented
        assert not torch.equal(synthetic[:3], synthetic[3:])  # each view draws its own LAS
