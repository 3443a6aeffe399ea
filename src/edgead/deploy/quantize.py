"""INT8 post-training static quantization of an exported edgead ONNX file.

Calibration images are normal images (train/good of the run's dataset by default): PTQ only needs
activation ranges, and normal images are what a user has.

- ONNX Runtime: QDQ format, uint8 activations, int8 per-channel weights (ONNX Runtime's x86 kernels
  are fastest with unsigned activations), MinMax calibration; convolutions (with their ReLU6) are quantized.
- OpenVINO + NNCF: ``nncf.quantize`` on the OpenVINO model, saved as an IR (.xml + .bin).

Both correct the bias of every INT8 convolution for the mean output shift its weight rounding causes
(NNCF's fast bias correction; for ONNX Runtime :func:`correct_rounding_bias`): it lowers the normal-score
error of every benchmark run (TinyGLASS KolektorSDD: 4.6% -> 3.2% of the spread, docs/results/int8_scope.md).

What runs in INT8 is chosen per model on its normal validation images: the widest of "the backbone from
stage 1 on", "from stage 2 on", ..., "the deepest stage only" whose scores stay within INT8_ERROR_BUDGET
(10% of the normal score spread) of fp32's; the deepest stage only when there are no validation images.
Always kept in float:
- the head and the postprocess: calibration sees normal images only, so the ranges of the head's outputs
  (patch scores, distances) would end at the normal maximum and clip every anomaly to the same value;
  PatchCore's |q|^2 - 2 q.m + |m|^2 would also lose the small distances to 8-bit rounding;
- the stem stage: its rounding error propagates through every later layer. Earlier stages can cost more
  than they save too (PaDiM bottle: scores moved by 0.7x their spread with stage 0 alone in float,
  docs/results/int8_scope.md); the budget decides. Ops kept in float also read float tensors: a tensor
  quantized for its INT8 reader is not handed to its float readers as the rounded copy.
ReLU6 (Clip) is quantized together with its convolution, so that the conv's INT8 range is the
activation's [0, 6], not the pre-activation range (a ~5x coarser step otherwise).

Every INT8 file also records how far its scores on the run's normal validation images are from the fp32
model's (``int8_score_error``: mean absolute difference over the normal score spread, threshold - min;
``int8_rank_correlation``): a label-free check a user can read before deploying.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from edgead.deploy.onnx_export import (
    CONFIG_KEY,
    GRAPH_HASH_KEY,
    HEAD_WEIGHTS_KEY,
    INPUT_NAME,
    IR_METADATA_KEY,
    METADATA_SEAL_KEY,
    OUTPUT_NAMES,
    read_metadata,
    seal_metadata,
    to_input,
    write_metadata,
)
from edgead.errors import EdgeadError
from edgead.integrity import seal
from edgead.outputs import atomic_file
from edgead.runs import SEAL_KEY

HEAD_SCOPES = ("/head/", "/postprocess/")  # node-name parts of ops that always stay in float
# Backbone stages (the student model's teacher stages too) and the trained networks in the backbone slot
# (student, autoencoder, SimCLR encoder), which run on the device: the ops that can run in INT8.
STAGE_NAME = re.compile(r"(/backbone/(?:teacher/)?stages\.)(\d+)/")
INT8_REGION = re.compile(r"/backbone/((?:teacher/)?stages\.\d+|student|autoencoder|encoder)/")
T = TypeVar("T")
FLOAT_STAGES_KEY = "int8_float_stages"  # metadata: which backbone stages an INT8 file keeps in float


def _stages(model_path: str | Path) -> tuple[str, int]:
    """The backbone stages' node-name prefix and the deepest stage's index; ("", 0) for a graph with no
    backbone stages whose networks can still run in INT8 (the autoencoder's, SimCLR's encoder)."""
    import onnx

    names = [n.name for n in onnx.load(str(model_path)).graph.node]
    found = [m for name in names if (m := STAGE_NAME.search(name))]
    if found:
        deepest = max(found, key=lambda m: int(m.group(2)))
        return deepest.group(1), int(deepest.group(2))
    if any(INT8_REGION.search(name) for name in names):
        return "", 0
    raise EdgeadError(f"{model_path} has no backbone nodes to quantize (/backbone/stages.N/ and the like)")


def int8_scope(model_path: str | Path) -> str:
    """Node-name part of the deepest backbone stage in the graph, the one that always runs in INT8."""
    prefix, deepest = _stages(model_path)
    return f"{prefix}{deepest}/" if prefix else "/backbone/"


def float_scopes(model_path: str | Path) -> tuple[str, ...]:
    """Node-name parts of the ops kept in float: head, postprocess and every backbone stage but the deepest."""
    prefix, deepest = _stages(model_path)
    return HEAD_SCOPES + tuple(f"{prefix}{i}/" for i in range(deepest))


# Of the normal score spread: the widest INT8 scope whose validation scores stay this close to fp32 is used.
INT8_ERROR_BUDGET = 0.1


def candidate_float_scopes(model_path: str | Path) -> list[tuple[str, ...]]:
    """Float scopes to try, most INT8 first: head and postprocess plus stage 0, plus stages 0-1, ..., up to
    :func:`float_scopes` (every stage but the deepest in float), the one kept when no other is close enough."""
    prefix, deepest = _stages(model_path)
    return [HEAD_SCOPES + tuple(f"{prefix}{i}/" for i in range(n)) for n in range(1, deepest)] + [
        float_scopes(model_path)
    ]


def widest_within_budget(
    scopes: list[tuple[str, ...]],
    quantize: Callable[[tuple[str, ...]], tuple[T, np.ndarray]],
    fp32_scores: np.ndarray,
    spread: float,
) -> tuple[T, np.ndarray, tuple[str, ...]]:
    """Quantize with each float scope in turn (``quantize(scope)`` -> model, its normal validation scores)
    and keep the first whose scores are within :data:`INT8_ERROR_BUDGET` of fp32's, else the last.

    Which layers run in INT8 is chosen per model on normal validation images only (no labels, no test
    images): on some runs quantizing stages 1-2 as well costs almost nothing, on others (PaDiM bottle) it
    moves the scores by several times their spread (docs/results/int8_scope.md).
    """
    for scope in scopes:
        model, scores = quantize(scope)
        if score_agreement(fp32_scores, scores, spread)["int8_score_error"] <= INT8_ERROR_BUDGET:
            break
    return model, scores, scope


def _runs_in_float(name: str, keep_float: tuple[str, ...]) -> bool:
    """Whether the op named ``name`` stays in float: inside a float scope, or outside the INT8 region."""
    return any(part in name for part in keep_float) or not INT8_REGION.search(name)


def _float_readers_onnx(path: Path, keep_float: tuple[str, ...]) -> None:
    """Ops that stay in float read the float tensor, not its quantize-dequantize copy.

    A tensor quantized for its INT8 reader is shared: the quantizer points every reader at the
    dequantized copy, so the stride-8 features that go straight to the head would be INT8-rounded too.
    """
    import onnx

    model = onnx.load(str(path))
    quantize_inputs = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    float_of = {
        n.output[0]: quantize_inputs[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantize_inputs
    }
    for node in model.graph.node:
        if not _runs_in_float(node.name, keep_float) or node.op_type in (
            "QuantizeLinear",
            "DequantizeLinear",
        ):
            continue
        for i, name in enumerate(node.input):
            if name in float_of:
                node.input[i] = float_of[name]
    while True:  # drop the quantize/dequantize pairs nobody reads any more
        used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type.endswith("Linear") and n.output[0] not in used]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    onnx.save(model, str(path))


def _activations_read_in_float(nodes, excluded: set[str]) -> list[str]:
    """Clip/Relu nodes whose every reader stays in float: they must stay in float too.

    ONNX Runtime's QDQ quantizer drops a quantized activation and lets the quantization range do the
    clipping; a float reader of it would then get the unclipped tensor.
    """
    readers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    return [
        n.name
        for n in nodes
        if n.op_type in ("Clip", "Relu")
        and n.name not in excluded
        and readers.get(n.output[0])
        and all(reader in excluded for reader in readers[n.output[0]])
    ]


def _input_dtype(metadata: dict[str, str]) -> str:
    return "uint8" if metadata.get("input_format", "").startswith("uint8") else "float32"


def score_agreement(fp32: np.ndarray, int8: np.ndarray, spread: float) -> dict[str, float]:
    """How far INT8 scores are from fp32 on the same normal images: mean |difference| over ``spread``
    (the normal score range, threshold - min) and the Spearman rank correlation."""
    fp32, int8 = np.asarray(fp32, np.float64).ravel(), np.asarray(int8, np.float64).ravel()
    error = float(np.mean(np.abs(int8 - fp32)) / max(spread, 1e-12))
    ranks = [np.argsort(np.argsort(s)) for s in (fp32, int8)]
    correlation = float(np.corrcoef(*ranks)[0, 1]) if len(fp32) > 1 and np.ptp(fp32) > 0 else 1.0
    return {"int8_score_error": round(error, 4), "int8_rank_correlation": round(correlation, 4)}


def onnx_scores(model_path: str | Path, metadata: dict[str, str], images: np.ndarray) -> np.ndarray:
    """Image scores of an ONNX file on uint8 NHWC ``images`` (ONNX Runtime)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAMES[1]], {INPUT_NAME: to_input(images, _input_dtype(metadata))})[0]


