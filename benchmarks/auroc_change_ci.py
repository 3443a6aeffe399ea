"""Is an AUROC change real? Paired bootstrap of the image-AUROC difference between two `edgead test` reports.

Both reports must score the same test images (e.g. a run's ``test/scores.csv`` and its INT8 file's
``export/test_model.int8_onnxruntime/scores.csv``). Test images are resampled with replacement, the
same draw for both models, and the 95% interval of the difference is printed: on a small test set
(KolektorSDD: 155 images, 52 defective) a weak model's AUROC moves by points with tiny score changes.

    python benchmarks/auroc_change_ci.py runs/deployment/tinyglass_default_kolektorsdd/test/scores.csv \\
        runs/deployment/tinyglass_default_kolektorsdd/export/test_model.int8_openvino/scores.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from edgead.metrics import image_auroc


def read_scores(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Image paths, labels and scores of a scores.csv written by `edgead test`."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return (
        [row["path"] for row in rows],
        np.array([int(row["label"]) for row in rows]),
        np.array([float(row["score"]) for row in rows]),
    )


def paired_bootstrap(
    labels: np.ndarray, first: np.ndarray, second: np.ndarray, draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC(second) - AUROC(first), and the 2.5% / 97.5% quantiles of it over bootstrap draws."""
    rng = np.random.default_rng(seed)
    changes = []
    for _ in range(draws):
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() != labels[pick].max():  # both classes needed for an AUROC
            changes.append(image_auroc(labels[pick], second[pick]) - image_auroc(labels[pick], first[pick]))
    low, high = np.percentile(changes, [2.5, 97.5])
    return image_auroc(labels, second) - image_auroc(labels, first), float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reference", type=Path, help="scores.csv of the reference model (fp32)")
    parser.add_argument("others", type=Path, nargs="+", help="scores.csv of the models to compare with it")
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    paths, labels, reference = read_scores(args.reference)
    for other in args.others:
        other_paths, _, scores = read_scores(other)
        if other_paths != paths:
            raise SystemExit(
                f"{other} does not score the same images, in the same order, as {args.reference}"
            )
        change, low, high = paired_bootstrap(labels, reference, scores, args.draws)
        print(
            f"{other}: image AUROC change {100 * change:+.2f} points, 95% interval "
            f"[{100 * low:+.2f}, {100 * high:+.2f}] ({len(labels)} images, {labels.sum()} anomalous)"
        )


if __name__ == "__main__":
    main()
