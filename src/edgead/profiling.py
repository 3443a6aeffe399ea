"""Model size and compute, measured on the model itself rather than quoted from papers.

Edge targets have budgets in parameters, bytes and multiply-accumulates (MACs), so every pipeline
is measured the same way:

- **MACs** come from torch's own op counter (``torch.utils.flop_counter.FlopCounterMode``, MACs =
  FLOPs / 2). It sees every convolution (grouped and depthwise included, and the ``F.conv2d`` calls
  of the Gaussian blur) and every matrix product (``nn.Linear``, ``@``, ``bmm``) that torch runs.
  Elementwise ops, BatchNorm (it folds into the preceding convolution at deployment), pooling and
  interpolation count 0. PatchCore's kNN is counted as the exported graph runs it (the exact search
  as a matrix product; the HNSW index that torch runs does fewer). Work a head does outside torch is
  invisible to the counter: a head can report it with an optional ``external_macs(features_shape)``.
- **Parameters** are the learned weights (backbone and any trained head). What a head learns
  without gradients (a memory bank, Gaussians) is data and is reported apart, with its bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgead.backbones.base import count_parameters
from edgead.models import Pipeline
from edgead.models.patchcore import exact_search

MACS_DEFINITION = (
    "MACs of one image (batch 1), counted by torch's FlopCounterMode (FLOPs / 2): convolutions and "
    "matrix products; elementwise ops, BatchNorm (folds into conv), pooling and interpolation count 0"
)


@torch.no_grad()
def macs_of(fn: Callable[..., Any], *args: Any) -> int:
    """MACs of one call ``fn(*args)``, as counted by torch (see the module docstring)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one forward pass of ``module`` (in eval mode) on a zero input of ``input_shape``."""
    was_training = module.training
    module.eval()
    try:
        return macs_of(module, torch.zeros(input_shape))
    finally:
        module.train(was_training)


def _head_macs(head: nn.Module, features: torch.Tensor) -> int:
    """Patch scores plus the head's own image score, plus what it reports doing outside torch."""

    def run(x: torch.Tensor) -> None:
        head.image_scores(x, head(x))

    with exact_search(head):  # PatchCore's kNN as the exported graph runs it: a matrix product + min
        macs = macs_of(run, features)
    external = getattr(head, "external_macs", None)
    return macs + (int(external(tuple(features.shape))) if external is not None else 0)


def model_profile(pipeline: Pipeline, image_size: int | None = None) -> dict[str, Any]:
    """Parameters, bytes and MACs per image of a pipeline, with backbone, head and postprocess apart.

    The head's MACs need a fitted head (``head_macs`` and ``macs`` are None otherwise).
    ``head_data`` lists the head's fitted tensors (memory bank, Gaussians) with their shapes: they
    are data learned from the normal images, so they count in bytes, not in parameters.
    """
    size = image_size or pipeline.image_size
    was_training = pipeline.training
    pipeline.eval()
    try:
        image = torch.zeros(1, 3, size, size)
        backbone_macs = macs_of(pipeline.features, image)
        with torch.no_grad():
            features = pipeline.features(image)
        patch_shape = (1, 1, *features.shape[-2:])
        postprocess_macs = macs_of(pipeline.postprocess, torch.zeros(patch_shape))
        head = pipeline.head
        head_macs = _head_macs(head, features) if head.is_fitted else None
    finally:
        pipeline.train(was_training)

    backbone_params = count_parameters(pipeline.backbone)
    head_params = count_parameters(head)
    data = {name: getattr(head, name) for name in head.fitted_buffers if getattr(head, name) is not None}
    return {
        "image_size": size,
        "feature_shape": list(features.shape[1:]),
        "backbone_params": backbone_params,
        "head_params": head_params,
        "params": backbone_params + head_params,
        "weights_bytes": 4 * (backbone_params + head_params),  # float32
        "head_data": {name: list(t.shape) for name, t in data.items()},
        "head_data_values": sum(t.numel() for t in data.values()),
        "head_data_bytes": sum(t.numel() * t.element_size() for t in data.values()),
        "backbone_macs": backbone_macs,
        "head_macs": head_macs,
        "postprocess_macs": postprocess_macs,
        "macs": None if head_macs is None else backbone_macs + head_macs + postprocess_macs,
    }
