"""INT8 post-training static quantization of an exported edgead ONNX file.

Calibration images are normal images (train/good of the run's dataset by default): PTQ only needs
activation ranges, and normal images are what a user has.

- ONNX Runtime: QDQ format, uint8 activations, int8 per-channel weights (ONNX Runtime's x86 kernels
  are fastest with unsigned activations), MinMax calibration; convolutions (with their ReLU6) are quantized.
- OpenVINO + NNCF: ``nncf.quantize`` on the OpenVINO model, saved as an IR (.xml + .bin).

What runs in INT8 is the backbone after its first stage, where most of the compute is. Kept in float:
- the head and the postprocess: calibration sees normal images only, so the ranges of the head's outputs
  (patch scores, distances) would end at the normal maximum and clip every anomaly to the same value;
  PatchCore's |q|^2 - 2 q.m + |m|^2 would also lose the small distances to 8-bit rounding;
- the backbone's first stage (stem + first block, 9% of EfficientNet-Lite0's MACs at 256x256): its outputs have
  the widest per-tensor ranges, and its rounding error propagates through every later layer (the
  usual first-layer exception of INT8 deployments);
ReLU6 (Clip) is quantized together with its convolution, so that the conv's INT8 range is the
activation's [0, 6], not the pre-activation range (a ~5x coarser step otherwise).
docs/results/deployment.md has the accuracy of each choice.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from edgead.deploy.onnx_export import (
    CONFIG_KEY,
    INPUT_NAME,
    IR_METADATA_KEY,
    OUTPUT_NAMES,
    read_metadata,
    to_input,
    write_metadata,
)
from edgead.errors import EdgeadError

KEEP_FLOAT = ("/head/", "/postprocess/", "/backbone/stages.0/")  # node-name parts of ops kept in float


def _input_dtype(metadata: dict[str, str]) -> str:
    return "uint8" if metadata.get("input_format", "").startswith("uint8") else "float32"


def recalibrated_metadata(metadata: dict[str, str], scores: np.ndarray, images: int) -> dict[str, str]:
    """The metadata with the INT8 model's own threshold and score range, from its scores on the run's
    normal validation images (the images the fp32 threshold came from; never test images).

    INT8 shifts the scores slightly; keeping the fp32 threshold would flag more or fewer normal parts.
    """
    from edgead.training import calibrate

    config = json.loads(metadata[CONFIG_KEY])
    calibration = calibrate(np.asarray(scores, dtype=np.float64), float(config["threshold_quantile"]))
    config.update(calibration)
    config.setdefault("extra", {})["threshold_source"] = f"int8 model on {images} normal validation images"
    return {
        **metadata,
        **{key: repr(value) for key, value in calibration.items()},
        CONFIG_KEY: json.dumps(config),
        "threshold_source": config["extra"]["threshold_source"],
    }


def _check_calibration(images: np.ndarray) -> None:
    if images is None or len(images) == 0:
        raise EdgeadError("calibration needs at least one image, got none")


def quantize_onnxruntime(
    model_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    keep_float: tuple[str, ...] = KEEP_FLOAT,
    validation: np.ndarray | None = None,
) -> Path:
    """INT8 QDQ model for ONNX Runtime; ``calibration`` is uint8 NHWC normal images.

    Nodes whose name contains one of ``keep_float`` stay in float. With ``validation`` (the run's normal
    validation images, uint8 NHWC), the threshold is re-derived from the INT8 model's own scores.
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

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
        nodes = onnx.load(str(prepared)).graph.node
        excluded = [n.name for n in nodes if any(part in n.name for part in keep_float)]
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
    metadata["quantization"] = (
        f"int8 onnxruntime QDQ, u8 activations, s8 per-channel weights, {len(inputs)} images"
    )
    if validation is not None and len(validation):
        import onnxruntime as ort

        session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
        scores = session.run([OUTPUT_NAMES[1]], {INPUT_NAME: to_input(validation, _input_dtype(metadata))})[0]
        metadata = recalibrated_metadata(metadata, scores, len(validation))
    write_metadata(out_path, metadata)
    return out_path


def quantize_openvino(
    model_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    validation: np.ndarray | None = None,
) -> Path:
    """INT8 OpenVINO IR via NNCF; ``out_path`` ends in .xml (the weights go next to it as .bin).

    ``validation``: as in :func:`quantize_onnxruntime`, the INT8 model's own threshold."""
    import nncf
    import openvino as ov

    _check_calibration(calibration)
    out_path = Path(out_path)
    if out_path.suffix != ".xml":
        raise EdgeadError(f"an OpenVINO IR file name ends in .xml, got {out_path}")
    metadata = read_metadata(model_path)
    inputs = to_input(calibration, _input_dtype(metadata))
    model = ov.Core().read_model(str(model_path))
    quantized = nncf.quantize(
        model,
        nncf.Dataset([inputs[i : i + 1] for i in range(len(inputs))]),
        subset_size=len(inputs),
        ignored_scope=nncf.IgnoredScope(patterns=[f".*{part}.*" for part in KEEP_FLOAT], validate=False),
    )
    _drop_quantizers_in(quantized, ("/head/", "/postprocess/"))
    metadata["quantization"] = f"int8 openvino nncf, {len(inputs)} images"
    if validation is not None and len(validation):
        compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled(to_input(validation, _input_dtype(metadata)))
        metadata = recalibrated_metadata(
            metadata, np.asarray(result[compiled.output(OUTPUT_NAMES[1])]), len(validation)
        )
    quantized.set_rt_info(json.dumps(metadata), [IR_METADATA_KEY])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_path), compress_to_fp16=False)
    return out_path


def _drop_quantizers_in(model, scopes: tuple[str, ...]) -> None:
    """Remove FakeQuantize nodes that NNCF placed on outputs inside ``scopes``.

    NNCF skips the ignored ops themselves but can still quantize a tensor between two of them (seen:
    the blurred anomaly map between the two blur convolutions), which clips anomaly scores to the
    normal calibration range.
    """
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize" and any(s in op.get_friendly_name() for s in scopes):
            op.output(0).replace(op.input_value(0))
    model.validate_nodes_and_infer_types()


def convert_openvino(model_path: str | Path, out_path: str | Path) -> Path:
    """The fp32 OpenVINO IR of an edgead ONNX file, metadata included."""
    import openvino as ov

    metadata = read_metadata(model_path)
    model = ov.Core().read_model(str(model_path))
    model.set_rt_info(json.dumps(metadata), [IR_METADATA_KEY])
    ov.save_model(model, str(out_path), compress_to_fp16=False)
    return Path(out_path)
