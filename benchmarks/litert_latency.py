"""LiteRT against ONNX Runtime on the same exported models, timed interleaved (issue: TFLite, 1.5x target).

For each run (whose ``export/`` folder holds ``model.onnx``, ``model.int8.onnx``, ``model.tflite`` and
``model.int8.tflite``, as `edgead benchmark --runtime onnxruntime-int8 --runtime litert-int8` leaves it),
every round times the four files one after the other, each alone in a fresh process at batch 1 on the
same normal images (`edgead.hardware.measure_in_fresh_process`, as benchmarks/speedup.py does), and the
LiteRT / ONNX Runtime ratio is taken per round so that the VM's drift between minutes cancels out.

    .venv/bin/python benchmarks/litert_latency.py runs/deployment/* --rounds 5 --out docs/results/litert_latency.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from edgead.deploy.onnx_export import train_images
from edgead.deploy.runtimes import load_inferencer
from edgead.hardware import measure_in_fresh_process
from edgead.reporting import results_header, write_rows_page

FILES = {  # name: (file in RUN/export, runtime)
    "ORT fp32": ("model.onnx", "onnxruntime"),
    "ORT INT8": ("model.int8.onnx", "onnxruntime"),
    "LiteRT fp32": ("model.tflite", "litert"),
    "LiteRT INT8": ("model.int8.tflite", "litert"),
}


def time_run(run: Path, rounds: int, images: int) -> dict[str, object]:
    config = load_inferencer(run, "torch").config
    batch = torch.from_numpy(train_images(config, images)).permute(0, 3, 1, 2).float() / 255
    p50: dict[str, list[float]] = {name: [] for name in FILES}
    for round_index in range(rounds):
        for name, (file, runtime) in FILES.items():
            p50[name].append(measure_in_fresh_process(run / "export" / file, runtime, batch)["p50_ms"])
        print(run.name, round_index, {k: round(v[-1], 2) for k, v in p50.items()}, flush=True)

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(p50[a], p50[b], strict=True)]

    int8_ratio, fp32_ratio = ratio("LiteRT INT8", "ORT INT8"), ratio("LiteRT fp32", "ORT fp32")
    return {
        "run": run.name,
        **{f"{name} p50 ms": statistics.median(times) for name, times in p50.items()},
        "LiteRT/ORT INT8 (median)": statistics.median(int8_ratio),
        "LiteRT/ORT INT8 (max)": max(int8_ratio),
        "LiteRT/ORT fp32 (median)": statistics.median(fp32_ratio),
        "LiteRT INT8 speed-up over LiteRT fp32": statistics.median(ratio("LiteRT fp32", "LiteRT INT8")),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders with the four exported files")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("docs/results/litert_latency.md"))
    args = parser.parse_args(argv)
    missing = [
        str(r / "export" / f)
        for r in args.runs
        for f, _ in FILES.values()
        if not (r / "export" / f).is_file()
    ]
    if missing:
        sys.exit(
            f"error: missing exported files (run the benchmark with the four runtimes first): {missing[:3]}"
        )
    command = "python benchmarks/litert_latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        *results_header("LiteRT against ONNX Runtime, fp32 and INT8, interleaved rounds", command),
        f"- Each of {args.rounds} rounds times the four files of a run one after the other, each alone in a fresh "
        f"process (2 threads, batch 1, median over {args.images} train/good images after warm-up); ratios are "
        "taken per round, then their median (and max) over the rounds.",
        "- Target (issue 19): LiteRT INT8 within 1.5x of ONNX Runtime INT8 on the same model.",
        "",
    ]
    rows: list[dict[str, object]] = []
    for run in args.runs:  # the page is rewritten after every run: a stopped measurement keeps what it has
        rows.append(time_run(run, args.rounds, args.images))
        write_rows_page(args.out, header, rows, list(rows[0]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
