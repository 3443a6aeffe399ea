"""The student model: a static 4D graph within the sensor budget, a recipe that learns, runs that round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgead.errors import EdgeadError, NonFiniteError
from edgead.models import create_pipeline
from edgead.models.image_training import colour_jitter
from edgead.models.student.train import hard_feature_loss
from edgead.profiling import model_profile


def unfitted_student(image_size: int = 128, **head):
    pipeline = create_pipeline("student", pretrained=False, image_size=image_size, **head)
    c = pipeline.head.channels
    n = 4 if pipeline.head.autoencoder else 2
    pipeline.head.set_fitted(
        teacher_mean_=torch.zeros(1, c, 1, 1), teacher_std_=torch.ones(1, c, 1, 1), quantiles_=torch.arange(n).view(1, n, 1, 1) + 1.0
    )
    return pipeline.eval()


@pytest.mark.parametrize("autoencoder", [True, False])
def test_graph_is_static_4d_with_one_output(autoencoder: bool):
    pipeline = unfitted_student(autoencoder=autoencoder)
    program = torch.export.export(pipeline, (torch.rand(1, 3, 128, 128),))
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "call_function" and node.users:
            assert isinstance(value, torch.Tensor) and value.dim() == 4, f"{node.target}: {value}"
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    assert len(outputs) == 1 and tuple(outputs[0].meta["val"].shape) == (1, 1, 128, 128)


def test_whole_sensor_graph_is_within_the_budget():
    """Teacher included: at most 3M parameters and 2 GMAC at 256 x 256 (issue 16's sensor class)."""
    profile = model_profile(unfitted_student(image_size=256), image_size=256)
    assert profile["params"] <= 3_000_000
    assert profile["macs"] <= 2_000_000_000
    assert profile["head_params"] == 0  # the trained networks sit in the backbone slot, counted there
    assert profile["backbone_params"] > 1_500_000  # teacher + student + autoencoder


def test_hard_feature_loss_and_jitter():
    distance = torch.arange(1000, dtype=torch.float32)
    assert hard_feature_loss(distance, 0.99) == pytest.approx(float(distance[990:].mean()))
    shuffled = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    ordered = shuffled.sort().values
    for q in (0.5, 0.9, 0.999):  # the values from the q-quantile's position (rounded up) on, in any order
        expected = ordered[int(np.ceil(q * (len(ordered) - 1))) :].mean()
        assert hard_feature_loss(shuffled, q) == pytest.approx(float(expected), rel=1e-5)
    images = torch.rand(16, 3, 8, 8)
    jittered = colour_jitter(images, torch.Generator().manual_seed(0))
    assert jittered.shape == images.shape and 0 <= jittered.min() and jittered.max() <= 1
    assert not torch.equal(jittered, images)


def test_bad_settings_fail_with_a_reason():
    with pytest.raises(EdgeadError, match="quantile_low"):
        create_pipeline("student", pretrained=False, quantile_low=0.99, quantile_high=0.9)
    with pytest.raises(ValueError, match="stride-8"):
        create_pipeline("student", pretrained=False, layers=(3,))
    with pytest.raises(RuntimeError, match="not fitted"):
        create_pipeline("student", pretrained=False, image_size=64).predict(torch.rand(1, 3, 64, 64))


def test_diverging_training_saves_nothing(synthetic_dataset: Path, tmp_path: Path):
    from edgead.training import fit_run

    with pytest.raises(NonFiniteError, match="diverged"):
        fit_run(
            synthetic_dataset, tmp_path / "run", model="student", image_size=64, progress=False,
            hyperparameters={"steps": 20, "batch_size": 2, "views": 1, "lr": 1e12},
        )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_student_learns_synthetic_defects_and_round_trips(synthetic_dataset: Path, tmp_path: Path):
    from edgead.deploy.onnx_export import export_onnx
    from edgead.evaluation import evaluate_run
    from edgead.runs import load_run
    from edgead.training import fit_run

    run = tmp_path / "student"
    pipeline, config = fit_run(
        synthetic_dataset, run, model="student", image_size=128, progress=False,
        hyperparameters={"steps": 150, "batch_size": 4, "views": 2},
    )  # fmt: skip
    q = pipeline.head.quantiles_.flatten()
    assert len(q) == 4 and (q[1::2] > q[::2]).all()
    metrics = evaluate_run(run, progress=False)
    assert metrics["image_auroc"] >= 0.8, metrics
    loaded, _ = load_run(run)
    images = torch.rand(2, 3, 128, 128)
    np.testing.assert_allclose(loaded.predict(images)[1].numpy(), pipeline.predict(images)[1].numpy(), rtol=1e-5)
    result = export_onnx(run, tmp_path / "student.onnx")  # checks parity with torch itself
    assert result.max_abs_diff_score < 1e-3
    # INT8 takes the teacher's stages and the trained networks; the head and postprocess stay in float
    from edgead.deploy.quantize import HEAD_SCOPES, _runs_in_float, _stages

    assert _stages(result.path) == ("/backbone/teacher/stages.", 3)
    assert not _runs_in_float("/backbone/student/layers/layers.0/Conv", HEAD_SCOPES)
    assert not _runs_in_float("/backbone/autoencoder/decoder/decoder.1/Conv", HEAD_SCOPES)
    assert _runs_in_float("/head/Sub", HEAD_SCOPES)


@pytest.mark.parametrize("autoencoder", [True, False])
def test_sensor_net_folds_the_head_exactly(autoencoder: bool):
    """What goes on the IMX500 (no channel slices, standardisation folded) equals the pipeline's patch scores."""
    from edgead.deploy.imx500_nets import build_sensor_net

    pipeline = unfitted_student(image_size=64, autoencoder=autoencoder)
    pipeline.mean.fill_(0.3)  # the student and autoencoder must see the normalised image, as in the pipeline
    pipeline.std.fill_(0.2)
    c = pipeline.head.channels
    generator = torch.Generator().manual_seed(0)
    pipeline.head.set_fitted(
        teacher_mean_=torch.randn(1, c, 1, 1, generator=generator),
        teacher_std_=torch.rand(1, c, 1, 1, generator=generator) + 0.5,
    )
    images = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = pipeline.head(pipeline.features(images))
        folded = build_sensor_net(pipeline)(images)
    # float32 rounding only: the folded graph subtracts in teacher units before scaling
    torch.testing.assert_close(folded, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
