"""PatchCore inside the IMX500: the sensor-sized bank, the sensor graph, its calibration and the host decoder.

The graph and decoder tests run everywhere; the MCT + converter test runs where the IMX500 toolchain is
installed (``bash scripts/setup_imx500.sh``; never in CI) and skips elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgead.deploy.imx500 import SUMMARY_FILE, evaluate_sensor_outputs, export_imx500, toolchain_available
from edgead.deploy.imx500_host import SensorDecoder
from edgead.deploy.imx500_nets import build_sensor_net
from edgead.errors import EdgeadError
from edgead.models.patchcore import PatchCore, exact_search
from edgead.runs import load_run
from edgead.training import fit_run

# The operators of the float sensor graph as torch exports it: all of them are in the set that MCT 2.5.1 +
# imxconv-pt 3.19.2 accepted for a PatchCore sensor graph (docs/results/sensor_bank.md); ReduceMin is not.
CONVERTER_ACCEPTED = {
    "Conv", "Clip", "Relu", "Pad", "AveragePool", "Resize", "Concat", "ReduceMax", "Max", "Sub", "Mul", "Div",
    "Sqrt", "Add", "Constant", "ConstantOfShape", "Cast", "Reshape", "Slice", "Transpose",
}  # fmt: skip (the op types of the 4096-entry bottle graph that imxconv-pt converted, MCT's quantizers aside)
NO_OPS = {"Identity"}  # what torch's exporter adds and MCT's tracing never sees


@pytest.fixture(scope="module")
def sensor_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PatchCore run with a 300-entry sensor bank (random-init backbone, 64 px: fits in seconds)."""
    run_dir = tmp_path_factory.mktemp("sensor") / "patchcore_bank"
    fit_run(
        synthetic_dataset,
        run_dir,
        model="patchcore",
        image_size=64,
        pretrained=False,
        progress=False,
        hyperparameters={"bank_size": 300, "coreset_ratio": 0.5},
    )
    return run_dir


def test_bank_size_keeps_that_many_entries_of_the_chunked_bank():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(20, 8, 6, 6, generator=g)
    full = PatchCore(coreset_ratio=0.5, chunk_size=128).fit(features)
    small = PatchCore(coreset_ratio=0.5, chunk_size=128, bank_size=100).fit(features)
    assert len(full.memory_bank_) == 360 and len(small.memory_bank_) == 100
    # every kept entry is an entry of the full bank (the same rule, applied once more)
    assert (small.memory_bank_[:, None, :] == full.memory_bank_[None]).all(dim=2).any(dim=1).all()
    # greedy k-center covers the bank better than the same number of entries taken at random
    random = full.memory_bank_[torch.randperm(360, generator=g)[:100]]
    coverage = lambda bank: torch.cdist(full.memory_bank_, bank).min(dim=1).values.max()  # noqa: E731
    assert coverage(small.memory_bank_) < coverage(random)
    assert PatchCore(bank_size=1000).fit(features[:1]).memory_bank_.shape[0] == 4  # smaller banks stay
    with pytest.raises(Exception, match="bank_size"):
        PatchCore(bank_size=0)


def test_float_sensor_graph_equals_the_heads_exact_distances(sensor_run: Path):
    pipeline, _ = load_run(sensor_run)
    assert len(pipeline.head.memory_bank_) == 300
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for chunk_size in (1024, 128, 7):  # one chunk, three, 43 (the last one short)
        net = build_sensor_net(pipeline, chunk_size=chunk_size)
        with torch.no_grad(), exact_search(pipeline.head):
            sensor = net(images)
            head = pipeline.head(pipeline.features(images))
        assert sensor.shape == head.shape == (3, 1, 8, 8)
        assert torch.allclose(sensor, head, rtol=1e-4, atol=1e-4 * float(head.max())), chunk_size


def test_sensor_graph_uses_only_operators_the_converter_accepted(sensor_run: Path, tmp_path: Path):
    import onnx

    pipeline, _ = load_run(sensor_run)
    net = build_sensor_net(pipeline, chunk_size=128)
    path = tmp_path / "sensor.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 64, 64),), str(path), opset_version=17, dynamo=False)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node} - NO_OPS
    assert ops <= CONVERTER_ACCEPTED, ops - CONVERTER_ACCEPTED
    assert "ReduceMax" in ops and "ReduceMin" not in ops
    assert sum(node.op_type == "ReduceMax" for node in graph.node) == 3  # one per chunk of 128 of 300
    import onnxruntime as ort

    (value,) = graph.input  # static and 4D in, 4D out, as the sensor needs
    assert [d.dim_value for d in value.type.tensor_type.shape.dim] == [1, 3, 64, 64]
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {value.name: np.zeros((1, 3, 64, 64), np.float32)})
    assert out.shape == (1, 1, 8, 8)


