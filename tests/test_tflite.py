"""TensorFlow Lite target: LiteRT runtime, file checks, Edge TPU check, and a real conversion where installed.

The converter environment (``bash scripts/setup_tflite.sh``, onnx2tf + AI Edge Quantizer) is never installed
by CI, so the conversion test skips there. Everything else runs everywhere on .tflite files built here with
LiteRT's own flatbuffer schema (no converter needed) and run by the real LiteRT interpreter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from edgead.deploy.coral import check_file
from edgead.deploy.onnx_export import metadata_for
from edgead.deploy.runtimes import load_inferencer
from edgead.deploy.tflite import HOME_ENV, converter_available
from edgead.deploy.tflite_file import read_tflite_metadata, write_tflite
from edgead.errors import EdgeadError
from edgead.runs import read_config


def _tensor(name: str, shape: list[int], dtype: int, buffer: int = 0, quantization=None) -> schema.TensorT:
    tensor = schema.TensorT()
    tensor.name, tensor.shape, tensor.type, tensor.buffer = (
        name.encode(),
        np.asarray(shape, np.int32),
        dtype,
        buffer,
    )
    tensor.quantization = quantization
    return tensor


def _op(
    code: int, inputs: list[int], outputs: list[int], options_type: int = 0, options=None
) -> schema.OperatorT:
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = code, np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
    op.builtinOptionsType, op.builtinOptions = options_type, options
    return op


def _model(tensors, operators, opcodes, constants: dict[int, np.ndarray], inputs, outputs) -> bytes:
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    for tensor_index, value in constants.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(np.ascontiguousarray(value).tobytes(), np.uint8)
        model.buffers.append(buffer)
        tensors[tensor_index].buffer = len(model.buffers) - 1
    codes = []
    for builtin in opcodes:
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        codes.append(code)
    graph = schema.SubGraphT()
    graph.tensors, graph.operators = tensors, operators
    graph.inputs, graph.outputs = np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
    model.subgraphs, model.operatorCodes = [graph], codes
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def channel_mean_model(size: int) -> bytes:
    """uint8 NHWC [1, S, S, 3] -> anomaly_map = channel mean [1, 1, S, S], score = its maximum [1]."""
    t = schema.TensorType
    keep = schema.ReducerOptionsT()
    keep.keepDims = True
    drop = schema.ReducerOptionsT()
    drop.keepDims = False
    tensors = [
        _tensor("images", [1, size, size, 3], t.UINT8),
        _tensor("pixels", [1, size, size, 3], t.FLOAT32),
        _tensor("channel_axis", [1], t.INT32),
        _tensor("mean", [1, size, size, 1], t.FLOAT32),
        _tensor("map_shape", [4], t.INT32),
        _tensor("anomaly_map", [1, 1, size, size], t.FLOAT32),
        _tensor("all_axes", [3], t.INT32),
        _tensor("score", [1], t.FLOAT32),
    ]
    op = schema.BuiltinOperator
    operators = [
        _op(0, [0], [1]),  # CAST
        _op(1, [1, 2], [3], schema.BuiltinOptions.ReducerOptions, keep),  # MEAN over channels
        _op(2, [3, 4], [5]),  # RESHAPE to NCHW
        _op(3, [5, 6], [7], schema.BuiltinOptions.ReducerOptions, drop),  # REDUCE_MAX
    ]
    constants = {
        2: np.array([3], np.int32),
        4: np.array([1, 1, size, size], np.int32),
        6: np.array([1, 2, 3], np.int32),
    }
    opcodes = [op.CAST, op.MEAN, op.RESHAPE, op.REDUCE_MAX]
    return _model(tensors, operators, opcodes, constants, [0], [5, 7])


def int8_add_model() -> bytes:
    """A full-integer graph the Edge TPU can take: int8 [1, 8, 8, 3] + int8 [1, 8, 8, 3]."""
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint = np.array([0.1], np.float32), np.array([0], np.int64)
    t = schema.TensorType
    tensors = [_tensor(name, [1, 8, 8, 3], t.INT8, quantization=q) for name in ("a", "b", "sum")]
    return _model(tensors, [_op(0, [0, 1], [2])], [schema.BuiltinOperator.ADD], {}, [0, 1], [2])


@pytest.fixture(scope="module")
def edgead_tflite(fitted_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The channel-mean graph as an edgead file: the fitted run's metadata embedded, hashed."""
    config = read_config(fitted_run)
    folder = tmp_path_factory.mktemp("tflite")
    raw = folder / "raw.tflite"
    raw.write_bytes(channel_mean_model(config.image_size))
    return write_tflite(raw, folder / "model.tflite", metadata_for(config, "uint8", fitted_run))