def score_spread(metadata: dict[str, str]) -> float:
    """The fp32 model's normal score range, threshold - min: the unit of the INT8 score error."""
    config = json.loads(metadata[CONFIG_KEY])
    return float(config["threshold"]) - float(config["score_min"])


def recalibrated_metadata(
    metadata: dict[str, str], validation: np.ndarray, scores: np.ndarray, fp32: np.ndarray
) -> dict[str, str]:
    """The metadata with the INT8 model's own threshold and score range, from its ``scores`` on the run's
    normal ``validation`` images (the images the fp32 threshold came from; never test images), and its
    agreement with the fp32 model's scores ``fp32`` on them.

    INT8 shifts the scores slightly; keeping the fp32 threshold would flag more or fewer normal parts.
    """
    from edgead.training import calibrate

    config = json.loads(metadata[CONFIG_KEY])
    agreement = score_agreement(fp32, scores, score_spread(metadata))
    calibration = calibrate(np.asarray(scores, dtype=np.float64), float(config["threshold_quantile"]))
    config.update(calibration)
    source = f"int8 model on {len(validation)} normal validation images"
    config.setdefault("extra", {}).update(threshold_source=source, **agreement)
    return {
        **metadata,
        **{key: repr(value) for key, value in {**calibration, **agreement}.items()},
        CONFIG_KEY: json.dumps(seal(config, SEAL_KEY)),  # a changed threshold: the config is sealed anew
        "threshold_source": source,
    }


