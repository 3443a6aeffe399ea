"""`edgead export --format onnx`: one static ONNX graph per fitted run.

The graph is the whole pipeline: uint8 (or float 0..1) NCHW RGB images at the run's fixed input size
-> preprocess -> backbone -> head -> upsample + blur -> (anomaly_map [N, 1, S, S], score [N]).
Height and width are fixed; only the batch dimension is free, so one file serves batch 1 latency and
batch 16 throughput.

Memory-bank models keep their bank INSIDE the graph as a constant: PatchCore's nearest-neighbour
search becomes a matrix product + min (exact; the torch run's HNSW index finds the same neighbours for all
but a few patches, and the same maximum), PaDiM's Gaussians are
constants of a batched matrix product. One self-contained file is what runtimes, quantizers and the
edge device should receive; at the 2% coreset the bank is a few MB, well under ONNX's 2 GB limit.

The run's threshold, normalisation, input format, model name and edgead version go into the ONNX
metadata (``edgead_config`` holds the full run config as JSON), so an exported file can be tested
and used for decisions without its run folder. The metadata also records the sha256 of the graph
(checked on every load: a changed byte is an error) and of the run's model file (so an INT8 file is
compared only with the run it came from). A parity check against the torch pipeline runs on every
export and fails the export above a tolerance, or on any NaN.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from edgead import __version__
from edgead.errors import EdgeadError, NonFiniteError
from edgead.integrity import IntegrityError, check_seal, require_hash, seal
from edgead.models import HEADS, Pipeline
from edgead.models.patchcore import exact_search
from edgead.outputs import atomic_file, atomic_write_bytes
from edgead.runs import RunConfig, load_run
from edgead.validation import describe

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
CONFIG_KEY = "edgead_config"
GRAPH_HASH_KEY = "graph_sha256"
METADATA_SEAL_KEY = "metadata_sha256"  # the seal of every other metadata entry (edgead.integrity)
EXPORT_REMEDY = "export the run again"
# Set for heads whose convolutions hold most of the model (DifferNet's flow): INT8 files store their weights
# in int8 too (weights only; see edgead.deploy.quantize.quantize_head_weights).
HEAD_WEIGHTS_KEY = "int8_head_weights"
IR_METADATA_KEY = "edgead_metadata"  # where an OpenVINO IR keeps the same metadata (rt_info, as JSON)


class ExportGraph(nn.Module):
    """The pipeline behind the exported file: images in, (anomaly map, image score) out."""

    def __init__(self, pipeline: Pipeline, input_dtype: str = "uint8") -> None:
        super().__init__()
        if input_dtype not in ("uint8", "float32"):
            raise EdgeadError(f"input dtype must be uint8 or float32, not {input_dtype!r}")
        self.pipeline = pipeline.eval()
        self.input_dtype = input_dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 255.0 if self.input_dtype == "uint8" else images
        return self.pipeline.score_features(self.pipeline.features(x))


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    max_abs_diff_map: float
    max_abs_diff_score: float
    parity_images: int


def metadata_for(config: RunConfig, input_dtype: str, run_dir: Path) -> dict[str, str]:
    """The ONNX metadata: the decision rule and input format a runtime needs, plus the full config."""
    return {
        "source_run": str(run_dir.resolve()),
        "edgead_version": __version__,
        "model": config.model,
        "backbone": config.backbone,
        "input_size": str(config.image_size),
        "input_format": f"{input_dtype} NCHW RGB, {'0..255' if input_dtype == 'uint8' else '0..1'}",
        "threshold": repr(config.threshold),
        "score_min": repr(config.score_min),
        "score_max": repr(config.score_max),
        "normalisation": "normalized = (score - score_min) / (score_max - score_min), 0.5 at the threshold",
        CONFIG_KEY: json.dumps(config.to_json()),
        "source_model_sha256": require_hash(config.model_dump(), "model_sha256", run_dir, "refit the model"),
        "source_run_sha256": config.identity(),
        **({HEAD_WEIGHTS_KEY: "true"} if HEADS[config.model].int8_head_weights else {}),
    }


def train_images(config: RunConfig, count: int, folder: str | Path | None = None) -> np.ndarray:
    """Up to ``count`` normal images (uint8 NHWC, at the run's size), spread evenly over the folder.

    ``folder`` defaults to the train/good images of the dataset the run was fitted on.
    """
    from edgead.data.datasets import open_dataset
    from edgead.data.images import list_images, load_rgb, resize_image

    if count < 1:
        raise EdgeadError(f"need at least one image, asked for {count}")
    if folder is not None:
        if not Path(folder).is_dir():
            raise EdgeadError(f"image folder {folder} does not exist")
        paths = list_images(Path(folder))
    else:
        dataset = config.extra.get("dataset")
        if not dataset or not Path(dataset).is_dir():
            raise EdgeadError(
                f"the run's dataset ({dataset}) is not on this machine: pass a folder of normal images"
            )
        paths = [s.path for s in open_dataset(dataset).train]
    if not paths:
        raise EdgeadError(f"no images found in {folder or config.extra.get('dataset')}")
    step = max(1, len(paths) // count)
    return np.stack([resize_image(load_rgb(p), config.image_size) for p in paths[::step][:count]])


def default_calibration_defects(config: RunConfig, count: int) -> int:
    """Synthetic-defect images added to ``count`` normal calibration images by default: one in eight for a
    sensor-sized PatchCore bank (its distances run in INT8 on the IMX500, and ranges calibrated on normal
    images alone clip every anomaly to one ceiling), none for the other models (not shown to help them)."""
    return count // 8 if config.model == "patchcore" and config.head.get("bank_size") else 0


def calibration_set(
    config: RunConfig, count: int, folder: str | Path | None = None, defects: int | None = None
) -> np.ndarray:
    """:func:`train_images` followed by ``defects`` synthetic-defect versions of them (edgead's anomaly
    synthesis, seeded); ``defects`` None takes :func:`default_calibration_defects`. Never test images."""
    from edgead.data.anomaly_synthesis import synthetic_defect_images

    images = train_images(config, count, folder)
    defects = default_calibration_defects(config, count) if defects is None else defects
    if defects < 0:
        raise EdgeadError(f"--calibration-defects must be non-negative, got {defects}")
    if not defects:
        return images
    return np.concatenate([images, np.stack(synthetic_defect_images(list(images), defects, seed=0))])


def validation_images(config: RunConfig) -> np.ndarray | None:
    """The run's held-out normal validation images (uint8 NHWC), the ones its threshold came from;
    None where the run's dataset is not on this machine or the run records no split."""
    from edgead.data.images import load_rgb, resize_image
    from edgead.runs import fitted_split

    split = fitted_split(config)
    if split is None:
        return None
    return np.stack([resize_image(load_rgb(s.path), config.image_size) for s in split[1]])


def parity_images(config: RunConfig, count: int) -> np.ndarray:
    """Real training images where the dataset is present, else seeded random ones (for the parity check)."""
    try:
        return train_images(config, count)
    except EdgeadError:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, config.image_size, config.image_size, 3), dtype=np.uint8)


