"""Coral Edge TPU check of a .tflite file: its operators, dtypes and shapes against the Edge TPU's documented limits.

`edgead budget MODEL.tflite --device coral` runs it. The Edge TPU compiler (``edgetpu_compiler``, x86-64
Debian only, from Coral's apt repository) cannot be installed here, so this is a static check of the file
(nothing runs); the compiler has the final word, and also refuses operator *versions* it does not know.

What the Edge TPU needs (https://coral.ai/docs/edgetpu/models-intro/ "Model requirements"; the limitation
texts as mirrored for ARTPEC-7, https://developer.axis.com/computer-vision/on-device/system-on-chip/artpec-7/):
- tensors quantized to 8 bits (int8/uint8), parameters constant at compile time;
- tensor sizes constant at compile time (no dynamic shapes);
- tensors of rank 1-3; a rank-4+ tensor may only have its 3 innermost dimensions > 1;
- only the operators below. The compiler cuts the graph once: the first unsupported op and EVERY op after
  it run on the CPU, so an unsupported op near the input costs the whole model;
- parameters are cached in roughly 8 MB of on-chip SRAM; what does not fit streams from host memory at
  every inference (slower, still runs) - https://coral.ai/docs/edgetpu/compiler/
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SRAM_BYTES = 8_000_000  # "roughly 8 MB of SRAM" for parameter caching (coral.ai/docs/edgetpu/compiler)
SOFTMAX_MAX_ELEMENTS = 16_000

# TFLite builtin operator (schema enum name) -> Coral's "known limitations" text ("" = none documented).
# Texts: coral.ai models-intro table as mirrored by Axis for ARTPEC-7 (Add ... ResizeBilinear), and the
# earlier coral.ai table (ResizeNearestNeighbor ... StridedSlice). Rsqrt, Sum, SquaredDifference, Transpose
# and TransposeConv are in Coral's list of supported ops, but their limitation texts were not retrieved.
EDGETPU_OPS: dict[str, str] = {
    "ADD": "",
    "AVERAGE_POOL_2D": "No fused activation function.",
    "CONCATENATION": "No fused activation function. If any input is a compile-time constant tensor, there "
    "must be only 2 inputs, and this constant tensor must be all zeros (effectively, a zero-padding op).",
    "CONV_2D": "Must use the same dilation in x and y dimensions.",
    "DEPTHWISE_CONV_2D": "Must use the same dilation in x and y dimensions.",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": "Only the default format is supported for fully-connected weights. Output tensor is "
    "one-dimensional.",
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    "LSTM": "Unidirectional LSTM only.",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "Unidirectional LSTM only.",
    "MAXIMUM": "",
    "MAX_POOL_2D": "No fused activation function.",
    "MEAN": "No reduction in batch dimension. If a z-reduction, the z-dimension must be multiple of 4.",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "No packing in batch dimension.",
    "PAD": "No padding in batch dimension.",
    "PRELU": "Alpha must be 1-dimensional (only the innermost dimension can be >1 size).",
    "QUANTIZE": "",
    "REDUCE_MAX": "Cannot operate on the batch dimension.",
    "REDUCE_MIN": "Cannot operate on the batch dimension.",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "Certain reshapes might not be mapped for large tensor sizes.",
    "RESIZE_BILINEAR": "Input/output is a 3-dimensional tensor. Depending on input/output size, this "
    "operation might not be mapped to the Edge TPU to avoid loss in precision.",
    "RESIZE_NEAREST_NEIGHBOR": "Input/output is a 3-dimensional tensor. Depending on input/output size, this "
    "operation may not be mapped to the Edge TPU to avoid loss in precision.",
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": "Supports only 1D input tensor with a max of 16,000 elements.",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "",
    "SQUEEZE": "Supported only when the squeezed dimensions are leading 1s (no relayout needed).",
    "STRIDED_SLICE": "Supported only when all strides are equal to 1, with ellipsis_mask == 0 and "
    "new_axis_mask == 0.",
    "SUB": "",
    "SUM": "",
    "SQUARED_DIFFERENCE": "",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}
# Ops whose float input is expected (the model's float->int8 entry): not a dtype problem.
FLOAT_INPUT_OK = {"QUANTIZE"}
QUANT_TYPES = {"INT8", "UINT8"}
REDUCERS = {"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN"}


@dataclass
class Tensor:
    index: int
    name: str
    dtype: str
    shape: list[int]
    shape_signature: list[int]
    constant: bool
    nbytes: int


@dataclass
class Op:
    index: int
    name: str  # TFLite builtin name, or the custom op's name
    version: int
    inputs: list[int]
    outputs: list[int]
    options: dict = field(default_factory=dict)


@dataclass
class Finding:
    op_index: int
    op: str
    severity: str  # "cpu": the op (and everything after it) leaves the Edge TPU; "warn": may not be mapped
    reason: str


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _enum_names(enum_class) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items() if not name.startswith("_")}


def _buffer_bytes(model, buffer_index: int, raw: bytes) -> bytes:
    """The bytes of a constant buffer (inline, or after the flatbuffer for models over 2 GB)."""
    if buffer_index <= 0:
        return b""
    buf = model.Buffers(buffer_index)
    if buf.Offset() > 1 and buf.Size() > 0:
        return raw[buf.Offset() : buf.Offset() + buf.Size()]
    data = buf.DataAsNumpy()
    return b"" if isinstance(data, int) else data.tobytes()


def _options(schema, op, name: str) -> dict:
    """The few builtin options the checks need."""
    table = op.BuiltinOptions()
    if table is None:
        return {}
    classes = {
        "CONV_2D": schema.Conv2DOptions,
        "DEPTHWISE_CONV_2D": schema.DepthwiseConv2DOptions,
        "AVERAGE_POOL_2D": schema.Pool2DOptions,
        "MAX_POOL_2D": schema.Pool2DOptions,
        "CONCATENATION": schema.ConcatenationOptions,
        "STRIDED_SLICE": schema.StridedSliceOptions,
    }
    cls = classes.get(name)
    if cls is None:
        return {}
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    out = {}
    if hasattr(opts, "FusedActivationFunction"):
        out["fused_activation"] = int(opts.FusedActivationFunction())
    if hasattr(opts, "DilationHFactor"):
        out["dilation"] = (int(opts.DilationHFactor()), int(opts.DilationWFactor()))
    if name == "STRIDED_SLICE":
        out["ellipsis_mask"] = int(opts.EllipsisMask())
        out["new_axis_mask"] = int(opts.NewAxisMask())
    return out


def read_tflite(path: str | Path) -> dict:
    """Operators (execution order of subgraph 0), tensors, subgraph count and metadata names of a .tflite."""
    from edgead.deploy.tflite_file import read_model

    schema = _schema()
    model, raw = read_model(Path(path))
    builtin_names = _enum_names(schema.BuiltinOperator)
    type_names = _enum_names(schema.TensorType)
    graph = model.Subgraphs(0)

    constants: dict[int, bytes] = {}
    tensors = []
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        data = _buffer_bytes(model, tensor.Buffer(), raw)
        shape = [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else []
        signature = (
            [int(d) for d in tensor.ShapeSignatureAsNumpy()] if tensor.ShapeSignatureLength() else shape
        )
        if data:
            constants[t] = data
        tensors.append(
            Tensor(
                index=t,
                name=(tensor.Name() or b"").decode("utf-8", "replace"),
                dtype=type_names.get(tensor.Type(), str(tensor.Type())),
                shape=shape,
                shape_signature=signature,
                constant=bool(data),
                nbytes=len(data),
            )
        )

    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = builtin_names.get(builtin, str(builtin))
        if name == "CUSTOM":
            name = (code.CustomCode() or b"CUSTOM").decode("utf-8", "replace")
        ops.append(
            Op(
                index=i,
                name=name,
                version=int(code.Version()),
                inputs=[int(x) for x in op.InputsAsNumpy()] if op.InputsLength() else [],
                outputs=[int(x) for x in op.OutputsAsNumpy()] if op.OutputsLength() else [],
                options=_options(schema, op, name),
            )
        )
    metadata = {}
    for m in range(model.MetadataLength()):
        entry = model.Metadata(m)
        metadata[(entry.Name() or b"").decode()] = _buffer_bytes(model, entry.Buffer(), raw)
    return {
        "subgraphs": model.SubgraphsLength(),
        "tensors": tensors,
        "ops": ops,
        "constants": constants,
        "metadata": metadata,
    }


def _const_ints(model: dict, tensor_index: int) -> np.ndarray | None:
    data = model["constants"].get(tensor_index)
    if data is None:
        return None
    dtype = {"INT32": np.int32, "INT64": np.int64}.get(model["tensors"][tensor_index].dtype)
    return None if dtype is None else np.frombuffer(data, dtype=dtype)


def _op_findings(model: dict, op: Op) -> list[Finding]:
    """Why this op would not be mapped to the Edge TPU (empty: nothing found)."""
    tensors = model["tensors"]
    found: list[Finding] = []

    def cpu(reason: str) -> None:
        found.append(Finding(op.index, op.name, "cpu", reason))

    if op.name not in EDGETPU_OPS:
        cpu("operator not supported by the Edge TPU")
        return found
    activations = [tensors[t] for t in op.inputs + op.outputs if t >= 0 and not tensors[t].constant]
    for t in activations:
        if t.dtype not in QUANT_TYPES and not (op.name in FLOAT_INPUT_OK and t.index in op.inputs):
            cpu(f"tensor '{t.name}' is {t.dtype}, not int8/uint8 (the model is not fully integer)")
        if any(d < 0 for d in t.shape_signature):
            cpu(f"tensor '{t.name}' has a dynamic shape {t.shape_signature}")
        if len(t.shape) > 3 and any(d > 1 for d in t.shape[:-3]):
            cpu(f"tensor '{t.name}' {t.shape}: only the 3 innermost dimensions may be > 1")

    opts = op.options
    if op.name in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION") and opts.get("fused_activation", 0):
        cpu("fused activation function")
    if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(set(opts.get("dilation", (1, 1)))) > 1:
        cpu(f"different dilation in y and x {opts['dilation']}")
    if op.name == "CONCATENATION":
        const_inputs = [t for t in op.inputs if tensors[t].constant]
        if const_inputs and (
            len(op.inputs) != 2
            or any(np.frombuffer(model["constants"][t], np.uint8).any() for t in const_inputs)
        ):
            cpu("constant input that is not a single all-zeros tensor")
    if op.name in REDUCERS and len(op.inputs) > 1:
        axes = _const_ints(model, op.inputs[1])
        rank = len(tensors[op.inputs[0]].shape)
        if axes is not None and rank:
            axes = {int(a) % rank for a in axes}
            if 0 in axes and rank > 1:
                cpu(f"reduces over the batch dimension (axes {sorted(axes)})")
            if op.name == "MEAN" and (rank - 1) in axes and tensors[op.inputs[0]].shape[-1] % 4:
                cpu("z-reduction over a channel count that is not a multiple of 4")
    if op.name == "PAD" and len(op.inputs) > 1:
        pads = _const_ints(model, op.inputs[1])
        if pads is not None and pads.size >= 2 and pads.reshape(-1, 2)[0].any():
            cpu("pads the batch dimension")
    if op.name == "STRIDED_SLICE":
        strides = _const_ints(model, op.inputs[3]) if len(op.inputs) > 3 else None
        if strides is None or (strides != 1).any():
            cpu("strides are not all 1 (or not constant)")
        if opts.get("ellipsis_mask", 0) or opts.get("new_axis_mask", 0):
            cpu("ellipsis_mask / new_axis_mask set")
    if op.name == "SOFTMAX":
        shape = tensors[op.inputs[0]].shape
        if sum(d > 1 for d in shape) > 1 or int(np.prod(shape)) > SOFTMAX_MAX_ELEMENTS:
            cpu(f"input {shape} is not 1-D with at most {SOFTMAX_MAX_ELEMENTS} elements")
    if op.name == "FULLY_CONNECTED" and op.outputs:
        shape = tensors[op.outputs[0]].shape
        if sum(d > 1 for d in shape) > 1:
            cpu(f"output {shape} is not one-dimensional")
    if op.name in ("RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RESHAPE"):
        found.append(Finding(op.index, op.name, "warn", EDGETPU_OPS[op.name]))
    return found


def check_edgetpu(path: str | Path) -> dict:
    """Static Edge TPU report: where the compiler's single TPU/CPU cut would fall, and why."""
    model = read_tflite(path)
    ops, tensors = model["ops"], model["tensors"]
    findings = [f for op in ops for f in _op_findings(model, op)]
    blocking = [f for f in findings if f.severity == "cpu"]
    cut = min((f.op_index for f in blocking), default=len(ops))
    tpu_params = {t for op in ops[:cut] for t in op.inputs if t >= 0 and tensors[t].constant}
    param_bytes = sum(tensors[t].nbytes for t in tpu_params)
    float_activations = sorted(
        {t.name for t in tensors if not t.constant and t.dtype in ("FLOAT32", "FLOAT16")}
    )
    counts: dict[str, int] = {}
    versions: dict[str, list[int]] = {}
    for op in ops:
        counts[op.name] = counts.get(op.name, 0) + 1
        versions[op.name] = sorted(set(versions.get(op.name, [])) | {op.version})
    notes = []
    if model["subgraphs"] > 1:
        notes.append(f"{model['subgraphs']} subgraphs: the Edge TPU compiler maps only one")
    if param_bytes > SRAM_BYTES:
        notes.append(
            f"{param_bytes / 1e6:.1f} MB of parameters in the TPU part: more than the ~8 MB SRAM cache, "
            "the rest streams from host memory at every inference"
        )
    return {
        "file": str(path),
        "ops": len(ops),
        "op_counts": dict(sorted(counts.items())),
        # edgetpu_compiler 16 (2021) refuses op versions newer converters write ("Operation version not
        # supported" in its log): compare these with the compiler's report.
        "op_versions": dict(sorted(versions.items())),
        "edgetpu_ops": cut,  # ops [0, cut) could be mapped; op `cut` and everything after run on the CPU
        "first_cpu_op": None if cut == len(ops) else f"#{cut} {ops[cut].name}",
        "fully_mapped": cut == len(ops),
        "tpu_param_bytes": param_bytes,
        "float_activation_tensors": len(float_activations),
        "findings": [asdict(f) for f in findings],
        "notes": notes,
        "metadata": sorted(model["metadata"]),
    }


