"""Evaluation metrics on scores, maps and ground truth (numpy arrays); they know nothing of models.

- image level: :func:`image_auroc`, :func:`f1_max` (oracle, reported only), :func:`precision_recall_at`
- pixel level: :func:`pixel_auroc`, :func:`aupro`, :func:`pixel_f1_max` (oracle, reported only)
- decisions: :func:`threshold_from_normal`, :func:`normalize_scores`
- :func:`evaluate` bundles them into one JSON-ready dict.
"""

from __future__ import annotations

import math

import numpy as np

from ._ranking import as_binary
from .aupro import aupro, pro_curve
from .auroc import image_auroc, pixel_auroc, pixel_roc_curve, roc_curve_points
from .f1 import f1_max, pixel_f1_max
from .thresholds import normalize_scores, precision_recall_at, threshold_from_normal

__all__ = [
    "aupro",
    "evaluate",
    "f1_max",
    "image_auroc",
    "normalize_scores",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_roc_curve",
    "precision_recall_at",
    "pro_curve",
    "roc_curve_points",
    "threshold_from_normal",
]


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    threshold: float | None = None,
) -> dict:
    """All metrics of one test run as a flat, JSON-serialisable dict.

    Always: image_auroc, f1_max, f1_max_threshold, n_normal, n_anomalous. With masks and maps:
    pixel_auroc and aupro (FPR limit 0.3). With a threshold (chosen on normal validation data):
    threshold, precision, recall, f1, accuracy and the confusion counts tp, fp, tn, fn.
    Undefined values (e.g. AUROC on a single class) are None, so ``json.dump`` accepts the dict.
    """
    y = as_binary(labels).ravel()
    best_f1, best_threshold = f1_max(labels, scores)
    result: dict = {
        "n_normal": int((~y).sum()),
        "n_anomalous": int(y.sum()),
        "image_auroc": image_auroc(labels, scores),
        "f1_max": best_f1,
        "f1_max_threshold": best_threshold,
    }
    if (masks is None) != (maps is None):
        raise ValueError("pixel metrics need both masks and maps (got only one of them)")
    if masks is not None:
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["aupro"] = aupro(masks, maps, fpr_limit=0.3)
    if threshold is not None:
        result["threshold"] = float(threshold)
        result.update(precision_recall_at(labels, scores, threshold))
    return {k: _none_if_nan(v) if isinstance(v, float) else v for k, v in result.items()}
