"""Quantization-aware training (QAT): fine-tune a trained run with fake INT8 quantization before export.

Post-training quantization (:mod:`edgead.deploy.quantize`) rounds a network that never saw rounding. QAT
lets the trainable part learn around it: every convolution in the pipeline's backbone slot (what runs in
INT8 on the device: the frozen backbone, the student, the autoencoder) runs with its weights rounded to
int8 per output channel and its input rounded to uint8 over the range it takes on normal training images
(ONNX Runtime's QDQ scheme), straight-through gradients, while the model's own recipe trains on for a short
schedule (:data:`QAT_SCHEDULES`) from the run's weights:

- ``student``, ``autoencoder``: their networks fine-tune at a tenth of the learning rate; everything the fit
  derives (teacher statistics, map quantiles, error scale) is derived again on the fake-quantized network,
  as the INT8 device will compute it;
- ``tinyglass``: its backbone is frozen and its head stays in float in the INT8 files, so QAT retrains the
  head for a few epochs on features from the fake-quantized backbone: it learns the features the INT8
  backbone gives.

The fine-tuned model is saved as a run folder of its own (``OUT/qat_run``, threshold from its normal
validation images) and exported from there: the INT8 file is then made by the usual PTQ path from the
QAT weights. Memory-bank models (PatchCore, PaDiM) have no trained weights: nothing to fine-tune.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgead.errors import DatasetError, UsageError
from edgead.models.base import Pipeline

# Per model: the head's hyperparameters for the fine-tune; a recipe with one ``lr`` also runs at a tenth of it.
QAT_SCHEDULES: dict[str, dict[str, Any]] = {
    "student": {"steps": 300},
    "autoencoder": {"steps": 200},
    "tinyglass": {"epochs": 5},
}
QAT_LR_FACTOR = 0.1
QAT_RUN = "qat_run"
CALIBRATION_IMAGES = 64  # normal training images whose conv inputs fix the activation ranges


def weight_fake_quant(weight: torch.Tensor) -> torch.Tensor:
    """int8, symmetric, one scale per output channel (as the INT8 files store conv weights)."""
    scale = weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))).clamp_min(1e-12) / 127
    zero = torch.zeros(len(scale), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale.float(), zero, 0, -127, 127)


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """uint8 scale and zero point for the range [low, high] widened to hold 0 (ONNX Runtime's MinMax)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255
    return scale, int(min(255, max(0, round(-low / scale))))


class WeightFakeQuant(nn.Module):
    """Parametrization: a convolution's weight as its int8 rounding (the layer's own forward still runs,
    so convolutions with their own padding, e.g. TF-style "same", stay what they are)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight_fake_quant(weight)


class InputFakeQuant:
    """Forward pre-hook of one convolution: its input rounded to uint8 over the range it was observed to take.

    While ``observing``, the input passes unchanged and its range is recorded."""

    def __init__(self) -> None:
        self.observing = True
        self.low, self.high = math.inf, -math.inf

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = inputs[0]
        if self.observing:
            self.low, self.high = min(self.low, float(x.detach().min())), max(self.high, float(x.detach().max()))
            return inputs
        scale, zero = activation_qparams(self.low, self.high)
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255), *inputs[1:])


@contextmanager
def fake_quantized(root: nn.Module) -> Iterator[list[InputFakeQuant]]:
    """Every Conv2d under ``root`` runs fake-quantized for the block (int8 weights, uint8 inputs), and is
    restored after with the weights the block trained. Yields the input quantizers, observing at first."""
    convs = [m for m in root.modules() if isinstance(m, nn.Conv2d)]
    quantizers, handles = [], []
    for conv in convs:
        quantizers.append(InputFakeQuant())
        handles.append(conv.register_forward_pre_hook(quantizers[-1]))
        parametrize.register_parametrization(conv, "weight", WeightFakeQuant())
    try:
        yield quantizers
    finally:
        for conv, handle in zip(convs, handles, strict=True):
            handle.remove()
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)


@torch.no_grad()
def observe_ranges(
    pipeline: Pipeline, quantizers: list[InputFakeQuant], images: torch.Tensor, batch: int = 8
) -> None:
    """Record every conv's input range on uint8 NCHW normal ``images``, then switch to fake quantization."""
    for start in range(0, len(images), batch):
        pipeline.features(images[start : start + batch].float() / 255)
    for quantizer in quantizers:
        if not math.isfinite(quantizer.low):  # a conv the images never reach (none expected)
            quantizer.low, quantizer.high = 0.0, 1.0
        quantizer.observing = False


@contextmanager
def overridden(head: nn.Module, values: dict[str, Any]) -> Iterator[None]:
    """The head's hyperparameters set to ``values`` for the block (the QAT schedule), restored after."""
    saved = {name: getattr(head, name) for name in values}
    for name, value in values.items():
        setattr(head, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(head, name, value)


def check_qat_model(model: str) -> None:
    if model not in QAT_SCHEDULES:
        raise UsageError(
            f"--qat fine-tunes trained weights ({', '.join(QAT_SCHEDULES)}); a '{model}' run has none to "
            "fine-tune: use --int8 alone (post-training quantization)"
        )


def quantization_aware_run(
    run_dir: str | Path, out_dir: str | Path, progress: bool = True, schedule: dict[str, Any] | None = None
) -> Path:
    """Fine-tune the run in ``run_dir`` with fake quantization; save it as ``out_dir/qat_run``; return that.

    ``schedule``: head hyperparameters for the fine-tune instead of :data:`QAT_SCHEDULES` (e.g. shorter, in tests)."""
    from edgead.inference import predict_samples
    from edgead.models.image_training import load_images
    from edgead.outputs import check_output_dir
    from edgead.runs import CONFIG_FILE, fitted_split, load_run, save_run
    from edgead.training import calibrate

    pipeline, config = load_run(run_dir)
    check_qat_model(config.model)
    target = check_output_dir(Path(out_dir) / QAT_RUN, CONFIG_FILE, force=True, kind="run")
    split = fitted_split(config)
    if split is None:
        raise DatasetError(
            f"--qat trains on the run's training images, which are not on this machine as they were at the fit "
            f"({config.extra.get('dataset')}): fit and export where the training images are"
        )
    train, validation = split
    head = pipeline.head
    if schedule is None:
        schedule = dict(QAT_SCHEDULES[config.model])
        if "lr" in config.head:
            schedule["lr"] = config.head["lr"] * QAT_LR_FACTOR
    step = max(1, len(train) // CALIBRATION_IMAGES)
    calibration = load_images(train[::step][:CALIBRATION_IMAGES], pipeline.image_size)
    torch.manual_seed(config.extra.get("seed", 0))
    with fake_quantized(pipeline.backbone) as quantizers, overridden(head, schedule):
        observe_ranges(pipeline, quantizers, calibration)
        head.fit_samples(pipeline, train, progress=progress, validation=validation)
    pipeline.eval()
    scores = predict_samples(pipeline, validation, progress=False).scores
    extra = {**config.extra, "qat": {"source_run": str(Path(run_dir).resolve()), **schedule}}
    if hasattr(head, "selected_epoch_"):
        extra["selected_epoch"] = head.selected_epoch_
    update = {**calibrate(scores, config.threshold_quantile), "extra": extra, "model_sha256": None}
    save_run(pipeline, config.model_copy(update=update), target, force=True)
    return target
