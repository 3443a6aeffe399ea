"""Quantization-aware training: fake quantization that rounds like the INT8 files, trains, and leaves a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgead.deploy.qat import activation_qparams, fake_quantized, weight_fake_quant
from edgead.errors import UsageError


def test_weights_round_to_255_levels_per_channel_and_gradients_pass():
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3) * torch.tensor([1e-3, 1.0, 10.0, 0.5]).view(4, 1, 1, 1)
    weight.requires_grad_(True)
    rounded = weight_fake_quant(weight)
    for w, r in zip(weight.detach(), rounded.detach(), strict=True):
        step = w.abs().max() / 127
        assert (r - w).abs().max() <= step / 2 + 1e-7  # rounding, never clipping
        assert torch.allclose(r / step, (r / step).round(), atol=1e-3)  # on the int8 grid
    rounded.sum().backward()  # straight-through: the gradient of the identity
    assert torch.equal(weight.grad, torch.ones_like(weight))


def test_activation_range_holds_zero_and_maps_to_uint8():
    scale, zero = activation_qparams(0.5, 6.0)  # ReLU6 output: the range is widened to [0, 6]
    assert zero == 0 and scale == pytest.approx(6 / 255)
    scale, zero = activation_qparams(-2.0, 2.0)
    assert zero in (127, 128) and scale == pytest.approx(4 / 255)


def test_fake_quantized_observes_then_rounds_and_restores_the_trained_convs():
    from edgead.backbones.efficientnet_lite import SameConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Sequential(SameConv2d(8, 2, 3, stride=2)))
    first, second = model[0].weight, model[2][0].weight
    x = torch.rand(2, 3, 10, 10)
    reference = model(x)
    with fake_quantized(model) as quantizers:
        assert len(quantizers) == 2
        assert torch.equal(model[0].weight, weight_fake_quant(first))
        model(x)
        assert 0 <= quantizers[0].low < quantizers[0].high <= 1
        for quantizer in quantizers:
            quantizer.observing = False
        rounded = model(x)
        assert rounded.shape == reference.shape  # the "same" padding of SameConv2d is kept
        assert not torch.equal(rounded, reference)
        assert (rounded - reference).abs().max() < 0.05 * reference.abs().max()
        rounded.square().mean().backward()
    assert model[0].weight is first and model[2][0].weight is second  # the trained parameters are back
    assert first.grad is not None and second.grad is not None
    assert not any(type(m).__name__.startswith("Parametrized") for m in model.modules())


def test_qat_fine_tunes_a_student_into_its_own_run_and_exports_int8(
    synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from edgead.deploy.export import export_run
    from edgead.deploy.runtimes import load_inferencer
    from edgead.runs import load_run, read_config
    from edgead.training import fit_run

    run = tmp_path / "student"
    fit_run(
        synthetic_dataset, run, model="student", image_size=64, progress=False,
        hyperparameters={"steps": 30, "batch_size": 4, "views": 1},
    )  # fmt: skip
    from edgead.deploy import qat

    out = tmp_path / "export"
    monkeypatch.setitem(qat.QAT_SCHEDULES, "student", {"steps": 10})
    report = export_run(run, "onnx", out, int8=True, calibration=8, qat=True, progress=False)
    assert report["qat_run"] == out / "qat_run"
    config = read_config(out / "qat_run")
    assert config.extra["qat"]["steps"] == 10 and config.extra["qat"]["source_run"] == str(run.resolve())
    assert config.head == read_config(run).head  # the recipe is the run's; only the weights moved on
    source, tuned = load_run(run)[0], load_run(out / "qat_run")[0]
    before = source.backbone.student.state_dict()
    after = tuned.backbone.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(  # the frozen teacher is not trained
        next(iter(source.backbone.teacher.parameters())), next(iter(tuned.backbone.teacher.parameters()))
    )
    model = load_inferencer(report["files"]["onnx_int8"])
    maps, scores = model.predict(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(scores).all() and maps.shape == (2, 1, 64, 64)


def test_qat_refuses_what_it_cannot_do(fitted_run: Path, tmp_path: Path):
    from edgead.deploy.export import export_run

    with pytest.raises(UsageError, match="has none to fine-tune"):
        export_run(fitted_run, "onnx", tmp_path / "a", int8=True, qat=True)
    with pytest.raises(UsageError, match="add --int8"):
        export_run(fitted_run, "onnx", tmp_path / "b", qat=True)
    with pytest.raises(UsageError, match="not the edge backbone"):
        export_run(fitted_run, "edge", tmp_path / "c", qat=True)
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before any work


def test_qat_retrains_the_tinyglass_head_on_the_rounded_backbone(tinyglass_run: Path, tmp_path: Path):
    """TinyGLASS's backbone is frozen (and its head stays float in the INT8 files): QAT retrains the head only."""
    from edgead.deploy.qat import quantization_aware_run
    from edgead.runs import load_run

    qat_run = quantization_aware_run(tinyglass_run, tmp_path, progress=False, schedule={"epochs": 1})
    source, tuned = load_run(tinyglass_run)[0], load_run(qat_run)[0]
    assert not torch.equal(source.head.adaptor.weight, tuned.head.adaptor.weight)
    for a, b in zip(source.backbone.parameters(), tuned.backbone.parameters(), strict=True):
        assert torch.equal(a, b)
    scores = tuned.predict(torch.rand(2, 3, 128, 128))[1]
    assert torch.isfinite(scores).all()