def to_input(images: np.ndarray, input_dtype: str) -> np.ndarray:
    """uint8 NHWC images -> the exported graph's input array."""
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return nchw if input_dtype == "uint8" else (nchw.astype(np.float32) / 255.0)


def graph_sha256(model) -> str:
    """sha256 of an ONNX model's graph (nodes and weights), the metadata excluded."""
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the file's metadata (adding its graph's sha256, then the seal) and rewrite it atomically.

    Every ONNX file edgead writes ends here, so this is also where float16 data is put back into
    float16 (:func:`keep_half_precision_constants`: quantizers and optimizers fold it into float32).
    """
    import onnx

    model = onnx.load(str(path))
    keep_half_precision_constants(model.graph)
    del model.metadata_props[:]
    for key, value in seal_metadata({**metadata, GRAPH_HASH_KEY: graph_sha256(model)}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "edgead", __version__
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())


def simplify_graph(path: Path) -> int:
    """Fold constants and merge zero Pads into the convolutions that read them; returns Pads merged.

    EfficientNet's TF-"SAME" padding of strided convolutions is asymmetric, which torch can only
    export as a separate Pad (fed by a chain of shape ops). An ONNX Conv takes asymmetric pads as an
    attribute, where they cost nothing; as a node the Pad copies the tensor and, in an INT8 graph,
    adds a dequantize/quantize pair around it (25% of the INT8 latency here). Constant folding is
    ONNX Runtime's basic level, which only rewrites into standard ONNX ops, so the file stays portable.
    The parity check after export covers this step too.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3  # ORT lists every initializer it drops
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    model = onnx.load(str(path))
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    merged = []
    for pad in graph.node:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if pad.op_type != "Pad" or mode != b"constant" or pad.input[1] not in constants:
            continue
        value = pad.input[2] if len(pad.input) > 2 else ""
        if (value and (value not in constants or np.any(constants[value] != 0))) or len(pad.input) > 3:
            continue
        pads = [int(p) for p in constants[pad.input[1]]]  # [n0, c0, top, left, n1, c1, bottom, right]
        users = readers.get(pad.output[0], [])
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0 or pad.output[0] in outputs:
            continue
        automatic = [
            a for u in users for a in u.attribute if a.name == "auto_pad" and a.s not in (b"", b"NOTSET")
        ]
        if not users or any(u.op_type != "Conv" for u in users) or automatic:
            continue
        for conv in users:
            attribute = next((a for a in conv.attribute if a.name == "pads"), None)
            current = list(attribute.ints) if attribute is not None else [0, 0, 0, 0]
            new = [current[0] + pads[2], current[1] + pads[3], current[2] + pads[6], current[3] + pads[7]]
            if attribute is not None:
                conv.attribute.remove(attribute)
            conv.attribute.append(onnx.helper.make_attribute("pads", new))
            conv.input[0] = pad.input[0]
        merged.append(pad)
    for pad in merged:
        graph.node.remove(pad)
    fold_affine_into_convs(graph)
    keep_half_precision_constants(graph)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    domains = {node.domain for node in graph.node} | {"", "ai.onnx"}
    for opset in [o for o in model.opset_import if o.domain not in domains]:
        model.opset_import.remove(opset)  # ORT declares its own domains even where no node uses them
    onnx.save(model, str(path))
    return len(merged)


