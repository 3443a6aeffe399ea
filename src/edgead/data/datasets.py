"""Datasets of defect-free training images and labelled test images, in two folder layouts.

MVTec layout (the research standard, and what ``../shared/datasets`` uses)::

    root/train/good/*                          defect-free training images
    root/test/good/*                           defect-free test images
    root/test/<defect_type>/*                  defective test images
    root/ground_truth/<defect_type>/<stem>_mask.png   optional pixel masks (nonzero = defect)

Plain folder layout (what a user collects on a production line)::

    root/good/*                                defect-free images; a seeded fraction is held out for testing
    root/<defect_type>/*                       defective images (any subfolder except ``good`` and ``masks``)
    root/masks/<defect_type>/<stem>_mask.png   optional pixel masks (``<stem>.png`` also accepted)

A dataset is only a list of :class:`Sample` records; pixels are read lazily by :class:`ImageDataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from edgead.data.images import list_images, load_mask, load_rgb, resize_image, resize_mask
from edgead.errors import DatasetError

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with its label and (for defects) where its pixel mask is, if anywhere."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal
    mask_path: Path | None = None


@dataclass
class AnomalyDataset:
    """Training images (normal only) and test images (normal and defective) of one product."""

    name: str
    root: Path
    layout: str  # "mvtec" | "folder"
    train: list[Sample]
    test: list[Sample]

    @property
    def has_masks(self) -> bool:
        """True if there are defective test images and every one has a pixel mask (pixel metrics possible)."""
        anomalous = [s for s in self.test if s.label == 1]
        return bool(anomalous) and all(s.mask_path is not None for s in anomalous)

    @property
    def defect_types(self) -> list[str]:
        """The defect types present in the test set, sorted."""
        return sorted({s.defect_type for s in self.test if s.label == 1})

    def __str__(self) -> str:
        n_good = sum(s.label == 0 for s in self.test)
        masks = "yes" if self.has_masks else "no"
        return (
            f"{self.name} ({self.layout} layout): {len(self.train)} train, {len(self.test)} test "
            f"({n_good} good, {len(self.test) - n_good} defective), masks: {masks}"
        )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_mask(mask_dir: Path, stem: str) -> Path | None:
    """The mask for an image stem: ``<stem>_mask.png`` (MVTec naming) or ``<stem>.png``."""
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        candidate = mask_dir / name
        if candidate.is_file():
            return candidate
    return None


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; check the path")
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} is a file, not a folder; pass the dataset folder")


def _good_images(folder: Path) -> list[Path]:
    images = list_images(folder)
    if not images:
        raise DatasetError(
            f"{folder} has no images; put defect-free images there (png, jpg, jpeg, bmp, tif, tiff, webp)"
        )
    return images


def _defect_samples(image_dir: Path, defect_type: str, mask_dir: Path) -> list[Sample]:
    return [
        Sample(path, 1, defect_type, _find_mask(mask_dir, path.stem) if mask_dir.is_dir() else None)
        for path in list_images(image_dir)
    ]


def load_mvtec(root: str | Path) -> AnomalyDataset:
    """Load one MVTec-layout category; a missing test folder gives an empty test list (enough to fit)."""
    root = Path(root)
    _check_root(root)
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise DatasetError(
            f"{root} is not an MVTec-layout dataset: expected defect-free images in {train_dir}, "
            f"test images in {root}/test/<defect_type>/ "
            f"and optional masks in {root}/ground_truth/<defect_type>/"
        )
    train = [Sample(path, 0, GOOD) for path in _good_images(train_dir)]

    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for type_dir in _subfolders(test_dir):
            if type_dir.name == GOOD:
                test += [Sample(path, 0, GOOD) for path in list_images(type_dir)]
            else:
                test += _defect_samples(type_dir, type_dir.name, root / "ground_truth" / type_dir.name)
    return AnomalyDataset(root.name, root, "mvtec", train, test)


def load_folder(root: str | Path, test_fraction: float = 0.2, seed: int = 0) -> AnomalyDataset:
    """Load a plain-folder dataset; a seeded ``test_fraction`` of the good images become normal tests."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    root = Path(root)
    _check_root(root)
    good_dir = root / GOOD
    if not good_dir.is_dir():
        raise DatasetError(
            f"{root} is not a plain-folder dataset: expected defect-free images in {good_dir} "
            f"and defective images in {root}/<defect_type>/"
        )
    good = _good_images(good_dir)

    # Never hold out the last training image; otherwise round to the nearest count.
    n_test = min(round(test_fraction * len(good)), len(good) - 1)
    order = np.random.default_rng(seed).permutation(len(good))
    held_out = set(order[:n_test].tolist())
    train = [Sample(path, 0, GOOD) for i, path in enumerate(good) if i not in held_out]
    test = [Sample(path, 0, GOOD) for i, path in enumerate(good) if i in held_out]

    for type_dir in _subfolders(root):
        if type_dir.name in (GOOD, "masks"):
            continue
        test += _defect_samples(type_dir, type_dir.name, root / "masks" / type_dir.name)
    return AnomalyDataset(root.name, root, "folder", train, test)


