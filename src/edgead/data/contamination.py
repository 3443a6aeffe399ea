"""Contaminated training sets: some defective images slip into the "good" images a model learns from.

On a real line nobody checks every training image, so a few defects end up in train. To measure how
much that hurts, :func:`contaminate` moves a seeded share of a dataset's defective TEST images into
its training list. The **contamination ratio** is the share of the anomalous test images moved
(``round(ratio * n_anomalous)``), drawn per defect type so each type loses about the same share,
and nested over ratios (the same seed moves the 5% images again at 10%).
Moved samples keep label 1 so experiments can count them; the model never sees labels. They leave
the test set, so no image is both fitted on and scored.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from edgead.data.datasets import AnomalyDataset, Sample
from edgead.errors import DatasetError


def _stratified_order(dataset: AnomalyDataset, seed: int) -> list[int]:
    """Indices of the anomalous test images in the order they are moved, spread over defect types.

    Each type is shuffled (seeded); its k-th image of n gets the position (k + 0.5) / n, and all are
    sorted by position, so any prefix holds about the same share of every type. Taking prefixes makes
    the picks nested: what a smaller ratio moves, a larger one moves too.
    """
    by_type: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(dataset.test):
        if sample.label == 1:
            by_type[sample.defect_type].append(index)
    rng = np.random.default_rng(seed)
    keyed = []
    for name in sorted(by_type):
        indices = rng.permutation(by_type[name]).tolist()
        keyed += [((k + 0.5) / len(indices), name, index) for k, index in enumerate(indices)]
    return [index for _, _, index in sorted(keyed)]


def contaminate(dataset: AnomalyDataset, ratio: float, seed: int = 0) -> AnomalyDataset:
    """A new dataset with ``round(ratio * n_anomalous)`` anomalous test images moved to the end of train.

    The training set's resulting share of anomalous images is ``n_moved / (n_train + n_moved)``
    (see :func:`anomalous_share`). ``ratio`` 0 returns an equivalent copy.
    """
    if not 0.0 <= ratio < 1.0:
        raise DatasetError(f"contamination ratio must be in [0, 1), got {ratio}")
    order = _stratified_order(dataset, seed)
    if not order:
        raise DatasetError(f"{dataset.root} has no anomalous test images to contaminate train with")
    n_move = round(ratio * len(order))
    if n_move == len(order):
        raise DatasetError(
            f"contamination ratio {ratio} would move all {n_move} anomalous test images of {dataset.name} "
            "into train, leaving none to test; use a smaller ratio"
        )
    moved = set(order[:n_move])
    return dataclasses.replace(
        dataset,
        train=list(dataset.train) + [dataset.test[i] for i in sorted(moved)],
        test=[s for i, s in enumerate(dataset.test) if i not in moved],
    )


def anomalous_share(samples: list[Sample]) -> float:
    """Share of anomalous (label 1) samples in a list: the real contamination of a training set."""
    return sum(s.label == 1 for s in samples) / len(samples) if samples else 0.0