def keep_half_precision_constants(graph, min_values: int = 1 << 16) -> int:
    """Store large float32 constants whose values are all float16 values as float16 + one Cast.

    A head that keeps its data in float16 (PaDiM's Gaussians) is traced as a float16 constant and a
    Cast, which constant folding turns back into float32, doubling the file. Converting back is
    exact (the values came from float16); runtimes fold the Cast once at load. Returns the count.
    """
    from onnx import TensorProto, helper, numpy_helper

    converted = 0
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        if values.size < min_values:
            continue
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(half, f"{init.name}/float16"))
        cast = helper.make_node(
            "Cast", [f"{init.name}/float16"], [init.name], name=f"{init.name}/to_float32", to=TensorProto.FLOAT
        )
        graph.node.insert(0, cast)
        converted += 1
    return converted


def _is_pointwise_conv(node, constants: dict[str, np.ndarray]) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped Conv with constant weights (and bias): a matrix product."""
    if (
        node.op_type != "Conv"
        or node.input[1] not in constants
        or constants[node.input[1]].shape[2:] != (1, 1)
    ):
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
        return False
    attributes = {a.name: (list(a.ints) or a.i) for a in node.attribute}
    return (
        attributes.get("group", 1) in (0, 1)
        and all(v == 1 for v in attributes.get("strides", [1, 1]))
        and all(v == 1 for v in attributes.get("dilations", [1, 1]))
        and not any(attributes.get("pads", [0, 0, 0, 0]))
        and attributes.get("auto_pad", 0) in (0, b"NOTSET", b"")
    )


def fold_affine_into_convs(graph) -> int:
    """Fold per-channel Sub/Div by constants and 1x1 Conv chains into the 1x1 Conv that reads them.

    ``(x - mean) / std -> adaptor -> discriminator conv`` (TinyGLASS's head) is three affine maps in a
    row: one convolution with ``W = W2 @ W1 / std`` and ``b = W2 @ (b1 - W1 @ (mean / std)) + b2`` computes
    the same values with one pass over the feature map instead of four. Returns the nodes folded.
    """
    from onnx import numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    folded = []
    for conv in [n for n in graph.node if _is_pointwise_conv(n, constants)]:
        weight = constants[conv.input[1]][:, :, 0, 0].astype(np.float64)
        bias = constants[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else None
        bias = np.zeros(len(weight)) if bias is None else bias
        changed = False
        while True:
            source = producers.get(conv.input[0])
            if source is None or readers.get(conv.input[0], 0) != 1 or conv.input[0] in outputs:
                break
            operand = constants.get(source.input[1]) if len(source.input) > 1 else None
            per_channel = operand is not None and operand.shape == (1, weight.shape[1], 1, 1)
            if _is_pointwise_conv(source, constants):
                inner = constants[source.input[1]][:, :, 0, 0].astype(np.float64)
                inner_bias = constants[source.input[2]] if len(source.input) > 2 and source.input[2] else 0.0
                bias, weight = weight @ (np.zeros(len(inner)) + inner_bias) + bias, weight @ inner
            elif source.op_type == "Div" and per_channel and source.input[0] not in constants:
                weight = weight / operand.reshape(1, -1)
            elif source.op_type == "Sub" and per_channel and source.input[0] not in constants:
                bias = bias - weight @ operand.reshape(-1)
            else:
                break
            conv.input[0] = source.input[0]
            folded.append(source)
            changed = True
        if changed:
            for suffix, value in (("weight", weight[:, :, None, None]), ("bias", bias)):
                name = f"{conv.name}/folded_{suffix}"
                graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
                constants[name] = value
            del conv.input[1:]
            conv.input.extend([f"{conv.name}/folded_weight", f"{conv.name}/folded_bias"])
    for node in folded:
        graph.node.remove(node)
    return len(folded)


def _export_and_check(
    graph: ExportGraph,
    images: np.ndarray,
    input_dtype: str,
    path: Path,
    tolerance: float,
) -> tuple[float, float]:
    """Trace ``graph`` to ``path``, simplify it, and compare it with torch; returns the max differences."""
    import onnxruntime as ort

    example = torch.from_numpy(to_input(images[:1], input_dtype))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer chatter
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {0: "batch"},
                OUTPUT_NAMES[0]: {0: "batch"},
                OUTPUT_NAMES[1]: {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    simplify_graph(path)

    inputs = to_input(images, input_dtype)
    with torch.no_grad(), exact_search(graph.pipeline.head):  # the graph holds PatchCore's exact kNN
        ref_map, ref_score = (t.numpy() for t in graph(torch.from_numpy(inputs)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: inputs})
    return check_parity("ONNX", (ref_map, ref_score), tuple(got), tolerance)


def check_parity(
    name: str,
    reference: tuple[np.ndarray, np.ndarray],
    exported: tuple[np.ndarray, np.ndarray],
    tolerance: float,
) -> tuple[float, float]:
    """Max |exported - torch| of maps and scores; raises over ``tolerance`` x the outputs' scale or on NaN.

    Every exported format (``name``: ONNX, TFLite) is held to the same rule before its file is written."""
    (ref_map, ref_score), (got_map, got_score) = reference, exported
    if not all(np.isfinite(a).all() for a in (ref_map, ref_score, got_map, got_score)):
        raise NonFiniteError(
            f"{name} parity check failed: the model gives NaN or infinite values (broken weights?); not exported"
        )
    diff_map = float(np.abs(got_map - ref_map.reshape(got_map.shape)).max())
    diff_score = float(np.abs(got_score.reshape(-1) - ref_score.reshape(-1)).max())
    scale = max(1.0, float(np.abs(ref_map).max()), float(np.abs(ref_score).max()))
    if max(diff_map, diff_score) > tolerance * scale:
        raise EdgeadError(
            f"{name} parity check failed: max |{name.lower()} - torch| = {max(diff_map, diff_score):.3g} "
            f"(> {tolerance:g} x {scale:.3g}); the file was not written"
        )
    return diff_map, diff_score


def export_onnx(
    run_dir: str | Path,
    out_path: str | Path,
    input_dtype: str = "uint8",
    n_parity: int = 4,
    tolerance: float = 5e-3,
) -> ExportResult:
    """Export a run folder to one ONNX file and check it against torch on real images.

    ``tolerance`` is relative: max |onnx - torch| / max(1, max |torch|) over maps and scores.
    """
    pipeline, config = load_run(run_dir)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise EdgeadError(f"the ONNX file name must end in .onnx, got {out_path}")
    graph = ExportGraph(pipeline, input_dtype).eval()
    images = parity_images(config, max(n_parity, 1))
    with atomic_file(out_path) as staging:  # a failed export or parity check leaves no file behind
        diff_map, diff_score = _export_and_check(graph, images, input_dtype, staging, tolerance)
        write_metadata(staging, metadata_for(config, input_dtype, Path(run_dir)))
    return ExportResult(out_path, out_path.stat().st_size, diff_map, diff_score, len(images))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The checked metadata of an edgead ONNX file; a clear error for anything else or a changed graph."""
    model, metadata = _load_sealed(Path(path))
    if CONFIG_KEY not in metadata:
        raise EdgeadError(f"{path} is an ONNX file but was not exported by edgead (no {CONFIG_KEY} metadata)")
    check_metadata(metadata, Path(path), GRAPH_HASH_KEY)
    _check_graph(model, metadata, Path(path))
    return metadata


def read_part_metadata(path: str | Path) -> dict[str, str]:
    """The sealed metadata of an ONNX file edgead wrote that is not a whole model (the edge features)."""
    model, metadata = _load_sealed(Path(path))
    check_seal(metadata, METADATA_SEAL_KEY, path, EXPORT_REMEDY)
    _check_graph(model, metadata, Path(path))
    return metadata


def _load_sealed(path: Path):  # noqa: ANN202 - (onnx.ModelProto, its metadata)
    import onnx

    if not path.is_file():
        raise EdgeadError(f"model file {path} does not exist")
    if path.stat().st_size == 0:
        raise EdgeadError(f"{path} is empty (0 bytes): an interrupted copy or export; export the run again")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise EdgeadError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise EdgeadError(f"{path} is not an ONNX model (no graph): damaged or another format")
    return model, {p.key: p.value for p in model.metadata_props}


def _check_graph(model, metadata: dict[str, str], path: Path) -> None:  # noqa: ANN001
    if require_hash(metadata, GRAPH_HASH_KEY, path, EXPORT_REMEDY) != graph_sha256(model):
        raise IntegrityError(
            f"{path} was changed or damaged after export: its graph does not match the sha256 in its "
            f"metadata; {EXPORT_REMEDY}"
        )


def seal_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata with its seal: every writer of an exported file's metadata ends here."""
    return seal(metadata, METADATA_SEAL_KEY)


FloatText = Annotated[str, AfterValidator(lambda text: _finite_float_text(text))]
Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]


