"""What does structured channel pruning cost and save? One fitted run, pruned at several ratios.

For a base run (fitted with ``edgead fit``; fitted here with the same defaults if the folder is missing),
every ratio is pruned with :func:`edgead.deploy.prune.prune_run` (TinyGLASS discriminator hidden
channels + the expanded channels of the backbone's last stage, then the head is retrained on the same
training images), and every run, the base included, is tested like ``edgead test RUN`` and measured:
parameters and MACs (:mod:`edgead.profiling`), run size on disk, image/pixel AUROC, AUPRO, median
latency at batch 1 (:func:`edgead.latency.measure_latency` on the first test images) and the INT8
budget on the IMX500 (:mod:`edgead.deploy.budget`). Writes a markdown table and JSON.

    .venv/bin/edgead fit ../shared/datasets/mvtec_ad/bottle --model tinyglass --out runs/prune_base
    .venv/bin/python benchmarks/pruning.py --base runs/prune_base --ratios 0.25,0.5 \\
        --out docs/results/pruning.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from edgead.data.datasets import ImageDataset, open_dataset
from edgead.deploy.budget import budget_report
from edgead.deploy.prune import prune_run
from edgead.evaluation import evaluate_run
from edgead.latency import measure_latency
from edgead.profiling import model_profile
from edgead.reporting import markdown_table, results_header
from edgead.runs import load_run

COLUMNS = [
    "ratio",
    "params_m",
    "gmacs",
    "run_mb",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "total_ms",
    "backbone_ms",
    "head_ms",
    "int8_mb",
    "imx500_fits",
    "fit_s",
]


def run_megabytes(run_dir: Path) -> float:
    return sum(f.stat().st_size for f in run_dir.glob("*.safetensors")) / 1e6


def measure(run_dir: Path, ratio: float) -> dict[str, Any]:
    """Size, compute, test metrics (what `edgead test RUN` computes) and the IMX500 budget of one run."""
    pipeline, config = load_run(run_dir)
    metrics = evaluate_run(run_dir, progress=False)
    profile = model_profile(pipeline)
    budget = budget_report(pipeline, "imx500")
    return {
        "ratio": ratio,
        "run": str(run_dir),
        "params_m": profile["params"] / 1e6,
        "backbone_params": profile["backbone_params"],
        "head_params": profile["head_params"],
        "gmacs": profile["macs"] / 1e9,
        "run_mb": run_megabytes(run_dir),
        **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
        "int8_mb": budget["total_bytes"] / 1e6,
        "imx500_fits": budget["fits"],
        "hidden": config.head.get("hidden"),
        "pruned_channels": config.extra.get("pruned_channels", {}),
        "selected_epoch": config.extra.get("selected_epoch"),
        "fit_s": config.extra.get("fit_seconds"),
        "torch_threads_fit": config.extra.get("torch_threads"),
    }


def measure_latencies(rows: list[dict[str, Any]], latency_images: int, rounds: int) -> None:
    """Median ms per image at batch 1, the runs interleaved over ``rounds`` so that they share conditions."""
    pipelines = [load_run(row["run"]) for row in rows]
    config = pipelines[0][1]
    samples = open_dataset(config.extra["dataset"]).test[:latency_images]
    images = torch.stack([ImageDataset(samples, config.image_size)[i]["image"] for i in range(len(samples))])
    keys = ("backbone_ms", "head_ms", "postprocess_ms", "total_ms")
    measured: list[dict[str, list[float]]] = [{k: [] for k in keys} for _ in rows]
    for _ in range(rounds):
        for (pipeline, _), values in zip(pipelines, measured, strict=True):
            latency = measure_latency(pipeline, images)
            for key in keys:
                values[key].append(latency[key])
    for row, values in zip(rows, measured, strict=True):
        row.update({key: statistics.median(v) for key, v in values.items()})
        row["latency_rounds"] = values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("runs/prune_base"), help="fitted run to prune")
    parser.add_argument(
        "--dataset",
        type=Path,
        default=Path("../shared/datasets/mvtec_ad/bottle"),
        help="dataset to fit the base run on when --base does not exist",
    )
    parser.add_argument("--model", default="tinyglass")
    parser.add_argument("--ratios", default="0.25,0.5", help="comma-separated shares of channels to remove")
    parser.add_argument("--latency-images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds, runs interleaved")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="retraining epochs of a pruned TinyGLASS (default: the run's)",
    )
    parser.add_argument("--reuse", action="store_true", help="measure pruned runs already in place")
    parser.add_argument(
        "--fit-threads",
        type=int,
        default=None,
        help="torch threads while pruning/retraining and testing (latency always uses the default)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results/pruning.md"))
    parser.add_argument("--note", action="append", default=[], help="extra line for the report header")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]

    if not (args.base / "config.json").is_file():
        from edgead.training import fit_run  # the defaults of `edgead fit`

        fit_run(args.dataset, args.base, model=args.model)
    latency_threads = torch.get_num_threads()
    if args.fit_threads:
        torch.set_num_threads(args.fit_threads)
    rows = [measure(args.base, 0.0)]
    print(json.dumps(rows[-1], default=str), flush=True)
    for ratio in ratios:
        out = args.base.parent / f"{args.base.name}_pruned{int(round(ratio * 100))}"
        if not (args.reuse and (out / "config.json").is_file()):
            overrides = {"epochs": args.epochs} if args.epochs else None
            prune_run(args.base, out, ratio, progress=False, hyperparameters=overrides)
        rows.append(measure(out, ratio))
        print(json.dumps(rows[-1], default=str), flush=True)
    torch.set_num_threads(latency_threads)
    measure_latencies(rows, args.latency_images, args.rounds)

    command = ".venv/bin/python benchmarks/pruning.py " + " ".join(sys.argv[1:] if argv is None else argv)
    base_config = load_run(args.base)[1]
    lines = results_header(
        f"Structured channel pruning: {base_config.model} on {base_config.extra['dataset_name']}",
        command=command,
    )
    lines += [
        f"- Base run: `{args.base}` ({base_config.model}, {base_config.backbone} layers {base_config.layers}, "
        f"{base_config.image_size}x{base_config.image_size}, head {json.dumps(base_config.head)}).",
        "- ratio = share of channels removed (kept counts rounded to multiples of 8) in the TinyGLASS "
        "discriminator's hidden layer (L1 norm of filter x |BN gamma|) and in the expanded channels of "
        "every MBConv block of the backbone's last used stage (stride 16, blocks 5-10; |gamma| of the "
        "expansion BN). Block outputs, hence the 152 feature channels, are unchanged. After pruning the "
        "head is retrained on the same training images (starting from the pruned weights, "
        f"{f'{args.epochs} epochs' if args.epochs else 'as many epochs as the base run'}, model selection on "
        "the normal validation images) and the threshold recalibrated; nothing looks at the test set. "
        "ratio 0 is the base run.",
        "- params_m = learned weights used at inference; gmacs = multiply-accumulates per image at batch 1 "
        "(edgead.profiling); run_mb = model.safetensors (float32, backbone included); latency = median ms "
        f"per image at batch 1 over the first {args.latency_images} test images (edgead.latency), "
        f"median of {args.rounds} rounds with the runs interleaved, {latency_threads} torch threads; "
        "int8_mb = INT8 weights + data + estimated peak activations (edgead.deploy.budget), checked "
        "against the IMX500's 8 MB; fit_s = the base run's fit, or the pruned run's retraining (feature "
        "cache + epochs), wall clock as recorded in each run's config.json.",
        *[f"- {note}" for note in args.note],
        "",
    ]
    lines.append(markdown_table(rows, COLUMNS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