def _quantize_within_budget(
    model_path: str | Path,
    metadata: dict[str, str],
    validation: np.ndarray | None,
    quantize: Callable[[tuple[str, ...]], tuple[T, np.ndarray | None]],
    keep_float: tuple[str, ...] | None = None,
) -> tuple[T, tuple[str, ...], dict[str, str]]:
    """``quantize(scope)`` -> (model, its validation scores) with ``keep_float``, or the widest scope within the
    budget; returns the model, its float scope and the metadata with the INT8 model's own threshold.
    Without validation images there is nothing to check against: :func:`float_scopes`, the fp32 threshold."""
    if validation is None or len(validation) == 0:
        scope = keep_float if keep_float is not None else float_scopes(model_path)
        return quantize(scope)[0], scope, metadata
    scopes = [keep_float] if keep_float is not None else candidate_float_scopes(model_path)
    reference = onnx_scores(model_path, metadata, validation)
    model, scores, scope = widest_within_budget(scopes, quantize, reference, score_spread(metadata))
    return model, scope, recalibrated_metadata(metadata, validation, scores, reference)


def _float_stages_note(keep_float: tuple[str, ...]) -> str:
    stages = sorted(int(m.group(2)) for part in keep_float if (m := STAGE_NAME.search(part)))
    return f"backbone stages {stages} in float" if stages else "whole backbone in INT8"