def check_file(path: str | Path) -> dict:
    """:func:`check_edgetpu` with one clear error for a file that is not a readable .tflite."""
    from edgead.errors import EdgeadError

    path = Path(path)
    if path.suffix != ".tflite":
        raise EdgeadError(f"{path} is not a .tflite file: the Edge TPU check reads TensorFlow Lite files")
    try:
        return check_edgetpu(path)
    except EdgeadError:
        raise
    except Exception as exc:  # offsets of a damaged flatbuffer point anywhere
        raise EdgeadError(f"{path} is a damaged TensorFlow Lite file ({type(exc).__name__}: {exc})") from None


def _reason_kind(reason: str) -> str:
    """Findings grouped for the summary: per-tensor reasons say the same thing many times."""
    if reason.startswith("operator not supported"):
        return "not an Edge TPU operator"
    if "not int8/uint8" in reason:
        return "float tensors (the file is not full-integer)"
    if "dynamic shape" in reason:
        return "dynamic shapes"
    if "innermost" in reason:
        return "tensors with more than the 3 innermost dimensions > 1"
    return reason


def format_edgetpu(report: dict) -> str:
    """What ``edgead budget MODEL.tflite --device coral`` prints."""
    lines = [
        f"file          {report['file']}",
        "needs         full-integer INT8 (int8/uint8 tensors), static shapes, tensors of rank <= 3 (or only the "
        "3 innermost dims > 1), Edge TPU operators only, one subgraph; the compiler cuts once: the first "
        "unsupported op and every op after it run on the host CPU",
        f"ops           {report['ops']}: " + ", ".join(f"{k} x{v}" for k, v in report["op_counts"].items()),
    ]
    if report["fully_mapped"]:
        lines.append(
            "edge tpu      meets the requirements: every op can be mapped (the compiler has the final word)"
        )
    else:
        lines.append(
            f"edge tpu      does NOT meet them: {report['edgetpu_ops']} of {report['ops']} ops before the first "
            f"CPU op {report['first_cpu_op']}; it and every later op run on the CPU"
        )
    why: dict[str, dict[str, int]] = {}
    for finding in report["findings"]:
        if finding["severity"] == "cpu":
            ops = why.setdefault(_reason_kind(finding["reason"]), {})
            ops[finding["op"]] = ops.get(finding["op"], 0) + 1
    for kind, ops in why.items():
        lines.append(f"  why         {kind}: " + ", ".join(f"{op} x{n}" for op, n in ops.items()))
    if report["float_activation_tensors"]:
        lines.append(
            f"float         {report['float_activation_tensors']} float activation tensors (not fully integer)"
        )
    lines.append(
        f"parameters    {report['tpu_param_bytes'] / 1e6:.2f} MB in the part before the cut (SRAM ~8 MB)"
    )
    lines += [f"note          {note}" for note in report["notes"]]
    return "\n".join(lines)
