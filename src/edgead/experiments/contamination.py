"""`edgead experiment contamination`: how accuracy falls when defects slip into the training images.

For every dataset and contamination ratio (share of the anomalous test images moved into train, see
:mod:`edgead.data.contamination`), fit a model on the contaminated train list and score it on the
test images that no ratio moved (the same for every ratio). The threshold's validation images are carved from that train list as in
any fit; the reported metrics (AUROC, AUPRO) do not depend on a threshold. Writes one markdown file
(a table and a plot per dataset) and the rows as JSON beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgead.benchmark import expand_datasets
from edgead.data.contamination import anomalous_share, contaminate
from edgead.data.datasets import AnomalyDataset, Sample, open_dataset
from edgead.errors import UsageError
from edgead.evaluation import score_predictions
from edgead.inference import predict_samples
from edgead.models import create_head
from edgead.outputs import atomic_write_text, check_output_file, check_work_dir
from edgead.reporting import markdown_table, results_header
from edgead.training import FitSettings, fit_run

COLUMNS = [
    "ratio",
    "n_contaminated",
    "train_anomalous_share",
    "n_train",
    "n_test",
    "n_test_anomalous",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "fit_s",
]

RATIO_DEFINITION = (
    "ratio = share of the anomalous test images moved into the training images, round(ratio x "
    "n_anomalous), seeded, spread over defect types and nested (a larger ratio moves the same images "
    "plus more). train_anomalous_share = anomalous images / all training images."
)


def contamination_one(
    data: AnomalyDataset,
    label: str,
    ratio: float,
    test: list[Sample],
    model: str,
    runs_dir: Path,
    image_size: int,
    seed: int,
    hyperparameters: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    """Fit on ``data`` contaminated at ``ratio`` and score ``test`` (none of it moved): one table row."""
    contaminated = contaminate(data, ratio, seed=seed)
    run_dir = runs_dir / f"{model}_{label.replace('/', '_')}_ratio{ratio:g}"
    pipeline, config = fit_run(
        contaminated,
        run_dir,
        model=model,
        image_size=image_size,
        seed=seed,
        progress=progress,
        hyperparameters=hyperparameters,
        force=True,  # the runs folder is the experiment's own
    )
    predictions = predict_samples(pipeline, test, progress=progress)
    metrics = score_predictions(predictions, config)
    return {
        "dataset": label,
        "model": model,
        "ratio": ratio,
        "n_contaminated": len(contaminated.train) - len(data.train),
        "train_anomalous_share": anomalous_share(contaminated.train),
        "n_train": config.extra["n_train"],
        "n_validation": config.extra["n_validation"],
        "n_test": len(test),
        "n_test_anomalous": metrics["n_anomalous"],
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics.get("pixel_auroc"),
        "aupro": metrics.get("aupro"),
        "f1_max": metrics["f1_max"],
        "fit_s": config.extra["fit_seconds"],
        "image_size": image_size,
        "seed": seed,
        "head": config.head,
        "run_dir": str(run_dir),
    }


def scored_test_sets(
    data: AnomalyDataset, ratios: Sequence[float], seed: int, same_test_set: bool
) -> list[list[Sample]]:
    """The test images scored at each ratio: what that ratio leaves, or what every ratio leaves.

    One shared test set (the default) keeps the curve's points comparable: otherwise the moved images
    also leave the test set, and a smaller, different test set moves the metrics by itself.
    """
    remaining = [contaminate(data, ratio, seed=seed).test for ratio in ratios]
    if not same_test_set:
        return remaining
    common = set.intersection(*(set(test) for test in remaining))
    shared = [s for s in data.test if s in common]
    return [shared for _ in ratios]


def save_contamination_plot(path: Path, rows: list[dict[str, Any]], title: str) -> Path:
    """Image and pixel AUROC against the contamination ratio, as a PNG (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ratios = [row["ratio"] for row in rows]
    for key, name in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        values = [row[key] for row in rows]
        if any(v is not None for v in values):
            ax.plot(ratios, [float("nan") if v is None else v for v in values], marker="o", label=name)
    ax.set(xlabel="contamination ratio (share of defects moved to train)", ylabel="AUROC")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def run_contamination(
    datasets: Sequence[str | Path],
    ratios: Sequence[float],
    out_markdown: str | Path,
    model: str = "tinyglass",
    runs_dir: str | Path = "runs/contamination",
    image_size: int = 256,
    seed: int = 0,
    hyperparameters: dict[str, Any] | None = None,
    same_test_set: bool = True,
    progress: bool = True,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Every dataset x ratio; writes ``out_markdown``, its JSON and ``<stem>_<dataset>.png`` per dataset.

    With ``same_test_set`` every ratio is scored on the test images that no ratio moved; otherwise
    each ratio is scored on the test images it leaves.
    """
    if not ratios:
        raise UsageError("give at least one contamination ratio, e.g. --ratios 0,0.1,0.2")
    out_markdown = check_output_file(out_markdown, (".md",))
    check_work_dir(runs_dir, "--runs-dir")
    out_markdown.parent.mkdir(parents=True, exist_ok=True)  # the plots go beside it as datasets finish
    FitSettings.check(
        model=model,
        backbone="efficientnet_lite0",
        image_size=image_size,
        layers=None,
        validation_fraction=0.1,
        threshold_quantile=0.99,
        seed=seed,
        batch_size=16,
        aggregation_border=None,
    )
    create_head(model, **dict(hyperparameters or {}))
    # Open and contaminate everything first, so a bad path or ratio fails before any fitting.
    loaded = []
    for label, path in expand_datasets(datasets):
        data = open_dataset(path)
        loaded.append((label, data, scored_test_sets(data, ratios, seed, same_test_set)))

    lines = [
        *results_header(f"Training-set contamination: {model} at {image_size}x{image_size}", command),
        f"- {RATIO_DEFINITION}",
        "- Test set: "
        + (
            "the same for every ratio (the test images no ratio moved), so the points are comparable."
            if same_test_set
            else "what each ratio leaves (it shrinks as the ratio grows)."
        ),
        "- n_train = images fitted on. The validation images (threshold only) are a seeded share of the "
        "contaminated training list, as a user's would be; no reported metric uses the threshold.",
        "",
    ]
    all_rows: list[dict[str, Any]] = []
    for label, data, tests in loaded:
        rows = [
            contamination_one(
                data,
                label,
                ratio,
                test,
                model=model,
                runs_dir=Path(runs_dir),
                image_size=image_size,
                seed=seed,
                hyperparameters=dict(hyperparameters or {}),
                progress=progress,
            )
            for ratio, test in zip(ratios, tests, strict=True)
        ]
        plot = out_markdown.with_name(f"{out_markdown.stem}_{label.replace('/', '_')}.png")
        save_contamination_plot(plot, rows, f"{model} / {label}")
        lines += [f"## {label}", "", markdown_table(rows, COLUMNS), f"![{label}]({plot.name})", ""]
        all_rows += rows
        atomic_write_text(out_markdown, "\n".join(lines))  # after every dataset: finished work is kept
        atomic_write_text(out_markdown.with_suffix(".json"), json.dumps(all_rows, indent=2, default=str) + "\n")
    return all_rows