def _channel_means(
    model_path: Path, tensors: list[str], inputs: np.ndarray, batch: int = 4
) -> list[np.ndarray]:
    """Mean of each NCHW tensor in ``tensors`` per channel, over ``inputs`` and all positions."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_value_info(name, onnx.TypeProto()) for name in tensors)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sums = [0.0] * len(tensors)
    for start in range(0, len(inputs), batch):
        outputs = session.run(tensors, {INPUT_NAME: inputs[start : start + batch]})
        sums = [
            total + out.mean(axis=(2, 3), dtype=np.float64).sum(axis=0)
            for total, out in zip(sums, outputs, strict=True)
        ]
    return [total / len(inputs) for total in sums]


def correct_rounding_bias(quantized_path: Path, float_path: Path, inputs: np.ndarray) -> int:
    """Subtract from each INT8 convolution's bias the mean output shift its weight rounding causes.

    Rounding weights to int8 moves a conv's output by (W_q - W) x, whose mean over normal images,
    (W_q - W) E[x], is a per-channel offset that the following layers carry and amplify (empirical bias
    correction, Nagel et al. 2019, "Data-Free Quantization"). E[x] is measured on the calibration images in
    the float model ``float_path``, the model that was quantized. Returns the number of corrected convs.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(quantized_path))
    weights = {i.name: i for i in onnx.load(str(float_path)).graph.initializer}
    initializers = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}

    def dequantize_input(node, index: int):
        source = producer.get(node.input[index]) if len(node.input) > index else None
        return source if source is not None and source.op_type == "DequantizeLinear" else None

    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        x, w, b = (dequantize_input(node, i) for i in range(3))
        quantize = producer.get(x.input[0]) if x is not None else None
        if quantize is None or quantize.op_type != "QuantizeLinear" or w is None or b is None:
            continue
        if w.input[0] not in initializers or b.input[0] not in initializers:
            continue
        float_name = w.input[0].removesuffix("_quantized")
        if float_name in weights:
            convs.append((node, quantize.input[0], w, b, float_name))
    if not convs:
        return 0
    names = sorted({c[1] for c in convs})
    means = dict(zip(names, _channel_means(float_path, names, inputs), strict=True))

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name]).astype(np.float64)

    for node, x_name, w, b, float_name in convs:
        shape = (-1, 1, 1, 1)
        rounded = (array(w.input[0]) - array(w.input[2]).reshape(shape)) * array(w.input[1]).reshape(shape)
        error = rounded - numpy_helper.to_array(weights[float_name]).astype(np.float64)
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        per_group = error.shape[1]
        mean_x = means[x_name].reshape(groups, per_group)
        out_group = np.arange(error.shape[0]) // (error.shape[0] // groups)
        shift = np.einsum("oi,oi->o", error.sum(axis=(2, 3)), mean_x[out_group])
        bias = array(b.input[0]) - shift / array(b.input[1])
        info = np.iinfo(np.int32)
        initializers[b.input[0]].CopyFrom(
            numpy_helper.from_array(np.clip(np.round(bias), info.min, info.max).astype(np.int32), b.input[0])
        )
    onnx.save(model, str(quantized_path))
    return len(convs)


