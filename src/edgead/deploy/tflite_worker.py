"""Converts an exported edgead ONNX file to TensorFlow Lite, inside the converter's own environment.

``edgead.deploy.tflite`` starts this file as a subprocess with the Python of the environment that
``bash scripts/setup_tflite.sh`` builds (onnx2tf, AI Edge Quantizer, LiteRT, onnx, onnxruntime, each at the
version onnx2tf pins); it never runs in edgead's own environment and imports nothing of edgead: all it
needs is in its arguments.

- fp32: onnx2tf's ``flatbuffer_direct`` backend (no TensorFlow) on the ONNX graph with its batch fixed to 1.
  A free batch dimension makes onnx2tf guard every asymmetric padding with a SHAPE/FILL/CONCAT construction
  that XNNPACK cannot run (10 CPU partitions instead of 2, twice the latency on TinyGLASS).
- INT8: AI Edge Quantizer, static INT8 (int8 activations, int8 per-channel weights) for the ops whose ONNX
  owner (:func:`op_owners`) matches ``--int8-regex`` and none of a candidate's float regexes; every other
  op stays float in the same file, as does any op whose output a float op outside the scope reads
  (:func:`read_outside`). Ranges are the extremes over all calibration images (ONNX Runtime's MinMax; the
  quantizer's default moving average of per-image ranges clipped the student's autoencoder: 7.2% -> 1.5%
  normal-score error on KolektorSDD). One file per ``--candidate``, so that edgead can pick the widest one
  whose normal validation scores stay close to fp32's, as it does for ONNX Runtime and OpenVINO.

Usage (inside that environment):
  python tflite_worker.py MODEL.onnx OUT_DIR [--calibration CALIB.npy --int8-regex R --candidate JSON ...]
Writes OUT_DIR/model.tflite, OUT_DIR/candidate_<k>.int8.tflite and OUT_DIR/tflite_summary.json (``ok``,
``error`` with the stage and the tool's message, ``candidates``, ``tool_versions``, ``timings_s``).
Exit status: 0 ok, 2 a tool refused the model (see the summary), 1 a crash of this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts this file's folder (edgead/deploy) first on sys.path; keep it out.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.metadata as metadata  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

SUMMARY_FILE = "tflite_summary.json"
FP32_FILE = "model.tflite"
TOOL_PACKAGES = ("onnx2tf", "ai-edge-quantizer", "ai-edge-litert", "onnx", "numpy")


class StageError(Exception):
    """A tool refused the model; ``detail`` is its own traceback or message."""

    def __init__(self, stage: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.stage, self.message, self.detail = stage, message, detail


def batch_one(onnx_path: Path, out_path: Path, simplify: bool) -> None:
    """The graph with batch 1 on its input and outputs, intermediate shapes inferred again, and with
    ``simplify`` its shape computations folded (onnxsim: e.g. the sizes of the student's autoencoder Resize
    ops, computed from Shape ops, which onnx2tf would otherwise lower to ops XNNPACK cannot run)."""
    import onnx
    import onnxsim

    model = onnx.load(str(onnx_path))
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = 1
    del model.graph.value_info[:]  # recorded with the free batch dimension
    if simplify:
        model, _ = onnxsim.simplify(model)
    onnx.save(onnx.shape_inference.infer_shapes(model), str(out_path))


def runs(path: Path) -> str | None:
    """None if LiteRT runs the file on a blank image, else its error."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(path), num_threads=1)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        interpreter.invoke()
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None


def convert(onnx_path: Path, out_path: Path, work: Path) -> None:
    """onnx2tf on the batch-1 graph, simplified first; if that file does not run (onnx2tf lowers some
    simplified graphs wrongly: DifferNet's flow, "Input tensor ... lacks data"), on the graph as it is."""
    import onnx2tf

    failures = []
    for simplify in (True, False):
        folder = work / f"onnx2tf_{'simplified' if simplify else 'plain'}"
        static = folder.with_suffix(".onnx")
        try:
            batch_one(onnx_path, static, simplify)
            onnx2tf.convert(
                input_onnx_file_path=str(static),
                output_folder_path=str(folder),
                batch_size=1,
                tflite_backend="flatbuffer_direct",
                verbosity="error",
            )
        except SystemExit as exc:  # onnx2tf exits on some refusals
            failures.append(f"onnx2tf stopped (exit status {exc.code})")
            continue
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        written = sorted(folder.glob("*_float32.tflite"))
        error = runs(written[0]) if written else "onnx2tf wrote no float32 .tflite file"
        if error is None:
            written[0].replace(out_path)
            return
        failures.append(error)
    raise StageError(
        "convert", "onnx2tf could not convert the graph: " + "; then, unsimplified: ".join(failures)
    )


WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def op_owners(interpreter, region: str) -> list[tuple[str, str]]:
    """(output tensor name, owner) of every op; the owner is the ONNX name that says where the op belongs.

    onnx2tf names an op's output after the tensor's next consumer (a stage's last convolution writes
    ``/backbone/stages.1/.../Conv_input_nhwc``), which would put each stage's last op in the next stage. So a
    weighted op is owned by its weights' name (``/backbone/stages.0/.../Conv_depthwise_filter``); another op
    whose output is named inside ``region`` (a residual add, a padding) by the owner of the op that produced
    its input when that is inside ``region`` too; any other op (pooling, resizing, the head) by its output name.
    """
    import re

    tensors = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    owner_of_tensor: dict[int, str] = {}
    result = []
    for op in interpreter._get_ops_details():
        output = tensors.get(int(op["outputs"][0]), "")
        inputs = [int(i) for i in op["inputs"] if int(i) >= 0]
        if op["op_name"] in WEIGHTED_OPS and len(inputs) > 1 and "/" in tensors.get(inputs[1], ""):
            owner = tensors[inputs[1]]
        else:
            producer = next((owner_of_tensor[i] for i in inputs if i in owner_of_tensor), "")
            inside = re.search(region, output) and re.search(region, producer)
            owner = producer if inside else output
        for index in op["outputs"]:
            owner_of_tensor[int(index)] = owner
        result.append((output, owner))
    return result


