"""DifferNet's evaluation protocol against ours: the test AUROC after every epoch of a differnet fit.

The reference code of DifferSqueezeNet (github.com/jjmanrique/differnet_squeezenet, train.py) evaluates
the test set after every 8 of its 192 epochs and saves the weights whenever the test AUROC is the best so
far; DifferNet's own code prints the best of those 24 evaluations too. Its image score is the mean
squared latent ``z`` over the test-time transforms (no log-determinant), where edgead's is the full
negative log-likelihood. This benchmark measures what those two differences are worth on our data,
without changing what edgead ships:

- it refits the flow of an existing differnet run (same samples, split, hyperparameters and seed, so
  the last epoch reproduces the run) and after each of its epochs scores the test images, whose
  features under the run's test-time rotations are extracted once (the extractor is frozen);
- per dataset and score (``nll``: edgead's; ``latent``: DifferNet's), it reports the last epoch's AUROC
  (what a fit keeps), the best AUROC over the epochs and its epoch (the papers' protocol: selected on
  the test set, so not an estimate of anything), and the AUROC at the epoch with the lowest mean NLL on
  the run's normal validation images (a label-free choice a user could make).

    python benchmarks/differnet_protocol.py runs/differnet/differnet_default_transistor \\
        --out docs/results/differnet_protocol.md

``--variant NAME=JSON`` (repeatable) refits with hyperparameters changed, e.g.
``--variant default='{}' --variant views64='{"views": 64, "epochs": 6}'`` (more distinct augmented views
for the same number of steps); without it, one variant: the run's own hyperparameters.

The curves go to the JSON beside the page and to a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from edgead.data.datasets import open_dataset
from edgead.metrics.auroc import image_auroc
from edgead.models.differnet.model import DifferNet, rotate
from edgead.models.differnet.train import FEATURE_BATCH, train_differnet
from edgead.models.image_training import load_images
from edgead.outputs import atomic_write_text
from edgead.reporting import new_figure, results_header, write_rows_page
from edgead.runs import fitted_split, load_run

SCORES = ("nll", "latent")
COLUMNS = [
    "dataset", "variant", "score", "last_epoch_auroc", "best_auroc", "best_epoch", "validation_epoch",
    "validation_epoch_auroc", "epochs",
]  # fmt: skip


@torch.no_grad()
def rotated_features(pipeline, images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """[T, N, D, 1, 1]: the pooled features of every image under every test-time rotation."""
    per_angle = []
    for angle in angles:
        parts = []
        for start in range(0, len(images), FEATURE_BATCH):
            batch = images[start : start + FEATURE_BATCH].float() / 255
            parts.append(pipeline.features(rotate(batch, angle.expand(len(batch)))))
        per_angle.append(torch.cat(parts))
    return torch.stack(per_angle)


@torch.no_grad()
def scores(head: DifferNet, features: torch.Tensor) -> dict[str, np.ndarray]:
    """Image scores [N] of both kinds, averaged over the rotations of ``features`` [T, N, D, 1, 1]."""
    nll, latent = [], []
    for view in features:
        energy, log_det = head.latent_energy_and_log_det(view)
        nll.append(energy - log_det)
        latent.append(energy)
    return {"nll": torch.stack(nll).mean(0).numpy(), "latent": torch.stack(latent).mean(0).numpy()}


def measure(run_dir: Path, changes: dict) -> tuple[str, list[dict]]:
    """(dataset label, one row per epoch) for one differnet run, refitted with ``changes``."""
    pipeline, config = load_run(run_dir, expect_model="differnet")
    split = fitted_split(config)
    if split is None:
        raise SystemExit(f"error: the dataset of {run_dir} is not on this machine, or changed since its fit")
    train, validation = split
    dataset = open_dataset(config.extra["dataset"])
    shipped = pipeline.head
    if "scales" in changes:
        raise SystemExit("error: a variant cannot change scales (the extractor is the run's)")
    head = DifferNet(**{**shipped.hyperparameters(), **changes})
    head.attach(shipped.dims)
    angles = head.test_angles()
    test_images = load_images(dataset.test, pipeline.image_size)
    labels = np.array([s.label for s in dataset.test])
    test_features = rotated_features(pipeline, test_images, angles)
    validation_features = rotated_features(pipeline, load_images(validation, pipeline.image_size), angles)
    train_features = rotated_features(pipeline, load_images(train, pipeline.image_size), torch.zeros(1))
    curve: list[dict] = []

    def on_epoch(epoch: int) -> None:
        test = scores(head, test_features)
        row = {
            "epoch": epoch,
            "train_nll": float(scores(head, train_features)["nll"].mean()),
            "validation_nll": float(scores(head, validation_features)["nll"].mean()),
        }
        row.update({f"{kind}_auroc": image_auroc(labels, test[kind]) for kind in SCORES})
        curve.append(row)
        print(json.dumps({"run": run_dir.name, **row}), flush=True)

    train_differnet(head, pipeline, train, on_epoch=on_epoch)
    return dataset.name, curve


def summary(label: str, variant: str, curve: list[dict]) -> list[dict]:
    """Per score: the last epoch, the test-selected best, and the validation-NLL choice."""
    chosen = min(curve, key=lambda row: row["validation_nll"])
    rows = []
    for kind in SCORES:
        best = max(curve, key=lambda row: row[f"{kind}_auroc"])
        rows.append({
            "dataset": label, "variant": variant, "score": kind, "last_epoch_auroc": curve[-1][f"{kind}_auroc"],
            "best_auroc": best[f"{kind}_auroc"], "best_epoch": best["epoch"], "validation_epoch": chosen["epoch"],
            "validation_epoch_auroc": chosen[f"{kind}_auroc"], "epochs": len(curve),
        })  # fmt: skip
    return rows


def plot(curves: dict[str, list[dict]], out: Path) -> None:
    """Test AUROC per epoch for both scores; the mean NLL of the normal validation images and of the
    (unrotated) training images on the right axis."""
    fig = new_figure(5 * len(curves), 4)
    for k, (label, curve) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), k + 1)
        epochs = [row["epoch"] for row in curve]
        for kind in SCORES:
            ax.plot(
                epochs,
                [row[f"{kind}_auroc"] for row in curve],
                "o-",
                markersize=3,
                label=f"test AUROC, {kind}",
            )
        validation = ax.twinx()
        validation.plot(
            epochs, [row["validation_nll"] for row in curve], "--", color="grey", label="validation NLL"
        )
        if "train_nll" in curve[0]:  # pages measured before it was recorded lack it
            train = [row["train_nll"] for row in curve]
            validation.plot(epochs, train, ":", color="black", label="training NLL (unrotated)")
        validation.set_ylabel("mean NLL per dimension")
        ax.set(xlabel="epoch", ylabel="test image AUROC", title=label)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + validation.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="differnet run folders (edgead fit / benchmark)")
    parser.add_argument("--out", default="docs/results/differnet_protocol.md")
    parser.add_argument("--variant", action="append", default=[], help="NAME=JSON hyperparameter changes")
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    variants = [
        (name, json.loads(changes or "{}")) for name, _, changes in (v.partition("=") for v in args.variant)
    ]
    variants = variants or [("default", {})]
    quoted = [f"--variant '{v}'" for v in args.variant]
    command = " ".join(
        ["python benchmarks/differnet_protocol.py", *map(str, args.runs), *quoted, "--out", args.out]
    )
    header = [
        *results_header("DifferNet's protocol (test AUROC after every epoch) against edgead's", command),
        "- Each run's flow is refitted as its fit did it (same samples, split and seed; hyperparameters the run's "
        "unless the variant changes them) and the test images are scored after every epoch, with the run's "
        "test-time rotations. last_epoch_auroc: what edgead keeps. best_auroc / best_epoch: the best test AUROC "
        "over the epochs, the protocol of DifferNet's and DifferSqueezeNet's reference code (they keep or report "
        "the best of 24 test evaluations): chosen on the test set, so an optimistic bound, not an estimate. "
        "validation_epoch(_auroc): the epoch with the lowest mean NLL on the run's normal validation images "
        "(label-free) and its test AUROC. Scores: nll = edgead's (0.5 |z|^2 - log det, per dimension); latent = "
        "DifferNet's (mean z^2, no log-determinant).",
        *[f"- {note}" for note in args.note],
        "",
    ]
    rows: list[dict] = []
    curves: dict[str, list[dict]] = {}
    out = Path(args.out)
    for run_dir in args.runs:
        for name, changes in variants:
            label, curve = measure(run_dir, changes)
            curves[f"{label} {name}"] = curve
            rows += summary(label, name, curve)
            write_rows_page(out, header, rows, COLUMNS)
            summary_and_curves = json.dumps({"summary": rows, "curves": curves}, indent=2)
            atomic_write_text(out.with_suffix(".json"), summary_and_curves + "\n")
            plot(curves, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