def test_host_decoder_reproduces_the_pipelines_map_score_and_decision(sensor_run: Path):
    pipeline, config = load_run(sensor_run)
    decoder = SensorDecoder(config.image_size, config.blur_sigma, config.threshold, config.score_min, config.score_max)
    net = build_sensor_net(pipeline)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    images[2:, :, 20:40, 20:40] = 1.0  # a bright square: far from every normal patch
    with torch.no_grad(), exact_search(pipeline.head):
        maps, scores = pipeline.predict(images)
        outputs = net(images).numpy()
    for i in range(len(images)):
        result = decoder.decode(outputs[i])  # [1, 1, h, w] as the sensor gives it
        assert result.anomaly_map.shape == (64, 64)
        np.testing.assert_allclose(result.anomaly_map, maps[i, 0].numpy(), rtol=1e-4, atol=1e-4 * float(scores.max()))
        assert result.score == pytest.approx(float(scores[i]), rel=1e-4)
        assert result.decision == ("anomalous" if float(scores[i]) >= config.threshold else "normal")
        assert 0.0 <= result.normalized_score <= 1.0
    assert decoder.decode(outputs[3]).score > decoder.decode(outputs[0]).score
    overlay = decoder.overlay((images[3].permute(1, 2, 0).numpy() * 255).astype(np.uint8), decoder.decode(outputs[3]))
    assert overlay.shape == (64, 64, 3) and overlay.dtype == np.uint8
    with pytest.raises(EdgeadError, match="NaN"):
        decoder.decode(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(EdgeadError, match="patch-score map"):
        decoder.decode(np.zeros((2, 1, 8, 8), np.float32))


def test_decoder_refuses_a_damaged_summary(tmp_path: Path):
    path = tmp_path / SUMMARY_FILE
    path.write_text("{not json")
    with pytest.raises(EdgeadError, match="not a readable"):
        SensorDecoder.from_summary(path)
    summary = {"postprocess": {"upsample_to": [64, 64], "blur_sigma": 4.0, "threshold": 1.0, "score_min": 0.0}}
    with pytest.raises(EdgeadError, match="no complete"):
        SensorDecoder.from_summary(summary)
    summary["postprocess"]["score_max"] = "2.0"
    with pytest.raises(EdgeadError, match="malformed"):
        SensorDecoder.from_summary(summary)
    summary["postprocess"]["score_max"] = -1.0
    with pytest.raises(EdgeadError, match="invalid"):
        SensorDecoder.from_summary(summary)
    summary["postprocess"]["score_max"] = 2.0
    assert SensorDecoder.from_summary(summary).threshold == 1.0


def test_calibration_reads_training_images_only(sensor_run: Path):
    """The sensor's calibration set: the run's training split of train/good + synthetic defects made
    from them; never its validation images (they set the threshold) and never test images."""
    from edgead.deploy.imx500_worker import calibration_images
    from edgead.deploy.onnx_export import calibration_set
    from edgead.runs import fitted_split, read_config

    config = read_config(sensor_run)
    train, validation = fitted_split(config)
    images, paths = calibration_images(config, 1000, n_defects=5)
    assert sorted(paths) == sorted(str(s.path) for s in train)  # all of them, nothing else
    assert not set(paths) & {str(s.path) for s in validation}
    assert not any("/test/" in p for p in paths)
    assert len(images) == len(paths) + 5
    normal, defects = images[: len(paths)], images[len(paths) :]
    assert all(not torch.equal(d, normal[i]) for i, d in enumerate(defects))  # each one changed...
    changed = [(d - normal[i]).abs().amax(dim=0) > 0 for i, d in enumerate(defects)]
    assert all(0 < float(c.float().mean()) < 0.9 for c in changed)  # ...in a region, not everywhere
    # The other INT8 paths (ONNX Runtime, OpenVINO, TFLite): the same rule, on by default for a sensor bank
    default = calibration_set(config, 16)
    assert len(default) == 16 + 2
    assert len(calibration_set(config, 16, defects=0)) == 16


def test_sensor_graph_file_runs_in_onnx_runtime_with_the_host_decoder(sensor_run: Path, tmp_path: Path):
    """A labelled sensor graph (what export --format imx500 writes as edgead_patchcore.fakequant.onnx, here
    its float version) runs through `edgead test`'s and `predict`'s loader: ONNX Runtime + host decoder."""
    from edgead.deploy.imx500 import label_sensor_graph
    from edgead.deploy.runtimes import SensorGraphInferencer, load_inferencer
    from edgead.runs import read_config

    pipeline, config = load_run(sensor_run)
    path = tmp_path / "edgead_patchcore.fakequant.onnx"
    net = build_sensor_net(pipeline)
    torch.onnx.export(
        net, (torch.zeros(1, 3, 64, 64),), str(path), input_names=["input"], opset_version=17, dynamo=False,
        dynamic_axes={"input": {0: "batch_size"}},
    )  # fmt: skip
    summary = {
        "tool_versions": {"model-compression-toolkit": "none (float graph)"},
        "target_platform": {"mct_tpc_version": "v1"},
        "calibration": "none",
    }
    label_sensor_graph(path, sensor_run, read_config(sensor_run), summary)
    model = load_inferencer(path)
    assert isinstance(model, SensorGraphInferencer)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    maps, scores = model.predict(images)
    with exact_search(pipeline.head):
        ref_maps, ref_scores = pipeline.predict(images)
    assert maps.shape == ref_maps.shape
    assert torch.allclose(scores, ref_scores, rtol=1e-4)
    with pytest.raises(EdgeadError, match="sensor graph: it runs on ONNX Runtime"):
        load_inferencer(path, "openvino")
    data = path.read_bytes()
    path.write_bytes(data.replace(repr(config.threshold).encode(), repr(config.threshold * 2).encode(), 1))
    with pytest.raises(EdgeadError):
        load_inferencer(path)  # an edited threshold is refused (it contradicts the config inside)


def test_only_memory_bank_and_trained_models_go_on_the_sensor(synthetic_dataset: Path, tmp_path: Path):
    padim = tmp_path / "padim"
    fit_run(synthetic_dataset, padim, model="padim", image_size=64, pretrained=False, progress=False)
    with pytest.raises(EdgeadError, match="'padim' model.*patchcore"):
        export_imx500(padim, tmp_path / "out", progress=False)
    huge = tmp_path / "huge_bank"
    fit_run(
        synthetic_dataset, huge, model="patchcore", image_size=64, pretrained=False, progress=False,
        hyperparameters={"bank_size": 30000},
    )  # fmt: skip
    with pytest.raises(EdgeadError, match="bank_size=4096"):
        export_imx500(huge, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_converts_a_sensor_bank_and_scores_its_test_split(sensor_run: Path, tmp_path: Path):
    if not toolchain_available():
        pytest.skip("IMX500 toolchain not installed (bash scripts/setup_imx500.sh) or no Java")
    from edgead.deploy.runtimes import load_inferencer
    from edgead.evaluation import evaluate_run

    out = tmp_path / "imx500"
    scores = tmp_path / "test_scores.npz"
    summary = export_imx500(sensor_run, out, n_calibration=8, progress=False, score_test=scores, chunk_size=128)
    assert summary["ok"] and summary["fits"] is True
    assert summary == json.loads((out / SUMMARY_FILE).read_text())
    assert (out / "packerOut.zip").stat().st_size > 0
    assert summary["memory_bank"] == {"entries": 300, "channels": 152, "chunk_size": 128, "chunks": 3}
    assert summary["n_calibration_defects"] == 1  # 8 // 8 by default for PatchCore
    assert summary["float_fold_max_abs_error"] < 1e-3 * summary["postprocess"]["score_max"]
    metrics = evaluate_sensor_outputs(sensor_run, scores)
    assert set(metrics) == {"float", "int8"}
    assert 0.0 <= metrics["int8"]["image_auroc"] <= 1.0
    # the same quantized graph on a CPU: `edgead test` of the fake-quantized file
    fake = out / summary["fakequant_onnx"]
    assert load_inferencer(fake).runtime == "onnxruntime"
    report = evaluate_run(fake, out_dir=tmp_path / "test_fake", progress=False)
    assert report["image_auroc"] == pytest.approx(metrics["int8"]["image_auroc"], abs=0.05)