def _finite_float_text(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return text


class ExportMetadata(BaseModel):
    """The metadata keys of an edgead ONNX file or OpenVINO IR, with their types: untrusted input."""

    model_config = ConfigDict(extra="forbid", strict=True)

    source_run: str
    edgead_version: str
    model: str
    backbone: str
    input_size: Annotated[str, Field(pattern=r"^[0-9]{2,4}$")]
    input_format: Literal["uint8 NCHW RGB, 0..255", "float32 NCHW RGB, 0..1", "uint8 NHWC RGB, 0..255"]
    threshold: FloatText
    score_min: FloatText
    score_max: FloatText
    normalisation: str
    edgead_config: str
    metadata_sha256: Sha256
    source_model_sha256: Sha256
    source_run_sha256: Sha256
    graph_sha256: Sha256 | None = None  # ONNX files
    weights_sha256: Sha256 | None = None  # OpenVINO IR and .tflite files
    int8_float_stages: str | None = None
    quantization: str | None = None
    threshold_source: str | None = None
    int8_score_error: FloatText | None = None
    int8_rank_correlation: FloatText | None = None
    int8_head_weights: Literal["true"] | None = None
    # An IMX500 sensor graph (MCT's quantized graph as QDQ ONNX): it outputs patch scores, which the host
    # decoder turns into the map and the score (edgead.deploy.imx500_host)
    sensor_graph: Literal["patch_scores"] | None = None


def check_metadata(metadata: dict[str, str], source: Path, content_key: str) -> RunConfig:
    """Validate an exported file's metadata, its seal and the run config inside it; returns that config.

    ``content_key`` names the hash of what computes (``graph_sha256``, ``weights_sha256``): it must be
    present; the caller compares it with the file's contents."""
    try:
        checked = ExportMetadata.model_validate(metadata)
    except ValidationError as exc:
        raise EdgeadError(f"{source} has invalid edgead metadata: {describe(exc)}") from None
    check_seal(metadata, METADATA_SEAL_KEY, source, EXPORT_REMEDY)
    require_hash(metadata, content_key, source, EXPORT_REMEDY)
    try:
        data = json.loads(checked.edgead_config)
    except json.JSONDecodeError as exc:
        raise EdgeadError(f"{source}: its {CONFIG_KEY} metadata is not valid JSON ({exc})") from None
    config = RunConfig.from_json(data, source)
    if (config.model, config.backbone, config.image_size) != (
        checked.model,
        checked.backbone,
        int(checked.input_size),
    ) or float(checked.threshold) != config.threshold:
        raise EdgeadError(f"{source}: its metadata contradicts its {CONFIG_KEY} (edited by hand?)")
    return config


def config_from_metadata(metadata: dict[str, str], source: Path, content_key: str = GRAPH_HASH_KEY) -> RunConfig:
    return check_metadata(metadata, source, content_key)
