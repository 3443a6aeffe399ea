"""`edgead benchmark`: fit and test several models on several datasets, one markdown table + JSON.

Accuracy comes from `edgead test`'s metrics; latency is measured per image at batch 1 on test images,
with the backbone and the head timed separately.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgead.data.datasets import ImageDataset, find_categories, open_dataset
from edgead.errors import DatasetError
from edgead.evaluation import evaluate_run
from edgead.latency import measure_latency
from edgead.profiling import model_profile
from edgead.reporting import markdown_table, results_header
from edgead.training import fit_run

COLUMNS = [
    "dataset",
    "model",
    "layers",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "precision",
    "recall",
    "fit_s",
    "backbone_ms",
    "head_ms",
    "postprocess_ms",
    "total_ms",
    "params_m",
    "gmacs",
    "run_mb",
]


def expand_datasets(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(label, path) per dataset; each given path is one dataset or a folder of categories (mvtec_ad/)."""
    found: list[tuple[str, Path]] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DatasetError(f"dataset folder {path} does not exist")
        if (path / "train" / "good").is_dir() or (path / "good").is_dir():
            found.append((path.name, path))
            continue
        categories = find_categories(path)
        if not categories:
            raise DatasetError(f"{path} is neither a dataset nor a folder of dataset categories")
        found.extend((f"{path.name}/{category.name}", category) for category in categories)
    return found


def folder_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 1e6


def benchmark_one(
    label: str,
    dataset: Path,
    model: str,
    layers: tuple[int, ...] | None,
    runs_dir: Path,
    image_size: int,
    backbone: str,
    hyperparameters: dict[str, Any],
    latency_images: int,
    progress: bool,
) -> dict[str, Any]:
    layer_tag = "default" if layers is None else "-".join(map(str, layers))
    run_dir = runs_dir / f"{model}_{layer_tag}_{label.replace('/', '_')}"
    pipeline, config = fit_run(
        dataset,
        run_dir,
        model=model,
        backbone=backbone,
        image_size=image_size,
        layers=layers,
        hyperparameters=hyperparameters.get(model, {}),
        progress=progress,
    )
    metrics = evaluate_run(run_dir, dataset, pipeline=pipeline, config=config, progress=progress)
    test_samples = open_dataset(dataset).test[:latency_images]
    images = torch.stack(
        [ImageDataset(test_samples, image_size)[i]["image"] for i in range(len(test_samples))]
    )
    latency = measure_latency(pipeline, images)
    profile = model_profile(pipeline)
    return {
        "dataset": label,
        "model": model,
        "layers": ",".join(map(str, config.layers)),
        "backbone": backbone,
        "image_size": image_size,
        **{
            k: metrics.get(k)
            for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "precision", "recall")
        },
        "fit_s": config.extra["fit_seconds"],
        **{k: latency[k] for k in ("backbone_ms", "head_ms", "postprocess_ms", "total_ms")},
        "params_m": profile["params"] / 1e6,
        "gmacs": profile["macs"] / 1e9,
        "head_data_mb": profile["head_data_bytes"] / 1e6,
        "run_mb": folder_megabytes(run_dir),
        "n_train": config.extra["n_train"],
        "n_validation": config.extra["n_validation"],
        "n_test": metrics.get("n_normal", 0) + metrics.get("n_anomalous", 0),
        "head": config.head,
        "run_dir": str(run_dir),
    }


def run_benchmark(
    datasets: Sequence[str | Path],
    models: Sequence[str],
    out_markdown: str | Path,
    runs_dir: str | Path = "runs/benchmark",
    image_size: int = 256,
    backbone: str = "efficientnet_lite0",
    hyperparameters: dict[str, dict[str, Any]] | None = None,
    layer_sets: Sequence[tuple[int, ...] | None] = (None,),
    latency_images: int = 20,
    progress: bool = True,
    command: str | None = None,
    notes: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Every dataset x layer set x model; ``layers`` None is the backbone's default (stride 8 + 16)."""
    paths = expand_datasets(datasets)
    rows = [
        benchmark_one(
            label,
            path,
            model,
            layers,
            Path(runs_dir),
            image_size,
            backbone,
            hyperparameters or {},
            latency_images,
            progress,
        )
        for label, path in paths
        for layers in layer_sets
        for model in models
    ]
    out_markdown = Path(out_markdown)
    out_markdown.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        *results_header(
            f"Benchmark: {', '.join(models)} with {backbone} at {image_size}x{image_size}", command
        ),
        f"- Images resized to {image_size}x{image_size}; masks resized with nearest neighbour. Thresholds "
        "(precision/recall columns) come from normal validation images carved from train/good, never from test.",
        "- Latency: median ms per image at batch 1 over test images (backbone = preprocess + backbone; "
        "head = patch scores + image score, i.e. the kNN search for PatchCore; postprocess = upsample + "
        "blur). fit_s = feature extraction + head fit (coreset selection, TinyGLASS training included). params_m = learned weights used at inference (a memory bank or Gaussians are data, not parameters); gmacs = multiply-accumulates per image at batch 1, kNN search included.",
        "- layers: backbone stage indices (2 = stride 8, 3 = stride 16, 4 = stride 32).",
        *[f"- {note}" for note in notes],
        "",
        markdown_table(rows, COLUMNS),
        "",
    ]
    out_markdown.write_text("\n".join(lines))
    out_markdown.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return rows
