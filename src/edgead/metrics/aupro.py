"""Area under the per-region-overlap curve (AUPRO), as defined for MVTec AD (Bergmann et al.).

Pixel AUROC is dominated by large defects: one big scratch outweighs ten small dents. PRO gives
every connected defect region the same weight, so a model must find the small ones too.

For a threshold t:
- PRO(t): mean over all ground-truth regions (connected components of the masks, over all images)
  of the fraction of the region's pixels with map value >= t;
- FPR(t): fraction of all normal pixels (of all images) with map value >= t.
AUPRO integrates PRO over FPR from 0 to ``fpr_limit`` (trapezoids, linear interpolation at the
limit) and divides by ``fpr_limit``, so a perfect map scores 1.0 and a constant map fpr_limit / 2.

Regions use 4-connectivity (``scipy.ndimage.label``'s default structure), like MVTec's reference
evaluation; two defects touching only at a corner are two regions.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._ranking import as_binary, as_scores, check_same_shape, partial_area, tied_cumulative


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1 / (region area * number of regions), 0 on normal pixels.

    Summing the weights of the pixels above a threshold gives PRO at that threshold.
    Returns the weights and the number of regions.
    """
    labels = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        image_labels, n = ndimage.label(mask)
        labels[i] = np.where(image_labels > 0, image_labels + n_regions, 0)
        n_regions += n
    if n_regions == 0:
        return np.zeros(masks.shape), 0
    areas = np.bincount(labels.ravel(), minlength=n_regions + 1).astype(np.float64)
    areas[0] = np.inf  # background gets weight 0
    return 1.0 / (areas[labels] * n_regions), n_regions


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PRO curve as ``(fpr, pro, thresholds)`` with fpr non-decreasing, starting at (0, 0).

    ``num_thresholds=None`` evaluates every unique map value (exact; one sort of all pixels).
    An integer evaluates that many thresholds evenly spaced from the smallest to the largest map
    value, counted with histograms (no sort; faster, an approximation of the exact curve).
    """
    m = as_binary(masks, "masks")
    a = as_scores(maps, "maps")
    check_same_shape(m, a, ("masks", "maps"))
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise ValueError(f"masks and maps must be N x H x W (or H x W), got shape {m.shape}")
    n_pos = int(m.sum())
    n_neg = m.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a PRO curve needs both normal and anomalous pixels")
    weights, _ = region_weights(m)

    if num_thresholds is None:
        thresholds, n_above, pos_above, pro = tied_cumulative(a, m, weights)
        fp = n_above - pos_above
    else:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
        lo, hi = float(a.min()), float(a.max())
        grid = np.linspace(lo, hi, num_thresholds) if hi > lo else np.array([lo])
        # Bin j holds scores in [grid[j], grid[j+1]); "above grid[j]" is the sum of bins j and later.
        bins = np.searchsorted(grid, a.ravel(), side="right") - 1
        normal = np.bincount(bins, weights=~m.ravel(), minlength=grid.size)
        overlap = np.bincount(bins, weights=weights.ravel(), minlength=grid.size)
        thresholds = grid[::-1]
        fp = np.cumsum(normal[::-1])
        pro = np.cumsum(overlap[::-1])
    fpr = np.r_[0.0, fp / n_neg]
    pro = np.r_[0.0, pro]
    return fpr, pro, np.r_[np.inf, thresholds]


def aupro(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (1.0 = perfect).

    masks: N x H x W bool ground truth; maps: N x H x W anomaly maps (higher = more anomalous).
    Exact over all unique map values by default; see :func:`pro_curve` for ``num_thresholds``.
    NaN when there are no defect pixels or no normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m = as_binary(masks, "masks")
    if m.all() or not m.any():
        return float("nan")
    fpr, pro, _ = pro_curve(m, maps, num_thresholds)
    return partial_area(fpr, pro, fpr_limit) / fpr_limit
