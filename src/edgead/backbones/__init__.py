"""Frozen ImageNet backbones, created by name (timm style).

    >>> from edgead.backbones import create_backbone
    >>> backbone = create_backbone("efficientnet_lite0")      # stride-8 + stride-16 stages, 152 channels
    >>> features = backbone((images - mean) / std)           # one [N, 152, H/8, W/8] tensor

Names are strings shared by the CLI, configs and tests; ``layers`` are stage indices (see
:class:`~edgead.backbones.base.FeatureExtractor`): every architecture has five stages with output
strides [2 or 4, 4, 8, 16, 32] (SqueezeNet 1.1: four, [2, 4, 8, 16]), and the default is the stride-8 and
stride-16 pair.
"""

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

from torch import nn

from edgead.backbones.base import (
    AGGREGATION_BORDERS,
    DEFAULT_AGGREGATION_BORDER,
    BackboneError,
    FeatureExtractor,
    check_layers,
    count_parameters,
)
from edgead.backbones.efficientnet_lite import efficientnet_lite
from edgead.backbones.mobilenet_v2 import mobilenet_v2
from edgead.backbones.resnet import resnet18, wide_resnet50_2
from edgead.backbones.squeezenet import squeezenet1_1
from edgead.backbones.weights import WEIGHTS, WeightsSpec, load_pretrained_state_dict

DEFAULT_BACKBONE = "efficientnet_lite0"

# name -> builder of the random-init architecture
_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "efficientnet_lite0": partial(efficientnet_lite, "efficientnet_lite0"),
    "efficientnet_lite1": partial(efficientnet_lite, "efficientnet_lite1"),
    "efficientnet_lite2": partial(efficientnet_lite, "efficientnet_lite2"),
    "mobilenet_v2": mobilenet_v2,
    "resnet18": resnet18,
    "wide_resnet50_2": wide_resnet50_2,
    "squeezenet1_1": squeezenet1_1,
}

BACKBONES: tuple[str, ...] = tuple(_ARCHITECTURES)

# Backbones that can be built with fewer expanded channels in their MBConv blocks (channel pruning,
# see edgead.deploy.prune): their builders accept ``expanded_channels``.
PRUNABLE_BACKBONES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

# Stage indices used when ``layers`` is not given: the stride-8 and stride-16 stages everywhere.
DEFAULT_LAYERS: dict[str, tuple[int, ...]] = {name: (2, 3) for name in BACKBONES}


def list_backbones() -> list[str]:
    """Registered backbone names, the default first."""
    return list(BACKBONES)


def build_architecture(name: str, expanded_channels: Mapping[int | str, int] | None = None) -> nn.Module:
    """The full (uncut) architecture for ``name``, randomly initialised.

    ``expanded_channels`` (block index -> channels) builds a channel-pruned EfficientNet-Lite.
    """
    if name not in _ARCHITECTURES:
        raise BackboneError(f"Unknown backbone {name!r}. Valid names: {', '.join(BACKBONES)}.")
    if expanded_channels:
        if name not in PRUNABLE_BACKBONES:
            raise BackboneError(
                f"backbone {name!r} cannot be channel-pruned; prunable backbones: {', '.join(PRUNABLE_BACKBONES)}."
            )
        arch = _ARCHITECTURES[name](expanded_channels=expanded_channels)
    else:
        arch = _ARCHITECTURES[name]()
    arch.name = name
    return arch


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    layers: Sequence[int] | None = None,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    local_aggregation: int = 3,
    expanded_channels: Mapping[int | str, int] | None = None,
    aggregation_border: str = DEFAULT_AGGREGATION_BORDER,
) -> FeatureExtractor:
    """Build a frozen feature extractor.

    Args:
        name: one of :data:`BACKBONES`.
        layers: stage indices to concatenate; None = :data:`DEFAULT_LAYERS` (stride 8 and 16).
        pretrained: load ImageNet weights (from the weights package, or ``weights_path``).
            False keeps a random init, which is only useful for tests and baselines.
        weights_path: a local weights file; overrides the packaged one and is loaded even with
            ``pretrained=False``. Checked before use (see :mod:`edgead.backbones.weights`).
        local_aggregation: kernel of the stride-1 average pool over each chosen stage (1 = off).
        aggregation_border: ``"zeros"`` or ``"valid"``, see :class:`FeatureExtractor`.
        expanded_channels: block index -> expanded channels of a channel-pruned EfficientNet-Lite
            (:mod:`edgead.deploy.prune`); its weights come from a run folder, never from ImageNet files.

    Raises:
        BackboneError: unknown name or invalid ``layers`` (an EdgeadError and a ValueError).
        WeightsError: weights requested but unavailable, corrupt or for another architecture.
    """
    arch = build_architecture(name, expanded_channels)
    chosen = check_layers(layers if layers is not None else DEFAULT_LAYERS[name], len(arch.stage_strides))
    if expanded_channels and (pretrained or weights_path is not None):
        raise BackboneError(
            "a channel-pruned backbone has no ImageNet weights: build it with pretrained=False"
        )
    if pretrained or weights_path is not None:
        state = load_pretrained_state_dict(name, weights_path, arch=arch)
        arch.load_state_dict(state, strict=True)
    return FeatureExtractor(
        arch, chosen, local_aggregation=local_aggregation, name=name, aggregation_border=aggregation_border
    )


__all__ = [
    "AGGREGATION_BORDERS",
    "DEFAULT_AGGREGATION_BORDER",
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "DEFAULT_LAYERS",
    "PRUNABLE_BACKBONES",
    "WEIGHTS",
    "BackboneError",
    "FeatureExtractor",
    "WeightsSpec",
    "build_architecture",
    "count_parameters",
    "create_backbone",
    "list_backbones",
    "load_pretrained_state_dict",
]