def test_litert_runs_an_edgead_tflite_file(edgead_tflite: Path, fitted_run: Path):
    model = load_inferencer(edgead_tflite)  # the runtime follows the suffix
    assert model.runtime == "litert"
    assert (
        model.config.threshold == read_config(fitted_run).threshold
    )  # the decision rule travels in the file
    size = model.image_size
    images = torch.rand(3, 3, size, size)
    maps, scores = model.predict(images)
    pixels = np.rint(images.numpy() * 255.0)  # what the uint8 input holds
    assert maps.shape == (3, 1, size, size) and scores.shape == (3,)
    np.testing.assert_allclose(maps[:, 0].numpy(), pixels.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(scores.numpy(), pixels.mean(axis=1).reshape(3, -1).max(axis=1), rtol=1e-5)


def test_bad_tflite_files_are_one_clear_error(edgead_tflite: Path, fitted_run: Path, tmp_path: Path):
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(EdgeadError, match="not a TensorFlow Lite file"):
        load_inferencer(corrupt)

    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(edgead_tflite.read_bytes()[:200])
    with pytest.raises(EdgeadError, match="damaged|not a TensorFlow Lite"):
        load_inferencer(truncated)

    foreign = tmp_path / "foreign.tflite"
    foreign.write_bytes(channel_mean_model(read_config(fitted_run).image_size))
    with pytest.raises(EdgeadError, match="not exported by edgead"):
        load_inferencer(foreign)

    # A changed constant (the map's reshape target) no longer matches the hash recorded at export.
    data = bytearray(edgead_tflite.read_bytes())
    size = read_config(fitted_run).image_size
    target = np.array([1, 1, size, size], np.int32).tobytes()
    data[data.index(target) : data.index(target) + len(target)] = np.array(
        [1, size, 1, size], np.int32
    ).tobytes()
    tampered = tmp_path / "tampered.tflite"
    tampered.write_bytes(bytes(data))
    with pytest.raises(EdgeadError, match="changed or damaged after export"):
        read_tflite_metadata(tampered)

    # A file of another input size than its metadata says.
    small = tmp_path / "small.tflite"
    small.write_bytes(channel_mean_model(size // 2))
    wrong = write_tflite(small, tmp_path / "wrong_size.tflite", read_tflite_metadata(edgead_tflite))
    with pytest.raises(
        EdgeadError, match=rf"takes input \[1, {size // 2}, {size // 2}, 3\], not \[1, {size}"
    ):
        load_inferencer(wrong)

    with pytest.raises(EdgeadError, match="LiteRT runs .tflite files only"):
        load_inferencer(edgead_tflite, runtime="onnxruntime")
    other = tmp_path / "model.bin"
    other.write_bytes(b"")
    with pytest.raises(EdgeadError, match="neither a run folder nor"):
        load_inferencer(other, runtime="litert")


def rewrite_tflite_metadata(path: Path, out: Path, change) -> Path:  # noqa: ANN001
    """A copy of ``path`` whose edgead metadata JSON is ``change(metadata)``, the flatbuffer otherwise as it was."""
    import json

    model = flatbuffer_utils.read_model(str(path))
    entry = next(m for m in model.metadata if m.name in (b"edgead", "edgead"))
    metadata = json.loads(bytes(model.buffers[entry.buffer].data).decode())
    model.buffers[entry.buffer].data = np.frombuffer(json.dumps(change(metadata)).encode(), np.uint8)
    flatbuffer_utils.write_model(model, str(out))
    return out


def test_tampered_tflite_metadata_is_refused(edgead_tflite: Path, tmp_path: Path):
    from edgead.deploy.onnx_export import seal_metadata

    def raise_threshold(metadata: dict) -> dict:
        return {**metadata, "threshold": repr(float(metadata["score_max"]))}  # every defect "normal"

    def drop_hash_and_reseal(metadata: dict) -> dict:
        return seal_metadata({k: v for k, v in metadata.items() if k != "weights_sha256"})

    def name_another_run(metadata: dict) -> dict:
        return {**metadata, "source_run": str(tmp_path / "another_run")}

    for change, message in (
        (raise_threshold, "edited or damaged"),
        (drop_hash_and_reseal, "no valid weights_sha256"),
        (name_another_run, "edited or damaged"),
    ):
        bad = rewrite_tflite_metadata(edgead_tflite, tmp_path / f"{change.__name__}.tflite", change)
        with pytest.raises(EdgeadError, match=message):
            load_inferencer(bad)
    upper = tmp_path / "MODEL.TFLITE"
    upper.write_bytes(edgead_tflite.read_bytes())
    assert load_inferencer(upper).runtime == "litert"  # the suffix is recognised whatever its case


def test_missing_converter_environment_is_one_clear_error(
    fitted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from edgead.deploy.export import export_run

    empty = tmp_path / "no_converter_here"
    empty.mkdir()
    monkeypatch.setenv(HOME_ENV, str(empty))
    assert not converter_available()
    with pytest.raises(EdgeadError, match=r"run `bash scripts/setup_tflite\.sh`") as info:
        export_run(fitted_run, "tflite", tmp_path / "out", int8=True, progress=False)
    assert str(empty) in str(info.value)
    assert not (tmp_path / "out" / "model.tflite").exists()


def test_edge_tpu_check_reads_the_file(edgead_tflite: Path, tmp_path: Path):
    report = check_file(edgead_tflite)
    assert not report["fully_mapped"]
    assert report["first_cpu_op"] == "#0 CAST"  # the first op already leaves the Edge TPU
    assert {"op": "CAST", "reason": "operator not supported by the Edge TPU"}.items() <= report["findings"][
        0
    ].items()
    assert any("not int8/uint8" in f["reason"] for f in report["findings"])  # float tensors after it

    full_integer = tmp_path / "int8_add.tflite"
    full_integer.write_bytes(int8_add_model())
    report = check_file(full_integer)
    assert report["fully_mapped"] and report["edgetpu_ops"] == 1 and not report["findings"]

    damaged = tmp_path / "damaged.tflite"
    damaged.write_bytes(b"garbage" * 10)
    with pytest.raises(EdgeadError, match="not a TensorFlow Lite file"):
        check_file(damaged)


def test_cli_budget_for_coral_and_bad_files_are_one_error_line(edgead_tflite: Path, tmp_path: Path):
    from test_cli import assert_clean_error, edgead

    result = edgead("budget", edgead_tflite, "--device", "coral")
    assert result.returncode == 0, result.stderr
    assert "does NOT meet them" in result.stdout and "#0 CAST" in result.stdout
    usage = edgead("budget", edgead_tflite, "--device", "rpi5")
    assert (
        usage.returncode == 2 and usage.stderr.strip().startswith("error:") and "coral only" in usage.stderr
    )
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"\x00" * 64)
    assert_clean_error(edgead("test", corrupt), "not a TensorFlow Lite file")
    small = tmp_path / "small.tflite"
    small.write_bytes(channel_mean_model(32))
    wrong = write_tflite(small, tmp_path / "wrong_size.tflite", read_tflite_metadata(edgead_tflite))
    assert_clean_error(edgead("test", wrong), "takes input [1, 32, 32, 3]")


@pytest.mark.skipif(
    not converter_available(), reason="TFLite converter not installed (bash scripts/setup_tflite.sh)"
)
def test_tinyglass_exports_to_tflite_fp32_and_int8(tinyglass_run: Path, tmp_path: Path):
    from edgead.deploy.export import export_run
    from edgead.evaluation import evaluate_run

    report = export_run(
        tinyglass_run, "tflite", tmp_path / "export", int8=True, calibration=16, progress=False
    )
    fp32, int8 = report["files"]["tflite"], report["files"]["tflite_int8"]
    assert max(report["parity_max_abs_diff_map"], report["parity_max_abs_diff_score"]) < 1e-3
    metadata = read_tflite_metadata(int8)
    assert "float" in metadata["int8_float_stages"] and metadata["quantization"].startswith("int8 LiteRT")
    assert report["sizes_mb"]["tflite_int8"] < 0.6 * report["sizes_mb"]["tflite"]  # int8 backbone weights
    torch_metrics = evaluate_run(tinyglass_run, out_dir=tmp_path / "torch", progress=False)
    for path in (fp32, int8):
        metrics = evaluate_run(path, out_dir=tmp_path / path.stem, runtime="litert", progress=False)
        assert abs(metrics["image_auroc"] - torch_metrics["image_auroc"]) < (0.002 if path == fp32 else 0.1)
    assert check_file(int8)["fully_mapped"] is False  # float head and postprocess: not an Edge TPU file


def test_cli_export_without_the_converter_is_one_error_line(fitted_run: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    from test_cli import assert_clean_error

    env = {**os.environ, HOME_ENV: str(tmp_path / "nowhere")}
    command = [
        sys.executable,
        "-m",
        "edgead",
        "export",
        str(fitted_run),
        "--format",
        "tflite",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert_clean_error(result, "bash scripts/setup_tflite.sh")
    assert not list(tmp_path.glob("*.tflite"))
    usage = subprocess.run([*command, "--float-input"], capture_output=True, text=True, env=env, timeout=300)
    assert usage.returncode == 2 and "uint8 pixels" in usage.stderr


def test_float16_data_is_stored_as_float16_and_gives_the_same_output(tmp_path: Path):
    from ai_edge_litert.interpreter import Interpreter

    from edgead.deploy.tflite_file import keep_half_precision

    n = 1 << 16
    t = schema.TensorType
    tensors = [
        _tensor("x", [1, n], t.FLOAT32),
        _tensor("gaussians", [1, n], t.FLOAT32),
        _tensor("y", [1, n], t.FLOAT32),
    ]
    data = (
        np.random.default_rng(0).normal(size=(1, n)).astype(np.float16).astype(np.float32)
    )  # float16 values
    raw = _model(tensors, [_op(0, [0, 1], [2])], [schema.BuiltinOperator.ADD], {1: data}, [0], [2])
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(raw))
    assert keep_half_precision(model) == 1
    half = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    assert len(half) < 0.6 * len(raw)
    outputs = []
    for blob in (raw, half):
        interpreter = Interpreter(model_content=blob)
        interpreter.allocate_tensors()
        x = np.linspace(-1, 1, n, dtype=np.float32)[None]
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], x + data)
