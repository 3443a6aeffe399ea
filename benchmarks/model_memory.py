"""DifferSqueezeNet's Table 3 for our data: model size and peak fit / inference memory, per model.

    python benchmarks/model_memory.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/kolektorsdd \
        --models differnet,patchcore,padim --work-dir runs/model_memory --out docs/results/model_memory.md

Per model, each step in a fresh process so that every peak is its own:
- fit: ``edgead fit`` as a child process; fit_peak_rss_mb is that child's peak resident memory (``wait4``'s
  ru_maxrss), fit_s its wall time (image loading and the threshold included);
- size: the run folder's weights file (run_mb; PatchCore's memory bank and PaDiM's Gaussians are part of
  the model), and the exported ONNX fp32 and INT8 ONNX Runtime files (``edgead export --int8``);
- inference: peak resident memory of a fresh process that loads only that model and runs it over test images
  at batch 1 and then at batch 16 (:func:`edgead.hardware.measure_in_fresh_process`; PatchCore's exported
  graph computes exact distances to its whole bank, 16 x 1024 x 20,000 values at batch 16), on torch (the run
  folder: DifferNet's test-time rotations and gradient maps included) and on the INT8 file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (torch before faiss: one OpenMP runtime)

from edgead.benchmark import test_images
from edgead.hardware import measure_in_fresh_process
from edgead.reporting import results_header, write_rows_page
from edgead.runs import WEIGHTS_FILE

COLUMNS = [
    "model", "dataset", "image_size", "fit_s", "fit_peak_rss_mb", "run_mb", "onnx_mb", "onnx_int8_mb",
    "torch_peak_rss_mb", "torch_p50_ms", "int8_peak_rss_mb", "int8_p50_ms",
]  # fmt: skip
LATENCY_IMAGES = 16


def run_child(command: list[str]) -> tuple[float, float]:
    """Run ``command``; (wall seconds, the child's peak resident memory in MB). Fails loudly."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(command)} failed:\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss * 1024 / 1e6  # Linux: kB


def edgead(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgead", *args]


def measure(dataset: Path, model: str, image_size: int, work: Path) -> dict:
    run = work / f"{model}_{dataset.name}"
    fit_s, fit_peak = run_child(
        edgead("fit", str(dataset), "--model", model, "--image-size", str(image_size), "--out", str(run), "--force")
    )
    run_child(edgead("export", str(run), "--int8", "--out", str(run / "export")))
    onnx, int8 = run / "export" / "model.onnx", run / "export" / "model.int8.onnx"
    images = test_images(dataset, image_size, LATENCY_IMAGES)
    on_torch = measure_in_fresh_process(run, "torch", images)
    on_int8 = measure_in_fresh_process(int8, "onnxruntime", images)
    return {
        "model": model, "dataset": dataset.name, "image_size": image_size,
        "fit_s": fit_s, "fit_peak_rss_mb": fit_peak,
        "run_mb": (run / WEIGHTS_FILE).stat().st_size / 1e6,
        "onnx_mb": onnx.stat().st_size / 1e6, "onnx_int8_mb": int8.stat().st_size / 1e6,
        "torch_peak_rss_mb": on_torch["peak_rss_mb"], "torch_p50_ms": on_torch["p50_ms"],
        "int8_peak_rss_mb": on_int8["peak_rss_mb"], "int8_p50_ms": on_int8["p50_ms"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", type=Path, nargs="+")
    parser.add_argument("--models", default="differnet,patchcore,padim")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/model_memory"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/model_memory.md"))
    args = parser.parse_args()
    for dataset in args.datasets:
        if not dataset.is_dir():
            sys.exit(f"error: {dataset} is not a dataset folder")
    names = ", ".join(dataset.name for dataset in args.datasets)
    header = [
        *results_header(f"Model size and peak memory (DifferSqueezeNet's Table 3) on {names}",
                        "python " + " ".join(sys.argv)),
        *[f"- {line.strip()}" for line in __doc__.split("\n- ")[1:]],
        f"- Latency: median over {LATENCY_IMAGES} test images at batch 1, after one warm-up pass, in that fresh "
        "process; DifferNet on torch averages 16 rotations and computes a gradient map per image, its INT8 file "
        "scores one unrotated view.",
        "",
    ]  # fmt: skip
    rows: list[dict] = []
    for dataset in args.datasets:
        for model in args.models.split(","):
            rows.append(measure(dataset, model, args.image_size, args.work_dir))
            write_rows_page(args.out, header, rows, COLUMNS)
            print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
