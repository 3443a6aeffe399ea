"""Which backbone stages to keep in float for INT8: score error on normal validation images vs AUROC change.

For each run and each candidate float scope (and the default without bias correction), quantizes the run's exported ``export/model.onnx`` with
ONNX Runtime (64 train/good calibration images, as `edgead export --int8`) and reports
- the label-free check: mean |INT8 - fp32| score on the run's normal validation images, over their
  spread (0.99 quantile - min), and the rank correlation of those scores;
- the image AUROC change on the test set (what the deployment target is stated in);
- the INT8 file's latency: median ONNX Runtime run time at batch 1, 2 threads (one process, so only a
  rough guide; ``speedup.py`` is the careful measurement).

    python benchmarks/int8_scope.py runs/deployment/tinyglass_default_bottle runs/deployment/padim_default_bottle
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgead.data.datasets import open_dataset
from edgead.data.images import load_rgb, resize_image
from edgead.deploy.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    config_from_metadata,
    read_metadata,
    to_input,
    train_images,
    validation_images,
)
from edgead.deploy.quantize import HEAD_SCOPES, quantize_onnxruntime, score_agreement
from edgead.metrics import image_auroc

SCOPES = {  # backbone stages kept in float, besides the head and postprocess; bias correction on or off
    "stage 0": ((0,), True),
    "stages 0-1": ((0, 1), True),
    "stages 0-2": ((0, 1, 2), True),
    "stages 0-2, no bias correction": ((0, 1, 2), False),
}


def scores(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [to_input(images[i : i + 8], "uint8") for i in range(0, len(images), 8)]
    return np.concatenate([session.run([OUTPUT_NAMES[1]], {INPUT_NAME: b})[0] for b in batches]).ravel()


def latency_ms(path: Path, image: np.ndarray, runs: int = 200) -> float:
    """Median ONNX Runtime run time of one uint8 image at batch 1 on 2 threads, after a warm-up."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {INPUT_NAME: to_input(image[None], "uint8")}
    for _ in range(20):
        session.run(None, inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print(
        "| run | float stages | score error (val) | rank correlation (val) | test image AUROC change | INT8 ms |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for run in args.runs:
        model = run / "export" / "model.onnx"
        config = config_from_metadata(read_metadata(model), model)
        calibration, validation = train_images(config, 64), validation_images(config)
        data = open_dataset(config.extra["dataset"])
        test = np.stack([resize_image(load_rgb(s.path), config.image_size) for s in data.test])
        labels = np.array([s.label for s in data.test])
        fp32_val, fp32_test = scores(model, validation), scores(model, test)
        spread = float(np.quantile(fp32_val, 0.99) - fp32_val.min())
        for name, (stages, bias_correction) in SCOPES.items():
            keep = HEAD_SCOPES + tuple(f"/backbone/stages.{i}/" for i in stages)
            with tempfile.TemporaryDirectory() as tmp:
                quantized = quantize_onnxruntime(
                    model, Path(tmp) / "q.onnx", calibration, keep_float=keep, bias_correction=bias_correction
                )
                val, tst = scores(quantized, validation), scores(quantized, test)
                milliseconds = latency_ms(quantized, calibration[0])
            agreement = score_agreement(fp32_val, val, spread)
            error, rho = agreement["int8_score_error"], agreement["int8_rank_correlation"]
            change = 100 * (image_auroc(labels, tst) - image_auroc(labels, fp32_test))
            print(
                f"| {run.name} | {name} | {error:.3f} | {rho:.3f} | {change:+.1f} | {milliseconds:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
