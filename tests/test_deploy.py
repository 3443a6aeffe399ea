"""Export to ONNX, the runtimes that run it, and INT8 quantization, on small synthetic runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_cli import assert_clean_error, edgead

from edgead.deploy.export import export_run
from edgead.deploy.onnx_export import export_onnx, read_metadata, train_images, validation_images
from edgead.deploy.quantize import (
    INT8_ERROR_BUDGET,
    STAGE_NAME,
    candidate_float_scopes,
    float_scopes,
    int8_scope,
    quantize_onnxruntime,
    quantize_openvino,
    score_agreement,
    widest_within_budget,
)
from edgead.deploy.runtimes import load_inferencer
from edgead.errors import EdgeadError
from edgead.evaluation import evaluate_run
from edgead.runs import load_run
from edgead.training import calibrate


@pytest.fixture(scope="module")
def exported(fitted_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "patchcore.onnx"
    export_onnx(fitted_run, path)
    return path


def test_onnx_file_is_self_contained_and_carries_the_decision_rule(fitted_run: Path, exported: Path):
    _, config = load_run(fitted_run)
    metadata = read_metadata(exported)
    assert float(metadata["threshold"]) == config.threshold
    assert metadata["model"] == "patchcore" and metadata["input_size"] == "128"
    model = onnx.load(str(exported))
    assert model.opset_import[0].version == 17
    # The memory bank is a constant inside the graph (stored transposed for the matrix product), not a side file.
    bank_shape = tuple(load_run(fitted_run)[0].head.memory_bank_.shape)
    assert any(tuple(init.dims) in (bank_shape, bank_shape[::-1]) for init in model.graph.initializer)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 128, 128]
    # Standard ONNX only, and the backbone's SAME paddings live inside its convolutions: no Pad is left
    # (the blur's reflect padding is inside the postprocess matrices).
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert not [n for n in model.graph.node if n.op_type == "Pad"]
    strided = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("/backbone/")]
    assert any(list(a.ints) == [0, 0, 1, 1] for n in strided for a in n.attribute if a.name == "pads")


def test_runtimes_give_the_same_decisions_as_torch(fitted_run: Path, exported: Path, synthetic_dataset: Path):
    torch_metrics = evaluate_run(fitted_run, out_dir=exported.parent / "t", progress=False)
    for runtime in ("onnxruntime", "openvino"):
        inferencer = load_inferencer(exported, runtime)
        assert inferencer.runtime == runtime
        metrics = evaluate_run(exported, out_dir=exported.parent / runtime, runtime=runtime, progress=False)
        assert metrics["image_auroc"] == pytest.approx(torch_metrics["image_auroc"], abs=1e-6)
        assert metrics["precision"] == torch_metrics["precision"]
        assert metrics["recall"] == torch_metrics["recall"]


def test_wrong_input_size_and_bad_files_are_clear_errors(exported: Path, fitted_run: Path, tmp_path: Path):
    inferencer = load_inferencer(exported)
    with pytest.raises(EdgeadError, match="takes 128x128"):
        inferencer.predict(torch.rand(1, 3, 96, 96))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(exported.read_bytes()[:5000])
    with pytest.raises(EdgeadError, match="not a readable ONNX file"):
        load_inferencer(corrupt)
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(exported))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    with pytest.raises(EdgeadError, match="not exported by edgead"):
        load_inferencer(foreign)
    with pytest.raises(EdgeadError, match="export it first"):
        load_inferencer(fitted_run, "onnxruntime")
    assert_clean_error(edgead("test", corrupt), "not a readable ONNX file")


def test_exporting_something_that_is_not_a_fitted_run_fails(fitted_run: Path, tmp_path: Path):
    unfitted = tmp_path / "unfitted"
    unfitted.mkdir()
    shutil.copy(fitted_run / "config.json", unfitted / "config.json")  # config but no weights
    assert_clean_error(edgead("export", unfitted), "fit did not finish")
    assert_clean_error(edgead("export", tmp_path / "missing"), "missing")


def test_calibration_needs_images(fitted_run: Path, exported: Path, tmp_path: Path):
    _, config = load_run(fitted_run)
    with pytest.raises(EdgeadError, match="at least one image"):
        train_images(config, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeadError, match="no images found"):
        train_images(config, 8, folder=empty)
    with pytest.raises(EdgeadError, match="at least one image"):
        quantize_onnxruntime(exported, tmp_path / "q.onnx", np.zeros((0, 128, 128, 3), np.uint8))


def test_tinyglass_int8_onnxruntime_and_openvino(tinyglass_run: Path, tmp_path: Path):
    onnx_report = export_run(tinyglass_run, "onnx", tmp_path, int8=True, calibration=16)
    ov_report = export_run(tinyglass_run, "openvino", tmp_path, int8=True, calibration=16)
    assert onnx_report["parity_max_abs_diff_score"] < 1e-3
    int8_file = onnx_report["files"]["onnx_int8"]
    assert onnx_report["sizes_mb"]["onnx_int8"] < 0.6 * onnx_report["sizes_mb"]["onnx"]
    quantized_ops = {node.op_type for node in onnx.load(str(int8_file)).graph.node}
    assert "QuantizeLinear" in quantized_ops
    reference = load_inferencer(tinyglass_run)
    images = torch.from_numpy(train_images(reference.config, 8)).permute(0, 3, 1, 2).float() / 255
    for path, runtime in ((int8_file, "onnxruntime"), (ov_report["files"]["openvino_int8"], "openvino")):
        metrics = evaluate_run(path, out_dir=tmp_path / runtime, runtime=runtime, progress=False)
        assert metrics["quantization"].startswith("int8") and "in float" in metrics["quantization"]
        assert "image_auroc_change" in metrics  # compared with the fp32 run folder
        # INT8 maps follow the fp32 maps (the accuracy change at full size is in docs/results/deployment.md).
        int8_maps = load_inferencer(path, runtime).predict(images)[0].flatten()
        fp32_maps = reference.predict(images)[0].flatten()
        correlation = np.corrcoef(int8_maps.numpy(), fp32_maps.numpy())[0, 1]
        assert correlation > 0.75
        # The INT8 file carries its own threshold: the fp32 rule applied to its scores on the run's
        # normal validation images.
        int8 = load_inferencer(path, runtime)
        validation = validation_images(reference.config)
        assert len(validation) == reference.config.extra["n_validation"]
        scores = int8.predict(torch.from_numpy(validation).permute(0, 3, 1, 2).float() / 255)[1].numpy()
        expected = calibrate(scores, reference.config.threshold_quantile)
        assert int8.config.threshold == pytest.approx(expected["threshold"], rel=1e-4)
        assert "int8 model" in int8.config.extra["threshold_source"]
        # ... and records how far its validation scores are from fp32's (same images, fp32 file's scores).
        fp32_scores = reference.predict(torch.from_numpy(validation).permute(0, 3, 1, 2).float() / 255)[1]
        spread = reference.config.threshold - reference.config.score_min
        expected_error = np.mean(np.abs(scores - fp32_scores.numpy())) / spread
        assert int8.config.extra["int8_score_error"] == pytest.approx(expected_error, rel=0.05, abs=1e-3)
    assert "rank correlation" in onnx_report["onnx_int8_vs_fp32"]
    assert "in float)" in onnx_report["onnx_int8_vs_fp32"]  # which backbone stages the budget kept in float
    assert "rank correlation" in ov_report["openvino_int8_vs_fp32"]
    # both INT8 files corrected their conv biases for weight rounding (NNCF once skipped every conv silently)
    assert "rounding bias corrected" in read_metadata(int8_file)["quantization"]
    scope = int8_scope(onnx_report["files"]["onnx"])
    changes = _bias_changes(onnx_report["files"]["onnx"], ov_report["files"]["openvino_int8"], scope)
    assert len(changes) > 3 and max(changes) > 0


def _bias_changes(onnx_path: Path, ir_path: Path, scope: str) -> list[float]:
    """Largest change of each conv bias in ``scope`` between the fp32 ONNX file and an OpenVINO IR."""
    import openvino as ov
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    biases = {
        n.name: initializers[n.input[2]]
        for n in graph.node
        if n.op_type == "Conv" and scope in n.name and len(n.input) > 2 and n.input[2] in initializers
    }
    changes = []
    for op in ov.Core().read_model(str(ir_path)).get_ops():
        constant = op.input_value(1).get_node() if op.get_type_name() == "Add" else None
        if (
            constant is not None
            and op.get_friendly_name() in biases
            and constant.get_type_name() == "Constant"
        ):
            changes.append(float(np.abs(constant.get_data().ravel() - biases[op.get_friendly_name()]).max()))
    return changes


def test_float_scopes_keep_all_but_the_deepest_backbone_stage(tinyglass_run: Path, tmp_path: Path):
    exported = export_onnx(tinyglass_run, tmp_path / "model.onnx").path
    stages = sorted(
        {int(m.group(2)) for n in onnx.load(str(exported)).graph.node if (m := STAGE_NAME.search(n.name))}
    )
    scopes = float_scopes(exported)
    assert {"/head/", "/postprocess/"} <= set(scopes)
    assert [f"/backbone/stages.{i}/" for i in stages[:-1]] == [s for s in scopes if "backbone" in s]
    config = load_inferencer(tinyglass_run).config
    graph = onnx.load(str(quantize_onnxruntime(exported, tmp_path / "q.onnx", train_images(config, 4)))).graph
    dequantized = {output for n in graph.node if n.op_type == "DequantizeLinear" for output in n.output}
    int8_convs = [n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized]
    assert int8_convs and all(f"/backbone/stages.{stages[-1]}/" in name for name in int8_convs)
    # ops in float read float tensors: the stride-8 features reach the head unrounded
    outside = [
        n for n in graph.node if f"/backbone/stages.{stages[-1]}/" not in n.name and "Linear" not in n.op_type
    ]
    assert not [n.name for n in outside if any(name in dequantized for name in n.input)]


def test_without_validation_images_only_the_deepest_stage_runs_in_int8(tinyglass_run: Path, tmp_path: Path):
    # e.g. `--calibration-dir` on a machine without the run's dataset: no label-free check, the safe scope
    exported = export_onnx(tinyglass_run, tmp_path / "model.onnx").path
    calibration = train_images(load_inferencer(tinyglass_run).config, 4)
    deepest = STAGE_NAME.search(int8_scope(exported)).group(2)
    expected = f"backbone stages {list(range(int(deepest)))} in float"
    onnx_file = quantize_onnxruntime(exported, tmp_path / "q.onnx", calibration)
    ir_file = quantize_openvino(exported, tmp_path / "q.xml", calibration)
    for path, runtime in ((onnx_file, "onnxruntime"), (ir_file, "openvino")):
        model = load_inferencer(path, runtime)
        assert expected in model.metadata["quantization"]
        assert "int8_score_error" not in model.config.extra  # nothing to compare with


def test_the_widest_int8_scope_within_the_error_budget_is_kept(tinyglass_run: Path, tmp_path: Path):
    exported = export_onnx(tinyglass_run, tmp_path / "model.onnx").path
    scopes = candidate_float_scopes(exported)
    assert scopes[-1] == float_scopes(exported)  # the most float one comes last
    assert [len(s) for s in scopes] == sorted(len(s) for s in scopes)
    fp32 = np.linspace(0, 1, 20)
    tried = []

    def fake_quantize(errors):
        def quantize(scope):
            tried.append(scope)
            return f"model {len(tried)}", fp32 + errors[len(tried) - 1]

        return quantize

    budget = INT8_ERROR_BUDGET
    model, scores, scope = widest_within_budget(
        ["a", "b", "c"], fake_quantize([3 * budget, budget / 2, 0]), fp32, 1.0
    )
    assert (model, scope, tried) == ("model 2", "b", ["a", "b"]) and np.allclose(scores, fp32 + budget / 2)
    tried.clear()
    model, _, scope = widest_within_budget(["a", "b"], fake_quantize([3 * budget, 2 * budget]), fp32, 1.0)
    assert (model, scope) == ("model 2", "b")  # none within budget: the last, most float one


def test_score_agreement():
    fp32 = np.array([0.1, 0.2, 0.3, 0.4])
    assert score_agreement(fp32, fp32, spread=0.3) == {"int8_score_error": 0.0, "int8_rank_correlation": 1.0}
    shifted = score_agreement(fp32, fp32 + 0.3, spread=0.3)
    assert shifted["int8_score_error"] == pytest.approx(1.0) and shifted["int8_rank_correlation"] == 1.0
    assert score_agreement(fp32, fp32[::-1], spread=0.3)["int8_rank_correlation"] == pytest.approx(-1.0)


def test_tinyglass_head_exports_as_one_convolution_before_its_activation(tinyglass_run: Path, tmp_path: Path):
    # standardise -> adaptor -> first discriminator conv are affine in a row: folded into one Conv
    result = export_onnx(tinyglass_run, tmp_path / "model.onnx")
    head = [n.op_type for n in onnx.load(str(result.path)).graph.node if "/head/" in n.name]
    assert head == ["Conv", "LeakyRelu", "Conv", "Sigmoid"]
    assert result.max_abs_diff_map < 1e-4 and result.max_abs_diff_score < 1e-4  # same maps as torch


def test_a_float_conv_after_an_int8_activation_still_reads_the_clipped_tensor(
    tinyglass_run: Path, tmp_path: Path
):
    # ONNX Runtime drops quantized Clips (the INT8 range clips instead); a float reader would get the
    # unclipped tensor unless the Clip stays in float with it.
    exported = export_onnx(tinyglass_run, tmp_path / "model.onnx").path
    deepest = [n for n in onnx.load(str(exported)).graph.node if int8_scope(exported) in n.name]
    clipped = {n.output[0] for n in deepest if n.op_type == "Clip"}
    conv = next(n for n in deepest if n.op_type == "Conv" and n.input[0] in clipped)
    config = load_inferencer(tinyglass_run).config
    keep = float_scopes(exported) + (conv.name,)
    graph = onnx.load(
        str(quantize_onnxruntime(exported, tmp_path / "q.onnx", train_images(config, 4), keep))
    ).graph
    producer = {output: n for n in graph.node for output in n.output}
    float_conv = next(n for n in graph.node if n.name == conv.name)
    assert producer[float_conv.input[0]].op_type == "Clip"


@pytest.mark.parametrize("groups", [1, 8])
def test_rounding_bias_correction_removes_the_mean_output_shift(groups: int, tmp_path: Path):
    # one conv whose weights round badly to int8 (one large weight per output channel sets the scale)
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgead.deploy.onnx_export import INPUT_NAME
    from edgead.deploy.quantize import correct_rounding_bias

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.01, (8, 8 // groups, 3, 3)).astype(np.float32)
    weight[:, 0, 0, 0] = 1.0
    bias = rng.normal(0, 0.1, 8).astype(np.float32)
    node = helper.make_node("Conv", [INPUT_NAME, "w", "b"], ["y"], name="conv", group=groups, pads=[1] * 4)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 12, 12])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    float_path, quantized_path = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(float_path)
    )
    inputs = rng.uniform(2, 6, (16, 8, 12, 12)).astype(np.float32)  # a ReLU6-like input with a large mean

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{INPUT_NAME: inputs[i : i + 1]} for i in range(len(inputs))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(float_path), str(quantized_path), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
    )  # fmt: skip

    def mean_shift() -> float:
        import onnxruntime as ort

        outputs = [
            ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: inputs})[
                0
            ]
            for p in (float_path, quantized_path)
        ]
        inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # away from the zero padding
        return float(np.abs((outputs[1] - outputs[0])[inner].mean(axis=(0, 2, 3))).max())

    before = mean_shift()
    assert correct_rounding_bias(quantized_path, float_path, inputs) == 1
    after = mean_shift()
    assert before > 0.01 and after < before / 5

