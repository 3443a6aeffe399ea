"""Datasets, image reading and the synthetic demo dataset."""

from edgead.data.datasets import (
    AnomalyDataset,
    ImageDataset,
    Sample,
    find_categories,
    load_folder,
    load_mvtec,
    make_loader,
    open_dataset,
    split_validation,
)
from edgead.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    list_images,
    load_mask,
    load_rgb,
    resize_image,
    resize_mask,
)
from edgead.data.synthetic import DEFECT_TYPES, make_synthetic_dataset, render_part

__all__ = [
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "AnomalyDataset",
    "ImageDataset",
    "Sample",
    "find_categories",
    "list_images",
    "load_folder",
    "load_mask",
    "load_mvtec",
    "load_rgb",
    "make_loader",
    "make_synthetic_dataset",
    "open_dataset",
    "render_part",
    "resize_image",
    "resize_mask",
    "split_validation",
]
