"""Methods (heads) by name, and the factory that builds a full pipeline around one."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from edgead.errors import EdgeadError, UsageError
from edgead.models.autoencoder import ReconstructionError
from edgead.models.base import Head, Pipeline
from edgead.models.differnet import DifferNet
from edgead.models.glass import TinyGlass
from edgead.models.padim import Padim
from edgead.models.patchcore import PatchCore
from edgead.models.simclr import SimClr
from edgead.models.student import Student
from edgead.validation import describe

HEADS: dict[str, type[Head]] = {
    PatchCore.name: PatchCore,
    Padim.name: Padim,
    TinyGlass.name: TinyGlass,
    Student.name: Student,
    ReconstructionError.name: ReconstructionError,
    SimClr.name: SimClr,
    DifferNet.name: DifferNet,
}


def list_models() -> list[str]:
    return sorted(HEADS)


def create_head(name: str, **hyperparameters: Any) -> Head:
    if name not in HEADS:
        raise EdgeadError(f"unknown model '{name}': choose one of {', '.join(list_models())}")
    try:
        return HEADS[name](**hyperparameters)
    except ValidationError as exc:
        raise UsageError(f"bad hyperparameter for model '{name}': {describe(exc)}") from None


def create_pipeline(
    model: str = "patchcore",
    backbone: str = "efficientnet_lite0",
    image_size: int = 256,
    layers: tuple[int, ...] | None = None,
    pretrained: bool = True,
    weights_path: str | None = None,
    blur_sigma: float = 4.0,
    aggregation_border: str | None = None,
    **hyperparameters: Any,
) -> Pipeline:
    """Build an unfitted pipeline, e.g. ``create_pipeline("patchcore", "efficientnet_lite0")``.

    ``aggregation_border`` None takes the backbone's default (see :class:`FeatureExtractor`).
    """
    from edgead.backbones import DEFAULT_AGGREGATION_BORDER, create_backbone

    head = create_head(model, **hyperparameters)
    extractor = create_backbone(
        backbone,
        layers=layers if layers is not None else head.default_layers(backbone),
        pretrained=pretrained,
        weights_path=weights_path,
        aggregation_border=aggregation_border or DEFAULT_AGGREGATION_BORDER,
    )
    return Pipeline(extractor, head, image_size=image_size, blur_sigma=blur_sigma)


__all__ = [
    "HEADS",
    "DifferNet",
    "Head",
    "Padim",
    "PatchCore",
    "TinyGlass",
    "Student",
    "Pipeline",
    "create_head",
    "create_pipeline",
    "list_models",
]
