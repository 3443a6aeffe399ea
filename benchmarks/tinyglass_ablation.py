"""Diagnostic: how TinyGLASS's test image AUROC evolves, epoch by epoch, under training-recipe variants.

The backbone features of the training views (and their LAS versions), the selection set and the test
images are computed once and cached in ``--cache``; every variant then trains only the head on them.
This looks at the test set after every epoch on purpose: it is a diagnosis of why a category fails,
never a way to pick epochs or settings (``edgead fit`` selects on normal validation images only).

    python benchmarks/tinyglass_ablation.py ../shared/datasets/mvtec_ad/screw \
        '{}' '{"gas": "hypersphere"}' '{"radius": 2.0, "noise_std": 0.06, "las": false}'

Each variant is JSON: TinyGLASS hyperparameters, plus ``"las": false`` to train on GAS alone. Variants
that change the cached views (``views``, ``use_foreground``, ``seed``) need their own ``--cache``, made
with ``--cache-settings '{"use_foreground": true}'`` (say).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import edgead.models.glass as glass
from edgead.data.datasets import open_dataset, split_validation
from edgead.inference import extract_features
from edgead.metrics import image_auroc
from edgead.models import create_pipeline


def build_cache(dataset: str, path: Path, hyperparameters: dict) -> dict:
    pipeline = create_pipeline("tinyglass", **hyperparameters)
    data = open_dataset(dataset)
    train, validation = split_validation(data.train, fraction=0.1, seed=0)  # as `edgead fit` does
    cache = {
        "train": pipeline.head._cache_views(pipeline, train, True),
        "selection": pipeline.head._selection_set(pipeline, validation, True),
        "test": extract_features(pipeline, data.test),
        "labels": torch.tensor([s.label for s in data.test]),
    }
    torch.save(cache, path)
    return cache


def report(result: dict, out: Path | None) -> None:
    """Print one JSON line, and append it to ``out`` when given."""
    print(json.dumps(result), flush=True)
    if out:
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")


def load_cache(
    dataset: str, path: Path | None, hyperparameters: dict, prefix: str = "tinyglass_ablation"
) -> dict:
    """The cached features at ``path`` (default /tmp/<prefix>_<category>.pt), built if missing."""
    path = path or Path("/tmp") / f"{prefix}_{Path(dataset).name}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    return build_cache(dataset, path, hyperparameters)


def run_variant(cache: dict, variant: dict) -> dict:
    variant = dict(variant)
    use_las = variant.pop("las", True)
    pipeline = create_pipeline("tinyglass", **variant)
    head = pipeline.head
    normal, synthetic, masks = cache["train"]
    mean, std = normal.mean(dim=(0, 2, 3), keepdim=True), normal.std(dim=(0, 2, 3), keepdim=True)
    head.set_fitted(feature_mean_=mean, feature_std_=std.clamp_min(1e-6))
    curve: list[float] = []
    select = head.selection_score

    def select_and_diagnose(*args):  # records the test AUROC next to each epoch's selection score
        head.eval()  # batch norm with its running statistics, as at inference
        with torch.no_grad():
            scores = pipeline.postprocess(head(cache["test"])).amax(dim=(1, 2, 3)).numpy()
        head.train()
        curve.append(round(image_auroc(cache["labels"].numpy(), scores), 3))
        return select(*args)

    head.selection_score = select_and_diagnose
    focal = glass.focal_loss
    if not use_las:
        glass.focal_loss = lambda probabilities, targets, gamma=2.0: probabilities.sum() * 0
    start = time.perf_counter()
    try:
        head.train_cached(normal, synthetic, masks, cache["selection"], pipeline.postprocess)
    finally:
        glass.focal_loss = focal
    return {
        "variant": {**variant, **({} if use_las else {"las": False})},
        "train_s": round(time.perf_counter() - start),
        "selected_epoch": head.selected_epoch_,
        "test_auroc_at_selected": curve[head.selected_epoch_ - 1],
        "test_auroc_min_max": [min(curve), max(curve)],
        "test_auroc_by_epoch": curve,
    }


def main(description: str = __doc__, cache_prefix: str = "tinyglass_ablation") -> None:
    """Command line; ``tinyglass_wide_features.py`` reuses it with its own description and cache names."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset")
    parser.add_argument("variants", nargs="*", default=["{}"])
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"feature cache (default: /tmp/{cache_prefix}_<category>.pt)"
    )
    parser.add_argument(
        "--cache-settings", default="{}", help="JSON hyperparameters the cached views are made with"
    )
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per variant here")
    args = parser.parse_args()
    cache = load_cache(args.dataset, args.cache, json.loads(args.cache_settings), cache_prefix)
    for text in args.variants:
        report({"dataset": Path(args.dataset).name, **run_variant(cache, json.loads(text))}, args.out)


if __name__ == "__main__":
    main()
