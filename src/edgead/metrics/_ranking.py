"""Shared helpers: input checks and exact cumulative counts over tied score thresholds.

Pixel-level metrics rank millions of scores. Sorting once and reading cumulative sums at the
end of each run of equal scores gives the exact curve at every unique threshold, with a few
arrays of the pixel count in memory (no per-threshold loops, no pairwise comparisons).
"""

from __future__ import annotations

import numpy as np


def as_binary(labels: object, name: str = "labels") -> np.ndarray:
    """Return labels as a bool array; accept bool or 0/1 values, refuse anything else."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1), got values {np.unique(arr)[:5]}")
    return arr.astype(bool)


def as_scores(scores: object, name: str = "scores") -> np.ndarray:
    """Return scores as a float array and refuse NaN, which would make any ranking meaningless."""
    arr = np.asarray(scores)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contain NaN; check the model output before computing metrics")
    return arr


def check_same_shape(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} shape {a.shape} does not match {names[1]} shape {b.shape}")


def tied_cumulative(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray | None = None):
    """Exact counts above every unique threshold, thresholds in descending order.

    Returns ``(thresholds, n_above, pos_above, weight_above)``: for each unique score t, the number
    of items with score >= t, how many of them are positive and (if ``weights`` is given) the sum of
    their weights. ``weight_above`` is None when no weights are given.
    """
    scores = scores.ravel()
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    # Last index of each run of equal scores: reading cumulative sums there treats ties as one step.
    ends = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1]
    thresholds = sorted_scores[ends]
    del sorted_scores
    pos_above = np.cumsum(positives.ravel()[order])[ends]
    weight_above = None
    if weights is not None:
        weight_above = np.cumsum(weights.ravel()[order])[ends]
    return thresholds, ends + 1, pos_above, weight_above


def partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) for x in [0, x_max], interpolating linearly at x_max.

    ``x`` must be non-decreasing, start at 0 and reach at least ``x_max``.
    """
    k = int(np.searchsorted(x, x_max, side="right"))  # x[:k] <= x_max
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < x_max:
        t = (x_max - x[k - 1]) / (x[k] - x[k - 1])
        xs = np.r_[xs, x_max]
        ys = np.r_[ys, y[k - 1] + t * (y[k] - y[k - 1])]
    return float(np.trapezoid(ys, xs))
