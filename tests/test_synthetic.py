"""The synthetic demo dataset: deterministic, in MVTec layout, with visible defects and exact masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from edgead.data import DEFECT_TYPES, load_mask, load_rgb, make_synthetic_dataset, open_dataset, render_part
from edgead.errors import DatasetError


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_render_part_is_deterministic():
    for defect in (None, *DEFECT_TYPES):
        a, mask_a = render_part(np.random.default_rng(5), 64, defect)
        b, mask_b = render_part(np.random.default_rng(5), 64, defect)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and mask_a.dtype == bool
        assert (a == b).all() and (mask_a == mask_b).all()
    with pytest.raises(ValueError, match="unknown defect"):
        render_part(np.random.default_rng(0), 64, "dust")


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defects_are_visible_and_small(defect):
    size = 128
    part_area = np.pi * (0.34**2 - 0.11**2) * size**2
    for seed in range(4):
        image, mask = render_part(np.random.default_rng(seed), size, defect)
        assert 0.003 * part_area < mask.sum() < 0.06 * part_area
        # Contrast against the pixels just around the defect.
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        gray = image.astype(float).mean(axis=2)
        assert abs(gray[mask].mean() - gray[ring].mean()) > 20


def test_dataset_layout_counts_and_determinism(tmp_path):
    kw = dict(n_train=5, n_test_good=3, n_test_defect=6, size=64, seed=1)
    root = make_synthetic_dataset(tmp_path / "a", **kw)
    again = make_synthetic_dataset(tmp_path / "b", **kw)
    assert _files(root) == _files(again)
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in _files(root))

    counts = {t: len(list((root / "test" / t).glob("*.png"))) for t in DEFECT_TYPES}
    assert counts == {"scratch": 2, "spot": 2, "crack": 1, "missing": 1}
    assert len(list((root / "train" / "good").glob("*.png"))) == 5
    assert len(list((root / "test" / "good").glob("*.png"))) == 3

    data = open_dataset(root)
    assert data.layout == "mvtec" and data.has_masks and data.defect_types == sorted(DEFECT_TYPES)
    for sample in data.test:
        if sample.label == 1:
            mask = load_mask(sample.mask_path)
            assert mask.shape == load_rgb(sample.path).shape[:2] == (64, 64) and mask.any()

    other = make_synthetic_dataset(tmp_path / "c", **{**kw, "seed": 2})
    first = _files(root)[0]
    assert (root / first).read_bytes() != (other / first).read_bytes()


def test_refuses_to_overwrite_unless_asked(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n_train=2, n_test_good=1, n_test_defect=1, size=32)
    with pytest.raises(DatasetError, match="overwrite=True"):
        make_synthetic_dataset(root, n_train=1, size=32)
    make_synthetic_dataset(root, n_train=1, n_test_good=1, n_test_defect=0, size=32, overwrite=True)
    assert len(open_dataset(root).train) == 1 and not (root / "ground_truth").exists()


def test_default_dataset_has_the_documented_split(tmp_path):
    root = make_synthetic_dataset(tmp_path / "demo")
    data = open_dataset(root)
    assert len(data.train) == 60 and len(data.test) == 35 and data.has_masks
