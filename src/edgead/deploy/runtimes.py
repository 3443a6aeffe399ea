"""Runtimes: one ``predict(images) -> (maps, scores)`` over torch, ONNX Runtime, OpenVINO and LiteRT.

`edgead predict`, `test` and `benchmark` take either a run folder (torch) or an exported file
(``.onnx`` for ONNX Runtime or OpenVINO, ``.xml`` for an OpenVINO IR such as the NNCF INT8 model,
``.tflite`` for LiteRT).
Every runtime gets float images in 0..1, NCHW, at the model's input size; an exported graph with a
uint8 input gets them rounded back to 0..255, which is exact for images loaded from 8-bit files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgead.deploy.onnx_export import (
    INPUT_NAME,
    IR_METADATA_KEY,
    OUTPUT_NAMES,
    config_from_metadata,
    read_metadata,
)
from edgead.deploy.quantize import openvino_weights_sha256
from edgead.errors import EdgeadError
from edgead.runs import RunConfig, load_run

RUNTIMES = ("torch", "onnxruntime", "openvino", "litert")
SUFFIX_RUNTIME = {".onnx": "onnxruntime", ".xml": "openvino", ".tflite": "litert"}


class Inferencer:
    """Shared behaviour: input checks and the uint8/float conversion of exported graphs."""

    runtime: str = ""

    def __init__(self, config: RunConfig, input_dtype: str = "float32", metadata: dict | None = None) -> None:
        self.config = config
        self.metadata = metadata or {}
        self.image_size = config.image_size
        self.input_dtype = input_dtype

    def eval(self) -> Inferencer:  # the batch loops call pipeline.eval(); nothing to do here
        return self

    def _as_input(self, images: torch.Tensor) -> np.ndarray:
        if images.ndim != 4 or images.shape[1] != 3:
            raise EdgeadError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise EdgeadError(
                f"this model takes {self.image_size}x{self.image_size} images, got "
                f"{images.shape[-2]}x{images.shape[-1]}: resize them first"
            )
        array = images.detach().cpu().numpy()
        if self.input_dtype == "uint8":
            return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        return array.astype(np.float32, copy=False)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps [N, 1, S, S] and image scores [N] for float images in 0..1."""
        maps, scores = self.run(self._as_input(images))
        return torch.from_numpy(np.asarray(maps)), torch.from_numpy(np.asarray(scores)).reshape(-1)


class TorchInferencer(Inferencer):
    runtime = "torch"

    def __init__(self, run_dir: str | Path) -> None:
        self.pipeline, config = load_run(run_dir)
        super().__init__(config)

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._as_input(images[:0])  # shape checks only
        return self.pipeline.predict(images)


def _onnx_input_dtype(metadata: dict[str, str]) -> str:
    return "uint8" if metadata.get("input_format", "").startswith("uint8") else "float32"