def _layout(path: Path) -> str | None:
    if (path / "train" / GOOD).is_dir():
        return "mvtec"
    if (path / GOOD).is_dir():
        return "folder"
    return None


def open_dataset(path: str | Path, **kw) -> AnomalyDataset:
    """Load a dataset in either layout, detected from its folders; ``kw`` goes to :func:`load_folder`."""
    path = Path(path)
    _check_root(path)
    layout = _layout(path)
    if layout == "mvtec":
        return load_mvtec(path)
    if layout == "folder":
        return load_folder(path, **kw)
    categories = find_categories(path)
    if categories:
        names = ", ".join(c.name for c in categories[:5]) + (", ..." if len(categories) > 5 else "")
        raise DatasetError(
            f"{path} is a folder of datasets ({names}), not a dataset; pass one of them, e.g. {categories[0]}"
        )
    raise DatasetError(
        f"{path} is not a dataset: expected {path}/train/good (MVTec layout) "
        f"or {path}/good (plain folder layout)"
    )


def find_categories(root: str | Path) -> list[Path]:
    """The dataset folders in ``root`` (e.g. MVTec AD's categories), sorted; ``[root]`` if root is one."""
    root = Path(root)
    _check_root(root)
    if _layout(root) is not None:
        return [root]
    return [sub for sub in _subfolders(root) if _layout(sub) is not None]


def load_normal_images(path: str | Path) -> list[Sample]:
    """Every image of a folder of defect-free images: its train/good (MVTec layout), its good/ or itself."""
    path = Path(path)
    _check_root(path)
    layout = _layout(path)
    folder = path / "train" / GOOD if layout == "mvtec" else path / GOOD if layout == "folder" else path
    return [Sample(image, 0, GOOD) for image in _good_images(folder)]


def split_validation(
    train: list[Sample], fraction: float = 0.1, seed: int = 0, min_count: int = 1
) -> tuple[list[Sample], list[Sample]]:
    """Hold out a seeded fraction of the training images for thresholds; returns (train, validation).

    Thresholds must come from normal images the model did not fit on, never from the test set. Every
    training image counts as normal here, as it does for the user: in a contaminated training set
    (see data/contamination.py) the hidden anomalies can land in validation too, as they would in life.
    """
    normal = list(range(len(train)))
    n_val = max(min_count, round(fraction * len(normal)))
    if len(normal) - n_val < 1:
        folder = train[0].path.parent if train else "the training folder"
        raise DatasetError(
            f"only {len(normal)} normal training image(s) in {folder}: need at least {n_val + 1} to hold out "
            f"{n_val} for validation; add more defect-free images"
        )
    order = np.random.default_rng(seed).permutation(len(normal))
    held_out = {normal[i] for i in order[:n_val].tolist()}
    rest = [s for i, s in enumerate(train) if i not in held_out]
    validation = [s for i, s in enumerate(train) if i in held_out]
    return rest, validation


class ImageDataset(Dataset):
    """Samples as model inputs: a 3xSxS image in 0..1 and a 1xSxS binary mask, both at ``image_size``.

    ``has_mask`` says whether ``mask`` is ground truth: true for normal images (their mask is known to be
    empty) and for defects with a mask file; false for defects without one (zeros stand in).
    """

    def __init__(self, samples: list[Sample], image_size: int):
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        size = self.image_size
        rgb = load_rgb(sample.path)
        image = torch.from_numpy(resize_image(rgb, size)).permute(2, 0, 1).float().div_(255.0)

        mask = torch.zeros(1, size, size)
        if sample.mask_path is not None:
            pixels = load_mask(sample.mask_path)
            if pixels.shape != rgb.shape[:2]:
                raise DatasetError(
                    f"mask {sample.mask_path} is {pixels.shape[1]}x{pixels.shape[0]} but its image "
                    f"{sample.path} is {rgb.shape[1]}x{rgb.shape[0]}; masks must match their image size"
                )
            mask[0] = torch.from_numpy(resize_mask(pixels, size)).float()

        return {
            "image": image,
            "mask": mask,
            "label": sample.label,
            "path": str(sample.path),
            "has_mask": sample.label == 0 or sample.mask_path is not None,
        }


def make_loader(
    samples: list[Sample],
    image_size: int,
    batch_size: int = 16,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over :class:`ImageDataset`; shuffling (if asked) is seeded so runs repeat."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        ImageDataset(samples, image_size),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
    )
