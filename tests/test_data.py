"""Image reading, dataset layouts, validation splits and the torch dataset, on tiny images made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgead.data import images
from edgead.data.datasets import (
    ImageDataset,
    Sample,
    find_categories,
    load_folder,
    load_mvtec,
    make_loader,
    open_dataset,
    split_validation,
)
from edgead.data.images import list_images, load_mask, load_rgb, resize_image, resize_mask
from edgead.errors import DatasetError, EdgeadError, ImageReadError

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _save(path: Path, pixels: np.ndarray | Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image.save(path)
    return path


def _rgb(seed: int = 0, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _mask(size: int = 24) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[4:10, 6:12] = 255
    return mask


# --- reading images ---------------------------------------------------------------------------


def test_grayscale_loads_as_rgb(tmp_path):
    gray = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    rgb = load_rgb(_save(tmp_path / "g.png", gray))
    assert rgb.shape == (12, 16, 3) and rgb.dtype == np.uint8
    assert (rgb == gray[..., None]).all()


def test_rgba_is_composited_on_black(tmp_path):
    rgb = load_rgb(_save(tmp_path / "a.png", Image.new("RGBA", (5, 4), (200, 100, 50, 128))))
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (100, 50, 25)


def test_la_is_composited_on_black(tmp_path):
    rgb = load_rgb(_save(tmp_path / "la.png", Image.new("LA", (3, 3), (200, 0))))
    assert rgb.shape == (3, 3, 3) and (rgb == 0).all()


def test_16bit_is_scaled_by_bit_depth(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path / "deep.png", values)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    rgb = load_rgb(path)
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_32bit_integer_mode_with_16bit_values(tmp_path):
    rgb = load_rgb(_save(tmp_path / "i.tif", Image.new("I", (2, 2), 65535)))
    assert (rgb == 255).all()


def test_palette_loads_as_rgb(tmp_path):
    image = Image.new("P", (4, 3))
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((1, 0), 1)
    rgb = load_rgb(_save(tmp_path / "p.png", image))
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == (10, 20, 30) and tuple(rgb[0, 0]) == (0, 0, 0)


def test_cmyk_and_float_load_as_rgb(tmp_path):
    cmyk = load_rgb(_save(tmp_path / "c.jpg", Image.new("CMYK", (8, 8), (0, 0, 0, 0))))
    assert cmyk.shape == (8, 8, 3) and cmyk.min() > 240
    floats = load_rgb(_save(tmp_path / "f.tif", Image.new("F", (2, 2), 0.5)))
    assert floats.shape == (2, 2, 3) and (floats == 128).all()


def test_truncated_png_raises_naming_file(tmp_path):
    whole = _save(tmp_path / "whole.png", _rgb(size=64)).read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageReadError, match="broken.png"):
        load_rgb(broken)


def test_text_file_named_png_raises_naming_file(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        load_rgb(fake)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageReadError, match="nothere.png"):
        load_rgb(tmp_path / "nothere.png")
    assert issubclass(ImageReadError, EdgeadError)


def test_huge_image_is_refused(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.png", _rgb(size=20))
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageReadError, match="big.png.*over the limit"):
        load_rgb(path)


def test_pil_decompression_bomb_is_an_image_read_error(tmp_path, monkeypatch):
    path = _save(tmp_path / "bomb.png", _rgb(size=20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(ImageReadError, match="bomb.png"):
        load_rgb(path)


def test_masks_any_nonzero_is_defect(tmp_path):
    deep = np.zeros((4, 4), np.uint16)
    deep[1, 2] = 1
    assert load_mask(_save(tmp_path / "m16.png", deep)).sum() == 1
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0, 2] = 255
    colour[3, 3] = 7
    mask = load_mask(_save(tmp_path / "mrgb.png", colour))
    assert mask.dtype == bool and mask.shape == (4, 4) and mask.sum() == 2


def test_resize_image_and_mask(tmp_path):
    image = resize_image(_rgb(size=40), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    mask = resize_mask(_mask(40) > 0, 16)
    assert mask.shape == (16, 16) and mask.dtype == bool and 0 < mask.sum() < 256


def test_list_images_filters_and_sorts(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", ".hidden.png", "notes.txt", "data.csv"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]


# --- dataset layouts ------------------------------------------------------------------------


def _make_mvtec(root: Path, masks: bool = True, n_train: int = 6) -> Path:
    for i in range(n_train):
        _save(root / "train" / "good" / f"{i:03d}.png", _rgb(i))
    for i in range(2):
        _save(root / "test" / "good" / f"{i:03d}.png", _rgb(100 + i))
    for defect in ("crack", "hole"):
        for i in range(2):
            _save(root / "test" / defect / f"{i:03d}.png", _rgb(200 + i))
            if masks:
                _save(root / "ground_truth" / defect / f"{i:03d}_mask.png", _mask())
    return root


def test_mvtec_with_masks(tmp_path):
    data = load_mvtec(_make_mvtec(tmp_path / "part"))
    assert data.name == "part" and data.layout == "mvtec"
    assert len(data.train) == 6 and all(s.label == 0 for s in data.train)
    assert len(data.test) == 6 and sum(s.label for s in data.test) == 4
    assert data.defect_types == ["crack", "hole"]
    assert data.has_masks
    assert all(s.mask_path is None for s in data.test if s.label == 0)


def test_mvtec_without_or_with_partial_masks(tmp_path):
    data = load_mvtec(_make_mvtec(tmp_path / "nomask", masks=False))
    assert not data.has_masks and all(s.mask_path is None for s in data.test)

    root = _make_mvtec(tmp_path / "partial")
    (root / "ground_truth" / "hole" / "001_mask.png").unlink()
    data = load_mvtec(root)
    missing = [s for s in data.test if s.mask_path is None and s.label == 1]
    assert [(s.defect_type, s.path.name) for s in missing] == [("hole", "001.png")]
    assert not data.has_masks


def test_mvtec_without_test_folder_is_fit_only(tmp_path):
    root = tmp_path / "fitonly"
    _save(root / "train" / "good" / "a.png", _rgb())
    data = open_dataset(root)
    assert len(data.train) == 1 and data.test == [] and not data.has_masks


def _make_folder(root: Path, n_good: int = 10) -> Path:
    for i in range(n_good):
        _save(root / "good" / f"g{i:02d}.png", _rgb(i))
    for i in range(3):
        _save(root / "dent" / f"d{i}.png", _rgb(50 + i))
    _save(root / "masks" / "dent" / "d0_mask.png", _mask())
    _save(root / "masks" / "dent" / "d1.png", _mask())
    return root


def test_folder_layout_split_is_seeded(tmp_path):
    root = _make_folder(tmp_path / "line")
    data = open_dataset(root)
    assert data.layout == "folder" and data.defect_types == ["dent"]
    assert len(data.train) == 8 and len(data.test) == 2 + 3
    assert {s.path for s in data.train}.isdisjoint(s.path for s in data.test)
    dents = {s.path.name: s.mask_path for s in data.test if s.label == 1}
    assert dents["d0.png"].name == "d0_mask.png" and dents["d1.png"].name == "d1.png"
    assert dents["d2.png"] is None
    assert not data.has_masks

    again = load_folder(root, test_fraction=0.2, seed=0)
    assert again.train == data.train and again.test == data.test
    other_seeds = [load_folder(root, seed=seed).train for seed in range(1, 6)]
    assert any(train != data.train for train in other_seeds)


def test_folder_layout_without_defects(tmp_path):
    root = tmp_path / "goodonly"
    for i in range(5):
        _save(root / "good" / f"{i}.png", _rgb(i))
    data = load_folder(root, test_fraction=0.4)
    assert len(data.train) == 3 and len(data.test) == 2
    assert all(s.label == 0 for s in data.test) and data.defect_types == []


def test_open_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="is not a dataset.*train/good"):
        open_dataset(empty)
    other = tmp_path / "other"
    _save(other / "images" / "a.png", _rgb())
    with pytest.raises(DatasetError, match="is not a dataset"):
        open_dataset(other)
    bare = tmp_path / "bare"
    (bare / "train" / "good").mkdir(parents=True)
    (bare / "train" / "good" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"train/good has no images"):
        open_dataset(bare)
    with pytest.raises(DatasetError, match="does not exist"):
        load_mvtec(tmp_path / "missing")


def test_find_categories(tmp_path):
    _make_mvtec(tmp_path / "all" / "b_cat", n_train=1)
    _make_mvtec(tmp_path / "all" / "a_cat", n_train=1)
    (tmp_path / "all" / "junk").mkdir()
    found = find_categories(tmp_path / "all")
    assert [p.name for p in found] == ["a_cat", "b_cat"]
    assert find_categories(found[0]) == [found[0]]
    with pytest.raises(DatasetError, match="folder of datasets"):
        open_dataset(tmp_path / "all")


def test_split_validation(tmp_path):
    train = [Sample(tmp_path / f"{i}.png", 0, "good") for i in range(20)]
    rest, val = split_validation(train, fraction=0.1, seed=3)
    assert len(val) == 2 and len(rest) == 18
    assert set(rest).isdisjoint(val) and set(rest) | set(val) == set(train)
    assert split_validation(train, fraction=0.1, seed=3) == (rest, val)
    assert split_validation(train[:3], fraction=0.01)[1].__len__() == 1
    with pytest.raises(DatasetError, match="need at least 2"):
        split_validation(train[:1])
    with pytest.raises(DatasetError):
        split_validation(train[:4], min_count=4)


# --- torch dataset --------------------------------------------------------------------------


def test_image_dataset_items(tmp_path):
    data = load_mvtec(_make_mvtec(tmp_path / "part"))
    dataset = ImageDataset(data.test, image_size=16)
    assert len(dataset) == len(data.test)
    for item in dataset:
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["mask"].shape == (1, 16, 16) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert (item["mask"].sum() > 0) == (item["label"] == 1)
        assert item["has_mask"] and Path(item["path"]).exists()

    batch = next(iter(make_loader(data.test, 16, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["path"]) == 4


def test_image_dataset_without_mask_and_bad_image(tmp_path):
    image = _save(tmp_path / "x.png", _rgb())
    item = ImageDataset([Sample(image, 1, "dent", None)], 8)[0]
    assert item["mask"].sum() == 0 and not item["has_mask"]
    bad = tmp_path / "bad.png"
    bad.write_text("oops")
    with pytest.raises(ImageReadError, match="bad.png"):
        ImageDataset([Sample(bad, 0, "good")], 8)[0]


# --- the real evaluation datasets, when present --------------------------------------------


def _shared(relative: str) -> Path:
    path = SHARED_DATASETS / relative
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.mark.datasets
def test_real_mvtec_bottle():
    data = open_dataset(_shared("mvtec_ad/bottle"))
    assert len(data.train) == 209 and len(data.test) == 83 and data.has_masks
    item = ImageDataset([s for s in data.test if s.label == 1][:1], 64)[0]
    assert item["label"] == 1 and item["mask"].sum() > 0


@pytest.mark.datasets
def test_real_mvtec_transistor_has_no_masks():
    data = open_dataset(_shared("mvtec_ad/transistor"))
    assert not data.has_masks and len(data.defect_types) == 4


@pytest.mark.datasets
def test_real_kolektorsdd():
    root = _shared("kolektorsdd")
    # The README names the category kolektorsdd/kolektorsdd; accept the dataset folder itself too.
    categories = find_categories(root)
    assert categories
    data = open_dataset(categories[0])
    assert len(data.train) > 0 and data.defect_types == ["defect"] and data.has_masks
