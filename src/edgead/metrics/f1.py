"""Best achievable F1 score.

F1-max picks its threshold by looking at the test labels, so it is an oracle: it says how well the
scores *could* separate the classes, not how a deployed detector performs. It is reported next to
AUROC and never used to choose a threshold; deployed thresholds come from normal validation images
(:mod:`edgead.metrics.thresholds`).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve

from ._ranking import as_binary, as_scores, check_same_shape, tied_cumulative


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it (score >= threshold = anomalous).

    Returns ``(nan, nan)`` when there is no anomalous sample, since F1 is then undefined.
    """
    y = as_binary(labels).ravel()
    s = as_scores(scores).ravel()
    check_same_shape(y, s, ("labels", "scores"))
    if not y.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, counting every pixel of every image, and that threshold (an oracle).

    The segmentation counterpart of :func:`f1_max` (masks N x H x W bool, maps N x H x W float), the
    paper's pixel F1-max. Exact, from one sort of the pixels (ties form one step): F1 = 2 TP / (predicted
    + actual defect pixels). ``(nan, nan)`` when the masks hold no defect pixel.
    """
    m = as_binary(masks, "masks")
    a = as_scores(maps, "maps")
    check_same_shape(m, a, ("masks", "maps"))
    n_pos = int(m.sum())
    if n_pos == 0:
        return float("nan"), float("nan")
    thresholds, n_above, tp, _ = tied_cumulative(a, m)
    f1 = 2.0 * tp / (n_above + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])