def read_outside(interpreter, owners: list[tuple[str, str]], region: str) -> set[str]:
    """Outputs read by an op outside ``region`` (the head, pooling, resizing): kept float at their source.

    The head compares the networks' features (the student's and the autoencoder's against the teacher's):
    their differences are small next to the features' own range, so 8-bit features would bury them in
    rounding. ONNX Runtime's recipe hands float readers the float tensor for the same reason.
    """
    import re

    tensors = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    outside = set()
    for op, (_, owner) in zip(interpreter._get_ops_details(), owners, strict=True):
        if not re.search(region, owner):
            outside.update(tensors.get(int(i), "") for i in op["inputs"] if int(i) >= 0)
    return outside


def quantize(
    fp32: Path, out_path: Path, calibration: np.ndarray, int8_regex: str, float_regexes: list[str]
) -> dict[str, Any]:
    """Static INT8 for the ops owned by ``int8_regex`` and none of ``float_regexes`` (see :func:`op_owners`);
    AI Edge Quantizer gets their exact output names (its scope is ``"<output name>;"``), every other op stays float."""
    import re

    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, qtyping, quantizer
    from ai_edge_quantizer.utils import qsv_utils

    interpreter = Interpreter(model_path=str(fp32))
    owners = op_owners(interpreter, int8_regex)
    int8_ops = {
        output
        for output, owner in owners
        if output and re.search(int8_regex, owner) and not any(re.search(r, owner) for r in float_regexes)
    }
    int8_ops -= read_outside(interpreter, owners, int8_regex)
    if not int8_ops:
        raise StageError(
            "int8",
            f"no op of {fp32.name} is in the INT8 scope",
            "op owners: " + ", ".join(owner for _, owner in owners[:20]),
        )
    recipe = quantizer.Quantizer(str(fp32))
    recipe.add_static_config(
        regex="^(?:" + "|".join(re.escape(name) for name in int8_ops) + ");$",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        activation_num_bits=8,
        weight_num_bits=8,
    )
    signature = interpreter.get_signature_list()
    key = next(iter(signature))
    (input_name,) = signature[key]["inputs"]
    samples = {key: [{input_name: image[None]} for image in calibration]}
    try:
        # Ranges from the extremes over all calibration images, as ONNX Runtime's MinMax calibration: the
        # quantizer's default (an exponential moving average of each image's min/max) clips the tails.
        ranges = calibrator.Calibrator(str(fp32), num_threads=2, qsv_update_func=qsv_utils.min_max_update)
        ranges.calibrate(samples, recipe._recipe_manager)
        recipe.quantize(ranges.get_model_qsvs()).export_model(str(out_path), overwrite=True)
    except Exception as exc:
        raise StageError("int8", f"AI Edge Quantizer failed: {exc}", traceback.format_exc()) from None
    return {"int8_ops": len(int8_ops), "ops": len(owners)}


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "ok": False,
        "tool_versions": tool_versions(),
        "timings_s": {},
        "candidates": [],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="edgead-tflite-") as scratch:
            start = time.perf_counter()
            fp32 = out_dir / FP32_FILE
            convert(Path(args.onnx), fp32, Path(scratch))
            summary["timings_s"]["convert"] = round(time.perf_counter() - start, 2)
        calibration = np.load(args.calibration, allow_pickle=False) if args.candidate else None
        for index, candidate in enumerate(args.candidate):
            start = time.perf_counter()
            path = out_dir / f"candidate_{index}.int8.tflite"
            entry: dict[str, Any] = {"float_regexes": json.loads(candidate), "file": path.name}
            try:
                entry.update(quantize(fp32, path, calibration, args.int8_regex, entry["float_regexes"]))
            except StageError as exc:  # one scope the quantizer refuses does not stop the others
                entry.update(file=None, error=exc.message, detail=exc.detail[-2000:])
            entry["seconds"] = round(time.perf_counter() - start, 2)
            summary["candidates"].append(entry)
        summary["ok"] = True
    except StageError as exc:
        summary["error"] = {"stage": exc.stage, "message": exc.message, "detail": exc.detail[-4000:]}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ONNX -> TensorFlow Lite (fp32 and INT8 candidates)")
    parser.add_argument("onnx")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--calibration", help="uint8 or float32 .npy of normal images in the .tflite input layout"
    )
    parser.add_argument("--int8-regex", default="", help="op output tensor names that may run in INT8")
    parser.add_argument("--candidate", action="append", default=[], help="JSON list of regexes kept in float")
    args = parser.parse_args(argv)
    if args.candidate and not (args.calibration and args.int8_regex):
        parser.error("--candidate needs --calibration and --int8-regex")
    summary = run(args)
    if not summary["ok"]:
        print(
            f"[tflite] failed at '{summary['error']['stage']}': {summary['error']['message']}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