def onnxruntime_session(path: str | Path, threads: int | None, level):  # noqa: ANN001, ANN201
    """An ONNX Runtime CPU session of ``path`` at graph optimisation ``level``; a clear error if it cannot load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.graph_optimization_level = level
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EdgeadError(f"ONNX Runtime cannot load {path}: {exc}") from None


class OnnxRuntimeInferencer(Inferencer):
    runtime = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        metadata = read_metadata(path)
        super().__init__(config_from_metadata(metadata, Path(path)), _onnx_input_dtype(metadata), metadata)
        self.session = onnxruntime_session(path, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: inputs}))


class SensorGraphInferencer(OnnxRuntimeInferencer):
    """An IMX500 sensor graph exported by ``edgead export --format imx500`` (MCT's quantized graph as QDQ ONNX):
    ONNX Runtime computes its patch scores, the host decoder the map and score, as the camera's host does.

    Graph optimisations are off: ONNX Runtime's QDQ fusions compute MCT's per-channel scales differently
    (patch scores off by up to a third of the normal maximum), unfused it reproduces MCT's own simulation.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        from edgead.deploy.imx500_host import SensorDecoder

        metadata = read_metadata(path)
        Inferencer.__init__(self, config_from_metadata(metadata, Path(path)), "float32", metadata)
        self.session = onnxruntime_session(path, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        self.input_name = self.session.get_inputs()[0].name
        config = self.config
        self.decoder = SensorDecoder(
            config.image_size, config.blur_sigma, config.threshold, config.score_min, config.score_max
        )

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = [
            self.decoder.decode(self.session.run(None, {self.input_name: image[None]})[0]) for image in inputs
        ]  # the sensor graph is exported for batch 1, as the sensor runs it
        maps = np.stack([r.anomaly_map for r in results])[:, None]
        return maps, np.array([r.score for r in results], dtype=np.float32)


class OpenVinoInferencer(Inferencer):
    """OpenVINO on the CPU, from an edgead ONNX file or an IR (.xml + .bin) written by edgead."""

    runtime = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import openvino as ov

        path = Path(path)
        core = ov.Core()
        if model_suffix(path) == ".xml":
            if not path.is_file():
                raise EdgeadError(f"model file {path} does not exist")
            try:
                model = core.read_model(str(path))
                metadata = json.loads(model.get_rt_info([IR_METADATA_KEY]).astype(str))
            except Exception as exc:
                raise EdgeadError(f"{path} is not an OpenVINO IR written by edgead export ({exc})") from None
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise EdgeadError(f"{path} has invalid edgead metadata (not a JSON object of strings)")
            run_config = config_from_metadata(metadata, path, "weights_sha256")  # seal first: the hash is ours
            if metadata["weights_sha256"] != openvino_weights_sha256(model):
                raise EdgeadError(
                    f"{path} was changed or damaged after export: its weights (.bin) do not match the "
                    "sha256 in its metadata; export the run again"
                )
        else:
            metadata = read_metadata(path)
            run_config = config_from_metadata(metadata, path)
            model = core.read_model(str(path))
        super().__init__(run_config, _onnx_input_dtype(metadata), metadata)
        # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise run fp32 models in bf16.
        config = {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer({INPUT_NAME: inputs})
        return tuple(np.array(result[self.compiled.output(name)]) for name in OUTPUT_NAMES)


class LiteRtInferencer(Inferencer):
    """LiteRT (TensorFlow Lite interpreter, XNNPACK on the CPU) on a .tflite file written by edgead export."""

    runtime = "litert"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from edgead.deploy.tflite_file import LiteRtModel, tflite_config

        config, metadata = tflite_config(path)
        super().__init__(config, "uint8", metadata)
        self.model = LiteRtModel(path, config.image_size, threads or torch.get_num_threads())

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.run(inputs.transpose(0, 2, 3, 1))  # the .tflite input is NHWC


def model_suffix(path: str | Path) -> str:
    """A model file's suffix, case-insensitively (``MODEL.TFLITE`` is a .tflite file)."""
    return Path(path).suffix.lower()


def default_runtime(path: str | Path) -> str:
    path = Path(path)
    return "torch" if path.is_dir() else SUFFIX_RUNTIME.get(model_suffix(path), "onnxruntime")


def load_inferencer(path: str | Path, runtime: str | None = None, threads: int | None = None) -> Inferencer:
    """A run folder (torch) or an exported file, on the requested runtime (default: the file's own)."""
    path = Path(path)
    runtime = runtime or default_runtime(path)
    if runtime not in RUNTIMES:
        raise EdgeadError(f"unknown runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    if not path.exists():
        raise EdgeadError(
            f"model {path} does not exist: give a run folder or an exported .onnx/.xml/.tflite file"
        )
    if path.is_dir():
        if runtime != "torch":
            raise EdgeadError(
                f"{path} is a run folder, which runs on torch; for {runtime} export it first: "
                f"edgead export {path} --format onnx"
            )
        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model thread pool
        return TorchInferencer(path)
    suffix = model_suffix(path)
    if suffix not in SUFFIX_RUNTIME:
        raise EdgeadError(f"{path} is neither a run folder nor an exported .onnx/.xml/.tflite model")
    if runtime == "torch":
        raise EdgeadError(f"{path} is an exported file: run it with --runtime {SUFFIX_RUNTIME[suffix]}")
    if suffix == ".tflite" or runtime == "litert":
        if (suffix, runtime) != (".tflite", "litert"):
            raise EdgeadError(
                f"{path}: LiteRT runs .tflite files only, and .tflite files run on LiteRT only: "
                f"use --runtime {SUFFIX_RUNTIME[suffix]}"
            )
        return LiteRtInferencer(path, threads)
    if runtime == "onnxruntime":
        if suffix == ".xml":
            raise EdgeadError(f"{path} is an OpenVINO IR: run it with --runtime openvino")
        if read_metadata(path).get("sensor_graph"):
            return SensorGraphInferencer(path, threads)
        return OnnxRuntimeInferencer(path, threads)
    if suffix == ".onnx" and read_metadata(path).get("sensor_graph"):
        raise EdgeadError(f"{path} is an IMX500 sensor graph: it runs on ONNX Runtime (--runtime onnxruntime)")
    return OpenVinoInferencer(path, threads)
