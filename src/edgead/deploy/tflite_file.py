"""A .tflite file that edgead wrote: its metadata and content hash, float16 storage, and the LiteRT runner.

`edgead export --format tflite` (:mod:`edgead.deploy.tflite`) writes these files; `edgead test`/`predict`/
`benchmark` run them here, in edgead's own environment, with the LiteRT interpreter (``ai-edge-litert``,
XNNPACK on the CPU, no TensorFlow). edgead's metadata (threshold, run config, input format) sits in the
TFLite metadata table under the name ``edgead`` with ``weights_sha256``, a hash of everything that computes,
so a changed or damaged file is refused instead of scoring wrongly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgead.deploy.onnx_export import (
    GRAPH_HASH_KEY,
    METADATA_SEAL_KEY,
    check_metadata,
    config_from_metadata,
    seal_metadata,
)
from edgead.errors import EdgeadError
from edgead.outputs import atomic_file
from edgead.runs import RunConfig

METADATA_NAME = "edgead"  # the TFLite metadata entry holding edgead's metadata as JSON
WEIGHTS_HASH_KEY = "weights_sha256"
INPUT_FORMAT = "uint8 NHWC RGB, 0..255"  # the .tflite input, [1, S, S, 3]: the raw pixels


def read_model(path: Path):
    """The parsed flatbuffer (``schema.Model``) and the file's bytes; a clear error for anything else."""
    from ai_edge_litert import schema_py_generated as schema

    if not path.is_file():
        raise EdgeadError(f"model file {path} does not exist")
    data = path.read_bytes()
    if len(data) < 8 or not schema.Model.ModelBufferHasIdentifier(data, 0):
        raise EdgeadError(
            f"{path} is not a TensorFlow Lite file (no TFL3 identifier): damaged or another format"
        )
    try:
        return schema.Model.GetRootAs(data, 0), data
    except Exception as exc:  # a truncated flatbuffer fails while its offsets are read
        raise EdgeadError(f"{path} is a damaged TensorFlow Lite file ({type(exc).__name__}: {exc})") from None


def _metadata_buffers(model) -> dict[str, int]:
    return {
        model.Metadata(i).Name().decode(): model.Metadata(i).Buffer() for i in range(model.MetadataLength())
    }


def content_sha256(model, data: bytes) -> str:
    """sha256 of what computes: every buffer (weights, constants) but edgead's metadata, and every operator."""
    digest = hashlib.sha256()
    skip = _metadata_buffers(model).get(METADATA_NAME)
    for index in range(model.BuffersLength()):
        if index == skip:
            continue
        buffer = model.Buffers(index)
        if buffer.Offset() > 1:  # stored after the flatbuffer (large models)
            digest.update(data[buffer.Offset() : buffer.Offset() + buffer.Size()])
        elif buffer.DataLength():
            digest.update(buffer.DataAsNumpy().tobytes())
        digest.update(b"|")
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            parts = [op.OpcodeIndex(), *op.InputsAsNumpy().tolist(), -1, *op.OutputsAsNumpy().tolist()]
            digest.update(np.asarray(parts, dtype=np.int64).tobytes())
    return digest.hexdigest()


