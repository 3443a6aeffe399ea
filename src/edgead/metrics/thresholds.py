"""Decision thresholds and score normalisation.

A threshold is chosen on normal validation images only: test labels must never leak into a
decision the deployed detector makes. Everything here uses one convention: a sample is anomalous
when its score is >= the threshold.
"""

from __future__ import annotations

import numpy as np

from ._ranking import as_binary, as_scores, check_same_shape


def threshold_from_normal(normal_scores: np.ndarray, quantile: float = 0.99) -> float:
    """Threshold = the given quantile of scores of NORMAL validation images.

    With quantile q, about a fraction 1 - q of similar normal images will be flagged (false alarms).
    Raises ValueError when no score is given.
    """
    s = as_scores(normal_scores, "normal_scores").ravel()
    if s.size == 0:
        raise ValueError(
            "cannot choose a threshold from zero normal validation scores; "
            "the validation set needs defect-free images"
        )
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    return float(np.quantile(s, quantile))


def precision_recall_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Confusion counts and rates at a fixed threshold (score >= threshold = anomalous).

    Precision is 0 when nothing is predicted anomalous, recall is 0 when there is no anomalous
    sample, F1 is 0 when both are 0: a degenerate detector gets 0, never NaN.
    """
    y = as_binary(labels).ravel()
    s = as_scores(scores).ravel()
    check_same_shape(y, s, ("labels", "scores"))
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    tn = int(np.sum(~pred & ~y))
    fn = int(np.sum(~pred & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (tp + tn) / y.size if y.size else float("nan")
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": accuracy,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def normalize_scores(scores: np.ndarray, threshold: float, min_value: float, max_value: float) -> np.ndarray:
    """Map scores (or maps) to [0, 1] with the threshold at exactly 0.5 (anomalib's min-max scheme).

    ``(score - threshold) / (max_value - min_value) + 0.5``, clipped to [0, 1]. Users then read one
    fixed cut-off, 0.5, whatever the model. ``normalized >= 0.5`` agrees with ``score >= threshold``
    except within float rounding of the threshold, so decisions are made on the raw score.
    """
    if not max_value > min_value:
        raise ValueError(f"max_value ({max_value}) must be greater than min_value ({min_value})")
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    return np.clip((s - threshold) / (max_value - min_value) + 0.5, 0.0, 1.0)
