"""Metrics against hand-computed cases and independent brute-force implementations."""

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from edgead.metrics import (
    aupro,
    evaluate,
    f1_max,
    image_auroc,
    normalize_scores,
    pixel_auroc,
    pixel_f1_max,
    pixel_roc_curve,
    precision_recall_at,
    pro_curve,
    roc_curve_points,
    threshold_from_normal,
)
from edgead.metrics.aupro import region_weights

# ------------------------------------------------------------------------------------------ AUROC


def test_image_auroc_perfect_inverted_constant():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert image_auroc(labels, np.ones(5)) == 0.5


def test_image_auroc_hand_computed_with_ties():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.3])
    # positive 0.4 beats 0.1 and 0.2 and ties 0.4 (2.5); 0.8 beats all (3); 0.3 beats 0.1 and 0.2 (2)
    assert image_auroc(labels, scores) == pytest.approx(7.5 / 9)


def test_image_auroc_single_class_is_nan_without_error():
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.5, 0.2]))
    assert math.isnan(image_auroc([True, True], [0.1, 0.5]))


def test_auroc_input_errors():
    with pytest.raises(ValueError, match="binary"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_roc_curve_points():
    fpr, tpr, thresholds = roc_curve_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    assert np.all(np.diff(thresholds) < 0)
    with pytest.raises(ValueError):
        roc_curve_points([1, 1], [0.1, 0.2])


def test_pixel_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 16, 16)) < 0.2
    maps = np.round(rng.random((4, 16, 16)) + 0.5 * masks, 1).astype(np.float32)  # many ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, thresholds = pixel_roc_curve(masks, maps)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.isinf(thresholds[0]) and np.all(np.diff(thresholds) < 0)


def test_pixel_auroc_perfect_and_single_class():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:5] = True
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    assert math.isnan(pixel_auroc(np.zeros((2, 8, 8), bool), np.random.rand(2, 8, 8)))


# ------------------------------------------------------------------------------------------ AUPRO


def brute_force_aupro(masks, maps, fpr_limit):
    """Direct definition: loop over every unique threshold and every region."""
    regions = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask)
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = np.mean(normal >= t)
        pro = np.mean([np.mean(maps[i][region] >= t) for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def two_region_masks():
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:6, 2:6] = True  # region A, 16 pixels
    masks[1, 10:14, 10:14] = True  # region B, 16 pixels
    return masks


def test_aupro_perfect_map_is_one():
    masks = two_region_masks()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, masks.astype(float), fpr_limit=1.0) == pytest.approx(1.0)


def test_aupro_one_of_two_regions_found_is_half():
    masks = two_region_masks()
    rng = np.random.default_rng(0)
    maps = rng.random(masks.shape)  # normal pixels: 0..1
    maps[0][masks[0]] = 2.0  # region A: above every normal pixel
    maps[1][masks[1]] = -1.0  # region B: below every normal pixel
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_constant_map_is_low():
    masks = two_region_masks()
    # Everything tied: the curve is the diagonal, area up to 0.3 is 0.045, normalised 0.15.
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)


def test_aupro_small_regions_count_as_much_as_large_ones():
    masks = np.zeros((1, 40, 40), bool)
    masks[0, 0:30, 0:30] = True  # large region found
    masks[0, 35:37, 35:37] = True  # small region missed
    maps = masks.astype(float)
    maps[0, 35:37, 35:37] = -1.0
    assert pixel_auroc(masks, maps) > 0.99
    assert aupro(masks, maps) == pytest.approx(0.5)


@pytest.mark.parametrize("decimals", [1, 2, None])
def test_aupro_matches_brute_force(decimals):
    rng = np.random.default_rng(42)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:10, 8:11] = True
    masks[1, 1:3, 1:3] = True
    masks[1, 3, 3] = True  # touches the previous square only at a corner: a separate region
    maps = ndimage.gaussian_filter(rng.random(masks.shape), (0, 1, 1)) + 0.3 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)  # ties between normal and defect pixels
    for limit in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            brute_force_aupro(masks, maps, limit), abs=1e-3
        )


def test_regions_use_four_connectivity():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours
    weights, n_regions = region_weights(masks)
    assert n_regions == 2
    assert weights.sum() == pytest.approx(1.0)


def test_aupro_threshold_grid_close_to_exact():
    rng = np.random.default_rng(1)
    masks = np.zeros((8, 64, 64), bool)
    for i in range(4):
        masks[i, 10 + i * 5 : 20 + i * 5, 30:40] = True
    maps = ndimage.gaussian_filter(rng.random(masks.shape) + 0.4 * masks, (0, 2, 2))
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=2000) == pytest.approx(exact, abs=1e-2)
    fpr, pro, _ = pro_curve(masks, maps, num_thresholds=100)
    assert fpr.size == 101 and np.all(np.diff(fpr) >= 0) and pro[-1] == pytest.approx(1.0)


