"""DifferNet / DifferSqueezeNet: SqueezeNet's layout, the multi-scale extractor, the flow, its recipe and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgead.backbones import build_architecture, create_backbone
from edgead.errors import EdgeadError, NonFiniteError
from edgead.models import create_pipeline
from edgead.models.differnet.model import rotate

SMALL = {"hidden": 64, "epochs": 6, "views": 2, "test_transforms": 4, "batch_size": 16}


def test_squeezenet_has_torchvision_keys_and_four_stages():
    arch = build_architecture("squeezenet1_1")
    keys = arch.state_dict()
    # torchvision's squeezenet1_1 features: 722,496 parameters; fire modules at features.3/4/6/7/9/10/11/12
    assert sum(v.numel() for v in keys.values()) == 722_496
    for index in (3, 4, 6, 7, 9, 10, 11, 12):
        assert f"features.{index}.squeeze.weight" in keys and f"features.{index}.expand3x3.bias" in keys
    assert not any(k.startswith("classifier") for k in keys)
    backbone = create_backbone("squeezenet1_1", layers=(0, 1, 2, 3), pretrained=False, local_aggregation=1)
    x = torch.rand(1, 3, 128, 128)
    outputs = backbone.stage_outputs(x)
    assert [o.shape[1] for o in outputs] == [64, 128, 256, 512]
    assert [o.shape[-1] for o in outputs] == [63, 31, 15, 7]  # torchvision's sides: unpadded stem, ceil-mode pools
    assert backbone.layer_strides == (2, 4, 8, 16)


def test_squeezenet_has_no_weights_here_and_says_where_to_get_them():
    with pytest.raises(EdgeadError, match="squeezenet1_1-b8a52dc0.pth"):
        create_backbone("squeezenet1_1")


def test_multiscale_extractor_gives_one_vector_per_image():
    pipeline = create_pipeline("differnet", pretrained=False, image_size=128, hidden=32)
    assert pipeline.backbone.layers == (3,) and pipeline.backbone.out_channels == 3 * 112
    features = pipeline.features(torch.rand(2, 3, 128, 128))
    assert features.shape == (2, 336, 1, 1)
    squeeze = create_pipeline("differnet", "squeezenet1_1", pretrained=False, image_size=128, hidden=32)
    assert squeeze.backbone.out_channels == 3 * 128  # the paper's 128 x 3 scales
    with pytest.raises(EdgeadError, match="smallest scale"):
        create_pipeline("differnet", pretrained=False, image_size=96, hidden=32)
    with pytest.raises(EdgeadError, match="rotation"):
        create_pipeline("differnet", pretrained=False, rotation=270)


def test_rotation_is_exact_at_right_angles_and_test_angles_cover_the_circle():
    images = torch.rand(2, 3, 16, 16)
    assert torch.allclose(rotate(images, torch.zeros(2)), images, atol=1e-6)
    quarter = rotate(images, torch.full((2,), 90.0))
    assert min(float((quarter - torch.rot90(images, k, dims=(2, 3))).abs().max()) for k in (1, -1)) < 1e-5
    pipeline = create_pipeline("differnet", pretrained=False, image_size=128, hidden=32, test_transforms=8)
    assert pipeline.head.test_angles().tolist() == [0, 45, 90, 135, 180, 225, 270, 315]
    small = create_pipeline("differnet", pretrained=False, image_size=128, hidden=32, rotation=10, test_transforms=3)
    assert small.head.test_angles().tolist() == [-10, 0, 10]


def test_untrained_flow_is_the_identity():
    """Zero-initialised coupling outputs: z = standardised features, NLL per dimension = mean(z^2) / 2."""
    pipeline = create_pipeline("differnet", pretrained=False, image_size=128, hidden=32)
    d = pipeline.backbone.out_channels
    pipeline.head.set_fitted(feature_mean_=torch.zeros(1, d, 1, 1), feature_std_=torch.ones(1, d, 1, 1))
    features = torch.randn(3, d, 1, 1)
    expected = 0.5 * (features**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(pipeline.head.nll(features), expected, rtol=1e-5, atol=1e-6)


def test_diverging_training_saves_nothing(synthetic_dataset: Path, tmp_path: Path):
    from edgead.training import fit_run

    with pytest.raises(NonFiniteError, match="diverged"):
        fit_run(
            synthetic_dataset, tmp_path / "run", model="differnet", image_size=128, progress=False,
            hyperparameters={**SMALL, "lr": 1e30},
        )  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_differnet_learns_synthetic_defects_localises_and_exports(synthetic_dataset: Path, tmp_path: Path):
    from edgead.deploy.onnx_export import export_onnx
    from edgead.deploy.quantize import quantize_onnxruntime
    from edgead.evaluation import evaluate_run
    from edgead.runs import load_run
    from edgead.training import fit_run

    run = tmp_path / "differnet"
    pipeline, _ = fit_run(synthetic_dataset, run, model="differnet", image_size=128, progress=False,
                          hyperparameters=SMALL)  # fmt: skip
    history = pipeline.head.history_
    assert history[-1]["loss"] < history[0]["loss"]  # maximum likelihood made progress
    metrics = evaluate_run(run, progress=False)
    assert metrics["image_auroc"] >= 0.8, metrics
    assert metrics["pixel_auroc"] > 0.6, metrics  # gradient maps point at the synthetic defects

    loaded, _ = load_run(run)
    images = torch.rand(2, 3, 128, 128)
    maps, scores = loaded.predict(images)
    assert maps.shape == (2, 1, 128, 128)
    torch.testing.assert_close(maps.amax(dim=(1, 2, 3)), scores)  # the gradient map peaks at the image score
    np.testing.assert_allclose(scores.numpy(), pipeline.predict(images)[1].numpy(), rtol=1e-4)

    result = export_onnx(run, tmp_path / "differnet.onnx")  # one unrotated view; checks parity itself
    assert result.max_abs_diff_score < 1e-3
    calibration = (np.random.default_rng(0).random((4, 128, 128, 3)) * 255).astype(np.uint8)
    int8 = quantize_onnxruntime(result.path, tmp_path / "differnet.int8.onnx", calibration)
    import onnx

    graph = onnx.load(str(int8)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    head_convs = [n for n in graph.node if n.op_type == "Conv" and "/head/" in n.name]
    assert head_convs and all(n.input[1] in dequantized for n in head_convs)  # flow weights stored in int8
    from edgead.deploy.runtimes import load_inferencer

    fp32 = load_inferencer(result.path, "onnxruntime")
    quantized = load_inferencer(int8, "onnxruntime")
    batch = torch.rand(3, 3, 128, 128)
    a, b = fp32.predict(batch)[1].numpy(), quantized.predict(batch)[1].numpy()
    assert np.all(np.isfinite(b)) and np.corrcoef(a, b)[0, 1] > 0.9


def test_epoch_callback_sees_every_epoch_and_changes_nothing(synthetic_dataset: Path):
    """The benchmark's per-epoch view of a fit: one call per epoch, flow in eval mode, same final weights."""
    from edgead.data.datasets import open_dataset
    from edgead.models.differnet.train import train_differnet

    samples = open_dataset(synthetic_dataset).train[:8]
    settings = {"hidden": 16, "epochs": 3, "views": 1, "batch_size": 4}
    torch.manual_seed(0)  # the untrained backbone's random init
    plain = create_pipeline("differnet", pretrained=False, image_size=128, **settings)
    train_differnet(plain.head, plain, samples)
    torch.manual_seed(0)
    watched = create_pipeline("differnet", pretrained=False, image_size=128, **settings)
    seen = []
    train_differnet(watched.head, watched, samples, on_epoch=lambda e: seen.append((e, watched.head.flow.training)))
    assert seen == [(1, False), (2, False), (3, False)]
    expected, got = plain.head.flow.state_dict(), watched.head.flow.state_dict()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
