"""The TensorFlow Lite target: ``.tflite`` files for LiteRT on a Raspberry Pi, Android or a Coral-class device.

`edgead export RUN --format tflite [--int8]` exports the run's ONNX graph (uint8 input, checked against
torch), converts it with onnx2tf and quantizes it with AI Edge Quantizer. Those tools pin their own numpy,
onnx and protobuf, so they live in an environment built once by ``bash scripts/setup_tflite.sh`` in
``$EDGEAD_TFLITE_HOME`` (default ``~/.cache/edgead/tflite``); :mod:`edgead.deploy.tflite_worker` runs there
as a subprocess. Everything after the conversion (parity check, choice of the INT8 scope, threshold,
metadata) runs here, with the LiteRT interpreter that edgead's own environment has (``ai-edge-litert``).

The files:
- ``model.tflite``: fp32, input uint8 NHWC [1, S, S, 3] (the raw pixels), outputs ``anomaly_map`` [1, 1, S, S]
  and ``score`` [1]; batch 1 (static shapes: XNNPACK runs the whole graph, the Edge TPU needs them).
- ``model.int8.tflite``: static INT8 (int8 activations, int8 per-channel weights) for the backbone stages
  chosen as for ONNX Runtime (the widest scope whose normal validation scores stay within
  ``INT8_ERROR_BUDGET`` of fp32's); the head and the postprocess stay float in the same file, because
  calibration on normal images would clip the anomaly scores. Its threshold comes from its own scores.
Both carry edgead's metadata in the file (:mod:`edgead.deploy.tflite_file`), so `edgead test`/`predict` run
them without the run folder.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgead.deploy.onnx_export import (
    calibration_set,
    check_parity,
    config_from_metadata,
    export_onnx,
    parity_images,
    read_metadata,
    validation_images,
)
from edgead.deploy.tflite_file import LiteRtModel, native_stderr_silenced, write_tflite
from edgead.deploy.toolchain import output_tail, toolchain_home, worker_env
from edgead.errors import EdgeadError
from edgead.runs import RunConfig

HOME_ENV = "EDGEAD_TFLITE_HOME"
SETUP_COMMAND = "bash scripts/setup_tflite.sh"
STAMP_FILE = ".edgead-tflite-installed"
WORKER = Path(__file__).with_name("tflite_worker.py")
PARITY_IMAGES = 4
PARITY_TOLERANCE = 5e-3  # relative, as for the ONNX export


def converter_python(home: str | Path | None = None) -> Path:
    """The converter environment's Python, or an EdgeadError that says how to build it."""
    venv = (Path(home) if home is not None else toolchain_home(HOME_ENV, "tflite")) / "venv"
    python = venv / "bin" / "python"
    if not (python.is_file() and (venv / STAMP_FILE).is_file()):
        raise EdgeadError(
            f"the TFLite converter is not installed in {venv}: run `{SETUP_COMMAND}` once from the edgead "
            f"repository (about 250 MB to download; set {HOME_ENV} to build it elsewhere)"
        )
    return python


def converter_available() -> bool:
    try:
        converter_python()
    except EdgeadError:
        return False
    return True


# ---- INT8: bias correction ---------------------------------------------------------------------------

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


