"""Ablation of the student model: which part of the recipe carries the accuracy, at what cost.

Each variant is JSON: student hyperparameters, plus optional ``backbone`` and ``layers`` (the teacher).
Every variant is fitted with `edgead fit`'s defaults otherwise (10% of train/good held out for the map
quantiles and the threshold) and tested on the test split; nothing is selected on the test set, the
table only reports it.

    python benchmarks/student_ablation.py ../shared/datasets/mvtec_ad/screw \
        --variant default='{}' --variant no-ae='{"autoencoder": false}' \
        --out docs/results/student_ablation.md

Runs go to ``--runs-dir/<variant>_<dataset>``; ``--reuse`` loads a run that is already there instead of
refitting it (its fit time is the one recorded at its fit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch  # noqa: F401  (torch before faiss: one OpenMP runtime)

from edgead.benchmark import expand_datasets, fit_or_reuse
from edgead.evaluation import evaluate_run
from edgead.profiling import model_profile
from edgead.reporting import results_header, write_rows_page

COLUMNS = ["variant", "dataset", "teacher", "image_auroc", "pixel_auroc", "aupro", "params_m", "gmacs", "fit_s", "settings"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--variant", action="append", required=True, help="NAME=JSON (repeatable)")
    parser.add_argument("--runs-dir", default="runs/student_ablation")
    parser.add_argument("--out", default="docs/results/student_ablation.md")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    variants = []
    for text in args.variant:
        name, _, settings = text.partition("=")
        variants.append((name, json.loads(settings or "{}")))
    command = "python benchmarks/student_ablation.py " + " ".join(
        f"'{a}'" if any(c in a for c in " {}\"") else a for a in sys.argv[1:]
    )
    header = [
        *results_header("Student model ablation", command),
        "- Each row is one `edgead fit --model student` with the settings shown (the rest default: Lite0 "
        "stride 8 + 16 teacher, width 32, autoencoder on, 2000 steps of batch 8, lr 1e-3, penalty on), then "
        "`edgead test`. Nothing is selected on the test set. params_m and gmacs: the whole sensor graph "
        "(teacher + student + autoencoder), batch 1 at 256 x 256.",
        *[f"- {note}" for note in args.note],
        "",
    ]
    rows: list[dict] = []
    for label, path in expand_datasets(args.datasets):
        for name, settings in variants:
            settings = dict(settings)
            backbone = settings.pop("backbone", "efficientnet_lite0")
            layers = tuple(settings.pop("layers")) if "layers" in settings else None
            run_dir = Path(args.runs_dir) / f"{name}_{label}"
            pipeline, config = fit_or_reuse(
                run_dir, path, args.reuse, model="student", backbone=backbone, layers=layers,
                hyperparameters=settings, progress=False,
            )  # fmt: skip
            metrics = evaluate_run(run_dir, path, pipeline=pipeline, config=config, progress=False)
            profile = model_profile(pipeline)
            rows.append({
                "variant": name, "dataset": label, "teacher": f"{backbone} {','.join(map(str, config.layers))}",
                **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
                "params_m": profile["params"] / 1e6, "gmacs": profile["macs"] / 1e9,
                "fit_s": config.extra["fit_seconds"], "settings": json.dumps(settings) if settings else "",
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            write_rows_page(args.out, header, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
