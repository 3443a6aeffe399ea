"""INT8 ONNX Runtime against fp32 PyTorch eager for one run, timed interleaved (issue: deployment, 4x target).

Sequential timings on a shared 2-core VM drift by tens of percent between minutes, which is as large as
the effect being measured. Here each round times every runtime on the same images one after the other,
and the ratio is taken per round, so drift cancels out. Each runtime is timed alone in a fresh process
(`edgead.hardware.measure_in_fresh_process`): with all five loaded in one process, the worker threads
of the runtime that ran before keep spinning for a while after it returns (measured: ONNX Runtime INT8
took 3.4 ms per image right after PyTorch had run, 2.4 ms alone), which on 2 cores charges one runtime
for another's threads. Writes a markdown table to --out.

    .venv/bin/python benchmarks/speedup.py runs/deployment/tinyglass_default_bottle --rounds 7
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
from edgead.reporting import markdown_table, results_header


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder with export/model.onnx and export/model.int8.onnx")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("docs/results/speedup.md"))
    args = parser.parse_args(argv)

    export = args.run / "export"
    models = {  # name: (path, runtime)
        "torch fp32 (eager)": (args.run, "torch"),
        "onnxruntime fp32": (export / "model.onnx", "onnxruntime"),
        "onnxruntime INT8": (export / "model.int8.onnx", "onnxruntime"),
        "openvino fp32": (export / "model.onnx", "openvino"),
        "openvino INT8": (export / "model.int8.xml", "openvino"),
    }
    config = load_inferencer(args.run, "torch").config
    images = torch.from_numpy(train_images(config, args.images)).permute(0, 3, 1, 2).float() / 255
    p50: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(args.rounds):
        for name, (path, runtime) in models.items():
            p50[name].append(measure_in_fresh_process(path, runtime, images)["p50_ms"])
        print(round_index, {k: round(v[-1], 2) for k, v in p50.items()}, flush=True)
    torch_times = p50["torch fp32 (eager)"]
    rows = [
        {
            "runtime": name,
            "p50_ms_median": statistics.median(times),
            "p50_ms_min": min(times),
            "p50_ms_max": max(times),
            "speedup_vs_torch_median": statistics.median(
                t / x for t, x in zip(torch_times, times, strict=True)
            ),
            "speedup_vs_torch_min": min(t / x for t, x in zip(torch_times, times, strict=True)),
        }
        for name, times in p50.items()
    ]
    command = ".venv/bin/python benchmarks/speedup.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        *results_header(f"Speed-up over PyTorch eager, interleaved rounds: {args.run.name}", command),
        f"- {args.rounds} rounds; in each, every runtime is timed on the same {args.images} train/good images "
        "at batch 1 (median ms per image, after warm-up, `edgead.latency.measure_end_to_end`), one runtime "
        "after the other, each alone in a fresh process (so that no other runtime's worker threads compete "
        f"for the cores); speed-up = torch p50 / runtime p50 within a round. {torch.get_num_threads()} threads "
        "for every runtime.",
        "",
        markdown_table(rows, list(rows[0])),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