def test_aupro_undefined_and_invalid():
    assert math.isnan(aupro(np.zeros((2, 5, 5), bool), np.random.rand(2, 5, 5)))
    with pytest.raises(ValueError):
        aupro(two_region_masks(), np.zeros((2, 20, 20)), fpr_limit=0.0)


# --------------------------------------------------------------------------------- F1, thresholds


def test_f1_max_known_case():
    # thresholds 0.8, 0.6, 0.4, 0.1 give F1 2/3, 1/2, 4/5, 2/3
    f1, threshold = f1_max([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.8])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.4)
    assert all(math.isnan(v) for v in f1_max([0, 0], [0.1, 0.2]))


def test_pixel_f1_max_against_brute_force():
    rng = np.random.default_rng(3)
    masks = rng.random((3, 8, 8)) < 0.2
    maps = np.round(rng.random((3, 8, 8)) + 0.5 * masks, 1)  # rounded: many ties, which form one step
    best = max(
        2 * np.sum((maps >= t) & masks) / (np.sum(maps >= t) + masks.sum()) for t in np.unique(maps)
    )
    f1, threshold = pixel_f1_max(masks, maps)
    assert f1 == pytest.approx(best)
    assert 2 * np.sum((maps >= threshold) & masks) / (np.sum(maps >= threshold) + masks.sum()) == pytest.approx(f1)
    assert pixel_f1_max(masks, maps)[0] == pytest.approx(f1_max(masks.ravel(), maps.ravel())[0])
    assert pixel_f1_max(masks, masks * 2.0) == (1.0, 2.0)
    assert all(math.isnan(v) for v in pixel_f1_max(np.zeros((2, 4, 4), bool), maps[:2, :4, :4]))


def test_threshold_from_normal_is_a_quantile_of_normal_scores():
    normal = np.random.default_rng(0).normal(size=1000)
    t = threshold_from_normal(normal, quantile=0.95)
    assert np.mean(normal > t) == pytest.approx(0.05, abs=0.002)
    assert threshold_from_normal(normal, quantile=1.0) == normal.max()
    with pytest.raises(ValueError, match="zero normal"):
        threshold_from_normal(np.array([]))
    with pytest.raises(ValueError):
        threshold_from_normal(normal, quantile=1.5)


def test_precision_recall_at_counts():
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.9, 0.4, 0.5, 0.8]
    r = precision_recall_at(labels, scores, threshold=0.5)  # >= 0.5 is anomalous
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 2, 1, 1)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert r["accuracy"] == pytest.approx(0.5)
    nothing = precision_recall_at(labels, scores, threshold=10.0)
    assert nothing["precision"] == 0.0 and nothing["f1"] == 0.0 and nothing["tn"] == 3


def test_normalize_scores_puts_threshold_at_half():
    scores = np.array([-5.0, 1.0, 2.0, 3.0, 50.0])
    out = normalize_scores(scores, threshold=2.0, min_value=0.0, max_value=4.0)
    np.testing.assert_allclose(out, [0.0, 0.25, 0.5, 0.75, 1.0])
    rng = np.random.default_rng(0)
    s = rng.random(1000)
    assert np.array_equal(normalize_scores(s, 0.37, 0.0, 1.0) >= 0.5, s >= 0.37)
    with pytest.raises(ValueError):
        normalize_scores(s, 0.5, 1.0, 1.0)


# --------------------------------------------------------------------------------------- evaluate


def test_evaluate_full_is_json_serialisable():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 5 + [1] * 5)
    masks = np.zeros((10, 16, 16), bool)
    masks[5:, 4:8, 4:8] = True
    maps = rng.random(masks.shape) + masks
    scores = maps.reshape(10, -1).max(axis=1)
    result = evaluate(labels, scores, masks, maps, threshold=1.2)
    for key in ("image_auroc", "f1_max", "f1_max_threshold", "pixel_auroc", "aupro", "precision", "recall"):
        assert isinstance(result[key], float), key
    assert result["n_normal"] == 5 and result["n_anomalous"] == 5
    json.loads(json.dumps(result, allow_nan=False))


def test_evaluate_single_class_gives_none_not_nan():
    result = evaluate([0, 0, 0], [0.1, 0.2, 0.3], np.zeros((3, 4, 4), bool), np.zeros((3, 4, 4)), 0.25)
    assert result["image_auroc"] is None and result["pixel_auroc"] is None and result["aupro"] is None
    assert result["f1_max"] is None and result["fp"] == 1
    json.dumps(result, allow_nan=False)
    with pytest.raises(ValueError, match="both masks and maps"):
        evaluate([0, 1], [0.1, 0.2], masks=np.zeros((2, 4, 4), bool))