def read_tflite_metadata(path: str | Path) -> dict[str, str]:
    """The checked edgead metadata of a .tflite file; a clear error for any other or a changed file."""
    path = Path(path)
    model, data = read_model(path)
    try:
        index = _metadata_buffers(model).get(METADATA_NAME)
        raw = model.Buffers(index).DataAsNumpy().tobytes() if index is not None else None
    except Exception as exc:
        raise EdgeadError(f"{path} is a damaged TensorFlow Lite file ({type(exc).__name__}: {exc})") from None
    if raw is None:
        raise EdgeadError(
            f"{path} is a TensorFlow Lite file but was not exported by edgead (no '{METADATA_NAME}' metadata)"
        )
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeadError(f"{path} has invalid edgead metadata (not JSON: {exc})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise EdgeadError(f"{path} has invalid edgead metadata (not a JSON object of strings)")
    check_metadata(metadata, path, WEIGHTS_HASH_KEY)
    if metadata[WEIGHTS_HASH_KEY] != content_sha256(model, data):
        raise EdgeadError(
            f"{path} was changed or damaged after export: its contents do not match the sha256 in its "
            "metadata; export the run again"
        )
    return metadata


def keep_half_precision(model, min_values: int = 1 << 16) -> int:
    """Store large float32 constants whose values are all float16 values as float16 + one DEQUANTIZE op.

    The LiteRT counterpart of :func:`edgead.deploy.onnx_export.keep_half_precision_constants`: onnx2tf folds
    the ONNX file's float16 data (PaDiM's Gaussians) into float32, doubling the file. DEQUANTIZE of a constant
    float16 tensor is TFLite's own way to hold float16 weights (computed once at load); exact. Returns the count.
    """
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    code = None
    converted = 0
    for index, tensor in enumerate(list(graph.tensors)):
        data = model.buffers[tensor.buffer].data if tensor.buffer else None
        if tensor.type != schema.TensorType.FLOAT32 or data is None or len(data) < 4 * min_values:
            continue
        values = np.frombuffer(data.tobytes(), np.float32)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        if code is None:
            code = schema.OperatorCodeT()
            code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
            code.version = 1
            model.operatorCodes.append(code)
        buffer = schema.BufferT()
        buffer.data = half.view(np.uint8)
        model.buffers.append(buffer)
        stored = schema.TensorT()
        stored.name, stored.shape, stored.type = (
            tensor.name + b"/float16",
            tensor.shape,
            schema.TensorType.FLOAT16,
        )
        stored.buffer = len(model.buffers) - 1
        graph.tensors.append(stored)
        model.buffers[tensor.buffer].data = None  # the float32 tensor is now the DEQUANTIZE op's output
        tensor.buffer = 0
        op = schema.OperatorT()
        op.opcodeIndex = len(model.operatorCodes) - 1
        op.inputs, op.outputs = np.array([len(graph.tensors) - 1], np.int32), np.array([index], np.int32)
        graph.operators.insert(0, op)
        converted += 1
    return converted


def write_tflite(source: Path, out_path: Path, metadata: dict[str, str]) -> Path:
    """Copy ``source`` to ``out_path`` (atomically) with ``metadata`` and its content hash embedded."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(source))
    keep_half_precision(model)
    model.metadata = [
        m for m in model.metadata or [] if m.name not in (METADATA_NAME, METADATA_NAME.encode())
    ]
    buffer = schema.BufferT()
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata.append(entry)
    with tempfile.TemporaryDirectory(prefix="edgead-tflite-") as scratch:
        staged = Path(scratch) / "hashed.tflite"
        flatbuffer_utils.write_model(model, str(staged))  # the hash skips the (still empty) metadata buffer
        parsed, data = read_model(staged)
        payload = {key: value for key, value in metadata.items() if key not in (GRAPH_HASH_KEY, METADATA_SEAL_KEY)}
        payload.update(input_format=INPUT_FORMAT, weights_sha256=content_sha256(parsed, data))
    buffer.data = np.frombuffer(json.dumps(seal_metadata(payload)).encode(), dtype=np.uint8)
    with atomic_file(out_path) as staging:
        flatbuffer_utils.write_model(model, str(staging))
    return out_path


# ---- running a file ----------------------------------------------------------------------------------


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """LiteRT's C++ side prints "INFO: Created TensorFlow Lite XNNPACK delegate" to the process's stderr (no
    setting turns it off); its errors reach Python as exceptions, so nothing is lost by muting it here."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LiteRtModel:
    """A .tflite file in the LiteRT interpreter (XNNPACK): ``run(uint8 NHWC images) -> (maps, scores)``."""

    def __init__(self, path: str | Path, image_size: int, threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            with native_stderr_silenced():
                self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise EdgeadError(f"LiteRT cannot load {path}: {exc}") from None
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = self.interpreter.get_output_details()
        if [int(d) for d in self.input["shape"]] != [1, image_size, image_size, 3]:
            raise EdgeadError(
                f"{path} takes input {[int(d) for d in self.input['shape']]}, not [1, {image_size}, "
                f"{image_size}, 3] as its metadata says: not a file edgead exported for this model"
            )
        sizes = sorted(int(np.prod(d["shape"])) for d in self.outputs)
        if sizes != [1, image_size * image_size]:
            raise EdgeadError(
                f"{path} has outputs of {sizes} values, not a score and a {image_size}x{image_size} anomaly map: "
                "not a file edgead exported for this model"
            )
        self.image_size, self.path = image_size, path

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``images``: uint8 NHWC at the model's size; one invoke per image (the file has batch 1)."""
        maps, scores = [], []
        for image in images:
            self.interpreter.set_tensor(
                self.input["index"], np.ascontiguousarray(image[None], self.input["dtype"])
            )
            try:
                self.interpreter.invoke()
            except (ValueError, RuntimeError) as exc:
                raise EdgeadError(f"LiteRT failed running {self.path}: {exc}") from None
            results = []
            for detail in self.outputs:
                value = self.interpreter.get_tensor(detail["index"]).astype(np.float32)
                scale, zero_point = detail["quantization"]
                results.append((value - zero_point) * scale if scale else value)
            # By size: the score has one value, the map S x S (C = 1: NHWC and NCHW hold the same order).
            results.sort(key=lambda value: value.size)
            scores.append(results[0].reshape(-1)[0])
            maps.append(results[-1].reshape(1, 1, self.image_size, self.image_size))
        if not maps:
            return np.zeros((0, 1, self.image_size, self.image_size), np.float32), np.zeros(0, np.float32)
        return np.concatenate(maps), np.asarray(scores, dtype=np.float32)


def tflite_config(path: str | Path) -> tuple[RunConfig, dict[str, str]]:
    """The run config and metadata a .tflite file carries (checked)."""
    metadata = read_tflite_metadata(path)
    return config_from_metadata(metadata, Path(path), WEIGHTS_HASH_KEY), metadata
