"""Write a results table from run folders already fitted and tested (e.g. an interrupted benchmark).

Usage: python benchmarks/collect_runs.py OUT.md "TITLE" RUN_DIR... [--note TEXT]...
Reads each run's config.json and test/metrics.json; nothing is refitted or re-tested.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from edgead.reporting import markdown_table, results_header


def main(argv: list[str]) -> None:
    notes = [argv[i + 1] for i, a in enumerate(argv) if a == "--note"]
    args = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    out, title, runs = Path(args[0]), args[1], [Path(a) for a in args[2:]]
    rows = []
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        metrics = json.loads((run / "test" / "metrics.json").read_text())
        rows.append(
            {
                "dataset": config["extra"]["dataset_name"],
                "model": config["model"],
                **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
                "selected_epoch": config["extra"].get("selected_epoch"),
                "fit_s": config["extra"]["fit_seconds"],
                "run": str(run),
            }
        )
    columns = [
        "dataset",
        "model",
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "f1_max",
        "selected_epoch",
        "fit_s",
        "run",
    ]
    lines = [
        *results_header(title, "python benchmarks/collect_runs.py " + shlex.join(argv)),
        *[f"- {n}" for n in notes],
        "",
        markdown_table(rows, columns),
        "",
    ]
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