def quantize_head_weights(path: Path) -> int:
    """Store every head convolution's weight as int8 (symmetric, one scale per output channel) behind a
    DequantizeLinear; returns how many. The head's activations stay float, so nothing is clipped to the
    range of the normal calibration images (why the head is not quantized statically); only the weights are
    rounded, which shrinks a flow that is most of the file by 4x."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    count = 0
    for node in list(graph.node):
        weight = initializers.get(node.input[1]) if node.op_type == "Conv" and "/head/" in node.name else None
        if weight is None:
            continue
        values = numpy_helper.to_array(weight)
        scale = np.abs(values).reshape(len(values), -1).max(axis=1) / 127
        scale[scale == 0] = 1.0
        shape = (-1,) + (1,) * (values.ndim - 1)
        q = np.clip(np.round(values / scale.reshape(shape)), -127, 127).astype(np.int8)
        name = weight.name
        graph.initializer.remove(weight)
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{name}/int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}/scale"),
            numpy_helper.from_array(np.zeros(len(values), np.int8), f"{name}/zero_point"),
        ])
        graph.node.insert(0, helper.make_node(
            "DequantizeLinear", [f"{name}/int8", f"{name}/scale", f"{name}/zero_point"], [name],
            name=f"{name}/dequantize", axis=0,
        ))
        count += 1
    onnx.save(model, str(path))
    return count


def _check_calibration(images: np.ndarray) -> None:
    if images is None or len(images) == 0:
        raise EdgeadError("calibration needs at least one image, got none")


def quantize_onnxruntime(
    model_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    keep_float: tuple[str, ...] | None = None,
    validation: np.ndarray | None = None,
    bias_correction: bool = True,
) -> Path:
    """INT8 QDQ model for ONNX Runtime; ``calibration`` is uint8 NHWC normal images.

    Nodes whose name contains one of ``keep_float`` stay in float. With ``validation`` (the run's normal
    validation images, uint8 NHWC), the threshold is re-derived from the INT8 model's own scores and, unless
    ``keep_float`` is given, the float scope is the widest INT8 one within the error budget
    (:func:`widest_within_budget`); without, :func:`float_scopes`.
    ``bias_correction``: :func:`correct_rounding_bias` on the INT8 convolutions (off only to measure its effect).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _check_calibration(calibration)
    metadata = read_metadata(model_path)
    inputs = to_input(calibration, _input_dtype(metadata))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(inputs[i : i + 1] for i in range(len(inputs)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {INPUT_NAME: item}

    final_path = Path(out_path)
    # The quantizer writes in place: all of it goes to a temporary sibling, renamed over the final file only
    # once finished, so an interrupted quantization leaves the previous file as it was.
    with atomic_file(final_path) as out_path:
        validating = validation is not None and len(validation) > 0
        head_weights = metadata.get(HEAD_WEIGHTS_KEY) == "true"

        def quantize(scope: tuple[str, ...]) -> tuple[Path, np.ndarray | None]:
            with tempfile.TemporaryDirectory() as tmp:
                prepared = Path(tmp) / "prepared.onnx"
                quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
                nodes = onnx.load(str(prepared)).graph.node
                excluded = [n.name for n in nodes if any(part in n.name for part in scope)]
                excluded += _activations_read_in_float(nodes, set(excluded))
                quantize_static(
                    str(prepared),
                    str(out_path),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=["Conv", "Clip", "Relu"],  # activations fold into the conv ranges
                    nodes_to_exclude=excluded,
                )
                if bias_correction:
                    correct_rounding_bias(out_path, prepared, inputs)
            _float_readers_onnx(out_path, scope)
            if head_weights:
                quantize_head_weights(out_path)
            if not validating:
                return out_path, None
            return out_path, onnx_scores(out_path, metadata, validation)

        _, scope, metadata = _quantize_within_budget(model_path, metadata, validation, quantize, keep_float)
        metadata[FLOAT_STAGES_KEY] = _float_stages_note(scope)
        metadata["quantization"] = (
            f"int8 onnxruntime QDQ, u8 activations, s8 per-channel weights, {len(inputs)} images, "
            + metadata[FLOAT_STAGES_KEY]
            + (", rounding bias corrected" if bias_correction else "")
            + (", head convolution weights in s8 per channel (head activations float)" if head_weights else "")
        )
        write_metadata(out_path, metadata)
    return final_path


def quantize_openvino(
    model_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    validation: np.ndarray | None = None,
) -> Path:
    """INT8 OpenVINO IR via NNCF; ``out_path`` ends in .xml (the weights go next to it as .bin).

    ``validation``: as in :func:`quantize_onnxruntime`, the INT8 model's own threshold and the float scope."""
    import nncf
    import openvino as ov

    _check_calibration(calibration)
    out_path = Path(out_path)
    if out_path.suffix != ".xml":
        raise EdgeadError(f"an OpenVINO IR file name ends in .xml, got {out_path}")
    metadata = read_metadata(model_path)
    inputs = to_input(calibration, _input_dtype(metadata))
    validating = validation is not None and len(validation) > 0

    def quantize(scope: tuple[str, ...]):
        # convert_model folds constants (read_model does not): NNCF's bias correction only finds a conv's
        # bias when it is a Constant, not the Reshape of one that the ONNX reader leaves, and skipped every conv.
        quantized = nncf.quantize(
            ov.convert_model(str(model_path)),
            nncf.Dataset([inputs[i : i + 1] for i in range(len(inputs))]),
            subset_size=len(inputs),
            ignored_scope=nncf.IgnoredScope(
                # OpenVINO renames the ops that produce the graph outputs after those outputs
                patterns=[f".*{re.escape(part)}.*" for part in scope]
                + [f"^{re.escape(name)}$" for name in OUTPUT_NAMES],
                validate=False,
            ),
        )
        _float_readers_openvino(quantized, scope)
        if not validating:
            return quantized, None
        compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled(to_input(validation, _input_dtype(metadata)))
        return quantized, np.asarray(result[compiled.output(OUTPUT_NAMES[1])])

    quantized, scope, metadata = _quantize_within_budget(model_path, metadata, validation, quantize)
    metadata[FLOAT_STAGES_KEY] = _float_stages_note(scope)
    metadata["quantization"] = (
        f"int8 openvino nncf, {len(inputs)} images, {metadata[FLOAT_STAGES_KEY]}, fast bias correction"
    )
    return save_openvino(quantized, out_path, metadata)


def _float_readers_openvino(model, keep_float: tuple[str, ...]) -> None:
    """Ops that stay in float read the float tensor, not NNCF's FakeQuantize of it.

    NNCF skips the ignored ops themselves but still quantizes tensors they read when an INT8 op reads
    them too (seen: stage 2's output, which is both the INT8 stage's input and the head's stride-8
    features) or when they sit between two ignored ops (the anomaly map between the blur passes).
    """
    for op in model.get_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        for reader in op.output(0).get_target_inputs():
            if _runs_in_float(reader.get_node().get_friendly_name(), keep_float):
                reader.replace_source_output(op.input_value(0))
    model.validate_nodes_and_infer_types()


def convert_openvino(model_path: str | Path, out_path: str | Path) -> Path:
    """The fp32 OpenVINO IR of an edgead ONNX file, metadata included."""
    import openvino as ov

    metadata = read_metadata(model_path)
    return save_openvino(ov.Core().read_model(str(model_path)), out_path, metadata)


def openvino_weights_sha256(model) -> str:
    """sha256 over an OpenVINO model's constants (its weights), by name: what a changed .bin byte alters."""
    digest = hashlib.sha256()
    constants = [op for op in model.get_ops() if op.get_type_name() == "Constant"]
    for op in sorted(constants, key=lambda op: op.get_friendly_name()):
        digest.update(op.get_friendly_name().encode())
        digest.update(hashlib.sha256(np.ascontiguousarray(op.get_data()).tobytes()).digest())
    return digest.hexdigest()


def save_openvino(model, out_path: str | Path, metadata: dict[str, str]) -> Path:
    """Save an IR (.xml + .bin) with edgead's metadata and its weights' sha256, via temporary names."""
    import openvino as ov

    out_path = Path(out_path)
    metadata = {k: v for k, v in metadata.items() if k not in (GRAPH_HASH_KEY, METADATA_SEAL_KEY)}  # the ONNX's
    metadata["weights_sha256"] = openvino_weights_sha256(model)
    model.set_rt_info(json.dumps(seal_metadata(metadata)), [IR_METADATA_KEY])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(f".edgead-{out_path.stem}.partial.xml")
    try:
        ov.save_model(model, str(staging), compress_to_fp16=False)
        os.replace(staging.with_suffix(".bin"), out_path.with_suffix(".bin"))
        os.replace(staging, out_path)
    finally:
        staging.unlink(missing_ok=True)
        staging.with_suffix(".bin").unlink(missing_ok=True)
    return out_path