def _channel_means(fp32: Path, names: list[bytes], images: np.ndarray) -> dict[bytes, np.ndarray]:
    """Mean of each named NHWC tensor of the fp32 file per channel, over ``images`` (uint8 NHWC)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with native_stderr_silenced():  # plain kernels: XNNPACK would hide the intermediate tensors
        interpreter = Interpreter(
            model_path=str(fp32),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            experimental_preserve_all_tensors=True,
        )
        interpreter.allocate_tensors()
    index = {t["name"].encode(): t["index"] for t in interpreter.get_tensor_details()}
    sums = {name: 0.0 for name in names}
    input_index = interpreter.get_input_details()[0]["index"]
    for image in images:
        interpreter.set_tensor(input_index, image[None])
        interpreter.invoke()
        for name in names:
            sums[name] = sums[name] + interpreter.get_tensor(index[name]).mean(
                axis=(0, 1, 2), dtype=np.float64
            )
    return {name: total / len(images) for name, total in sums.items()}


def correct_rounding_bias(quantized: Path, fp32: Path, images: np.ndarray) -> int:
    """Subtract from each INT8 convolution's bias the mean output shift its weight rounding causes.

    The LiteRT counterpart of :func:`edgead.deploy.quantize.correct_rounding_bias` (ONNX Runtime): rounding
    weights to int8 moves a conv's output by (W_q - W) x, whose mean over normal images, (W_q - W) E[x], is a
    per-channel offset the later layers carry. W_q is read back from the quantized file, W and E[x] (on the
    calibration images) from the fp32 file; the int32 bias is corrected in place. Returns the convs corrected.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model, reference = (flatbuffer_utils.read_model(str(p)) for p in (quantized, fp32))
    graph, ref_graph = model.subgraphs[0], reference.subgraphs[0]
    ref_tensors = {t.name: t for t in ref_graph.tensors}
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    convs = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if kind not in CONV_OPS or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        x, w, b = (graph.tensors[i] for i in op.inputs[:3])
        x_name = x.name.removesuffix(b"_quantized")  # the QUANTIZE op AI Edge Quantizer puts in front
        if w.type != schema.TensorType.INT8 or b.type != schema.TensorType.INT32:
            continue
        if x_name in ref_tensors and w.name in ref_tensors:
            convs.append((kind, x_name, w, b))
    if not convs:
        return 0
    means = _channel_means(fp32, sorted({c[1] for c in convs}), images)
    for kind, x_name, w, b in convs:
        shape = [int(d) for d in w.shape]
        axis = w.quantization.quantizedDimension
        along = [-1 if d == axis else 1 for d in range(len(shape))]
        q = np.frombuffer(model.buffers[w.buffer].data.tobytes(), np.int8).reshape(shape).astype(np.float64)
        scale = np.asarray(w.quantization.scale, np.float64).reshape(along)
        zero = np.asarray(w.quantization.zeroPoint, np.float64).reshape(along)
        float_w = ref_tensors[w.name]
        weights = np.frombuffer(reference.buffers[float_w.buffer].data.tobytes(), np.float32).reshape(shape)
        error = (q - zero) * scale - weights
        mean_x = means[x_name]
        if kind == "DEPTHWISE_CONV_2D":  # [1, KH, KW, C_out], C_out = C_in x multiplier
            shift = error.sum(axis=(0, 1, 2)) * mean_x[np.arange(shape[3]) // (shape[3] // len(mean_x))]
        else:  # [C_out, KH, KW, C_in / groups]
            groups = len(mean_x) // shape[3]
            out_group = np.arange(shape[0]) // (shape[0] // groups)
            shift = np.einsum("oi,oi->o", error.sum(axis=(1, 2)), mean_x.reshape(groups, shape[3])[out_group])
        bias = np.frombuffer(model.buffers[b.buffer].data.tobytes(), np.int32).astype(np.float64)
        corrected = bias - shift / np.asarray(b.quantization.scale, np.float64)
        info = np.iinfo(np.int32)
        model.buffers[b.buffer].data = (
            np.clip(np.rint(corrected), info.min, info.max).astype(np.int32).view(np.uint8)
        )
    flatbuffer_utils.write_model(model, str(quantized))
    return len(convs)


# ---- export ------------------------------------------------------------------------------------------


def _run_worker(
    onnx_path: Path,
    work: Path,
    calibration: np.ndarray | None,
    candidates: list[tuple[str, ...]],
    progress: bool,
    timeout: float | None,
) -> dict[str, Any]:
    """Run the converter in its environment; its summary, or an EdgeadError with the tool's message."""
    python = converter_python()
    command = [str(python), str(WORKER), str(onnx_path), str(work)]
    work.mkdir(parents=True, exist_ok=True)
    if calibration is not None:
        np.save(work / "calibration.npy", calibration)
        from edgead.deploy.quantize import INT8_REGION

        command += ["--calibration", str(work / "calibration.npy"), "--int8-regex", INT8_REGION.pattern]
        command += [
            arg for scope in candidates for arg in ("--candidate", json.dumps([re.escape(p) for p in scope]))
        ]
    try:
        proc = subprocess.run(
            command, env=worker_env(), capture_output=not progress, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise EdgeadError(f"the TFLite conversion did not finish in {timeout} s and was stopped") from None
    summary_path = work / "tflite_summary.json"
    if not summary_path.is_file():
        output = (proc.stdout or "") + (proc.stderr or "")
        raise EdgeadError(
            f"the TFLite converter stopped (exit status {proc.returncode}) without a report; if its environment "
            f"is broken, delete {python.parents[1]} and run `{SETUP_COMMAND}` again"
            + (f":\n{output_tail(output)}" if output else "")
        )
    summary = json.loads(summary_path.read_text())
    if not summary.get("ok"):
        error = summary.get("error") or {}
        detail = output_tail(error.get("detail") or "", 6)
        raise EdgeadError(
            f"TFLite conversion failed at stage '{error.get('stage')}': {error.get('message')}"
            + (f"\n{detail}" if detail else "")
        )
    return summary


def _parity(model: LiteRtModel, pipeline, config: RunConfig) -> tuple[float, float]:
    """Max |LiteRT - torch| of maps and scores on real training images; raises over the tolerance."""
    import torch

    from edgead.deploy.onnx_export import ExportGraph, exact_search, to_input

    images = parity_images(config, PARITY_IMAGES)
    graph = ExportGraph(pipeline, "uint8").eval()
    with torch.no_grad(), exact_search(graph.pipeline.head):  # the exported graph holds PatchCore's exact kNN
        ref_map, ref_score = (t.numpy() for t in graph(torch.from_numpy(to_input(images, "uint8"))))
    return check_parity("TFLite", (ref_map, ref_score), model.run(images), PARITY_TOLERANCE)


def _choose_int8(
    quantized: dict[tuple[str, ...], Path],
    onnx_path: Path,
    metadata: dict[str, str],
    validation: np.ndarray | None,
    image_size: int,
) -> tuple[Path, tuple[str, ...], dict[str, str]]:
    """The widest INT8 scope within the error budget on normal validation images (as for ONNX Runtime),
    with the metadata re-derived from its own scores; without validation images, the narrowest scope."""
    from edgead.deploy.quantize import (
        onnx_scores,
        recalibrated_metadata,
        score_spread,
        widest_within_budget,
    )

    if validation is None or len(validation) == 0:
        scope = list(quantized)[-1]
        return quantized[scope], scope, dict(metadata)

    def candidate(scope: tuple[str, ...]) -> tuple[Path, np.ndarray]:
        return quantized[scope], LiteRtModel(quantized[scope], image_size).run(validation)[1]

    reference = onnx_scores(onnx_path, metadata, validation)
    path, scores, scope = widest_within_budget(list(quantized), candidate, reference, score_spread(metadata))
    return path, scope, recalibrated_metadata(metadata, validation, scores, reference)


def export_tflite(
    run_dir: str | Path,
    out_dir: str | Path,
    int8: bool = False,
    calibration: int = 64,
    calibration_dir: str | Path | None = None,
    progress: bool = True,
    timeout: float | None = None,
    defects: int | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/model.tflite`` (and with ``int8`` ``model.int8.tflite``); returns files and checks.
    ``defects``: synthetic-defect calibration images (see :func:`edgead.deploy.onnx_export.calibration_set`)."""
    from edgead.deploy.quantize import (
        FLOAT_STAGES_KEY,
        _float_stages_note,
        candidate_float_scopes,
        float_scopes,
    )
    from edgead.runs import load_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    converter_python()  # before any work: a missing environment is one error line
    report: dict[str, Any] = {"files": {}}
    with tempfile.TemporaryDirectory(prefix="edgead-tflite-") as scratch:
        work = Path(scratch)
        onnx_path = work / "model.onnx"
        export_onnx(run_dir, onnx_path, input_dtype="uint8")
        metadata = read_metadata(onnx_path)
        config = config_from_metadata(metadata, onnx_path)
        images = validation = None
        candidates: list[tuple[str, ...]] = []
        if int8:
            # uint8 NHWC: the .tflite input layout
            images = calibration_set(config, calibration, calibration_dir, defects)
            validation = validation_images(config)
            has_validation = validation is not None and len(validation) > 0
            candidates = candidate_float_scopes(onnx_path) if has_validation else [float_scopes(onnx_path)]
            report["calibration_images"] = len(images)
            report["validation_images"] = None if validation is None else len(validation)
        summary = _run_worker(onnx_path, work / "out", images, candidates, progress, timeout)
        fp32 = work / "out" / "model.tflite"
        pipeline, _ = load_run(run_dir)
        diff_map, diff_score = _parity(LiteRtModel(fp32, config.image_size), pipeline, config)
        report.update(
            parity_max_abs_diff_map=diff_map,
            parity_max_abs_diff_score=diff_score,
            parity_images=PARITY_IMAGES,
        )
        quantized: dict[tuple[str, ...], Path] = {}
        failures = []
        for scope, entry in zip(candidates, summary["candidates"], strict=True):
            if entry.get("file"):
                quantized[scope] = work / "out" / entry["file"]
            else:
                failures.append(f"{_float_stages_note(scope)}: {entry.get('error')}")
        if int8 and not quantized:
            raise EdgeadError("AI Edge Quantizer refused every INT8 scope: " + "; ".join(failures))
        for path in quantized.values():
            correct_rounding_bias(path, fp32, images)
        if int8:
            chosen, scope, int8_metadata = _choose_int8(
                quantized, onnx_path, metadata, validation, config.image_size
            )
            int8_metadata[FLOAT_STAGES_KEY] = _float_stages_note(scope)
            int8_metadata["quantization"] = (
                f"int8 LiteRT (AI Edge Quantizer static), s8 activations, s8 per-channel weights, {len(images)} "
                f"images, {int8_metadata[FLOAT_STAGES_KEY]}, head and postprocess in float, rounding bias corrected"
            )
            report["int8_threshold"] = (
                f"from the INT8 model's scores on {len(validation)} normal validation images"
                if validation is not None and len(validation)
                else "the fp32 run's (its dataset is not on this machine)"
            )
            if failures:
                report["int8_refused_scopes"] = "; ".join(failures)
        report["files"]["tflite"] = write_tflite(fp32, out_dir / "model.tflite", metadata)
        if int8:
            report["files"]["tflite_int8"] = write_tflite(
                chosen, out_dir / "model.int8.tflite", int8_metadata
            )
        report["converter"] = {k: v for k, v in summary["tool_versions"].items() if v}
    return report
