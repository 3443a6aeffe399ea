"""Area under the ROC curve, per image and per pixel.

AUROC is undefined when the ground truth holds a single class (e.g. a test split with no
defects). The functions then return NaN instead of raising, so that an evaluation still reports
everything else and the caller can say why this number is missing.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from ._ranking import as_binary, as_scores, check_same_shape, tied_cumulative


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC (labels: 1 = anomalous). NaN when only one class is present."""
    y = as_binary(labels)
    s = as_scores(scores)
    check_same_shape(y, s, ("labels", "scores"))
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y.ravel(), s.ravel()))


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image-level ROC curve as ``(fpr, tpr, thresholds)``; thresholds decrease, the first is +inf.

    Raises ValueError when only one class is present, because no curve exists then.
    """
    y = as_binary(labels)
    s = as_scores(scores)
    check_same_shape(y, s, ("labels", "scores"))
    if y.all() or not y.any():
        raise ValueError("a ROC curve needs both normal and anomalous samples")
    fpr, tpr, thresholds = roc_curve(y.ravel(), s.ravel())
    return fpr, tpr, thresholds


def pixel_roc_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact pixel-level ROC curve ``(fpr, tpr, thresholds)`` over all pixels of all images.

    Starts at (0, 0) with threshold +inf, then one point per unique map value (ties form one step).
    Raises ValueError when the masks hold only one class.
    """
    m = as_binary(masks, "masks")
    a = as_scores(maps, "maps")
    check_same_shape(m, a, ("masks", "maps"))
    n_pos = int(m.sum())
    n_neg = m.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a pixel ROC curve needs both normal and anomalous pixels")
    thresholds, n_above, tp, _ = tied_cumulative(a, m)
    fpr = np.r_[0.0, (n_above - tp) / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, thresholds]


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all images (masks N x H x W bool, maps N x H x W float).

    Exact (ties count one half, as in sklearn) from one sort of the pixels, so it fits in memory for
    hundreds of 256 x 256 maps. NaN when the masks hold only one class.
    """
    m = as_binary(masks, "masks")
    if m.all() or not m.any():
        return float("nan")
    fpr, tpr, _ = pixel_roc_curve(m, maps)
    return float(np.trapezoid(tpr, fpr))
