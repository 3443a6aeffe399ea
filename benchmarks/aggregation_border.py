"""One table: every model with the 3x3 aggregation's border averaged inside the image vs zero-padded.

Reads the JSON that `edgead benchmark` writes beside its report, for runs made with the same command
except ``--aggregation-border``, and writes the comparison with the change per row and the mean per
model. The commands that made the inputs go in with ``--command``.

    python benchmarks/aggregation_border.py --valid A.json B.json --zeros C.json D.json \
        --command "..." --out docs/results/aggregation_border.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgead.reporting import results_page

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def load(paths: list[Path]) -> dict[tuple[str, str], dict]:
    rows = {}
    for path in paths:
        for row in json.loads(path.read_text()):
            if row.get("runtime", "torch") == "torch" and row["layers"] == "2,3":
                rows[(row["dataset"], row["model"])] = row
    return rows


def summary_notes(rows: list[dict]) -> list[str]:
    """One line per model: the image AUROC of each dataset before -> after, so the pages can cite it."""
    notes = []
    for model in dict.fromkeys(r["model"] for r in rows):
        moves = ", ".join(
            f"{r['dataset']} {r['image_auroc_valid']:.3f} -> {r['image_auroc_zeros']:.3f} "
            f"({r['image_change_points']:+.1f})"
            for r in rows
            if r["model"] == model
        )
        notes.append(f"{model}, image AUROC valid -> zeros (points): {moves}.")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=Path, nargs="+", required=True)
    parser.add_argument("--zeros", type=Path, nargs="+", required=True)
    parser.add_argument("--command", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("docs/results/aggregation_border.md"))
    args = parser.parse_args()
    valid, zeros = load(args.valid), load(args.zeros)
    rows = []
    for key in [k for k in zeros if k in valid]:
        row = {"dataset": key[0], "model": key[1]}
        for metric in METRICS:
            before, after = valid[key].get(metric), zeros[key].get(metric)
            row[f"{metric}_valid"] = before
            row[f"{metric}_zeros"] = after
            if metric == "image_auroc":
                row["image_change_points"] = 100 * (after - before)
        rows.append(row)
    means = []
    for model in dict.fromkeys(r["model"] for r in rows):
        picked = [r for r in rows if r["model"] == model]
        means.append(
            {
                "model": model,
                "datasets": len(picked),
                "mean_image_auroc_valid": float(np.mean([r["image_auroc_valid"] for r in picked])),
                "mean_image_auroc_zeros": float(np.mean([r["image_auroc_zeros"] for r in picked])),
            }
        )
        means[-1]["change_points"] = 100 * (means[-1]["mean_image_auroc_zeros"] - means[-1]["mean_image_auroc_valid"])
    page = results_page(
        "3x3 feature aggregation at the image border: inside-pixels average (valid) vs zero padding (zeros)",
        " && ".join(args.command) or None,
        [
            "valid = `AvgPool2d(3, stride=1, padding=1, count_include_pad=False)` (edgead before this change): "
            "a border patch averages only the pixels inside the feature map. zeros = `count_include_pad=True`, "
            "as in PatchCore's own code: the window is zero-padded and always divided by 9, so border and "
            "corner patches shrink to 6/9 and 4/9 of their magnitude.",
            "Everything else identical (EfficientNet-Lite0, stride 8 + 16, 256x256, each model's defaults, same "
            "seeds). The test sets have 40-63 anomalous images: changes under about 1 point are noise.",
            *summary_notes(rows),
        ],
        [("Mean image AUROC per model", means, list(means[0])), ("Per dataset", rows, list(rows[0]))],
    )
    args.out.write_text(page)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
