"""Structured channel pruning of a fitted run: fewer channels, the same static graph, then a refit.

Two places are pruned, both by removing whole channels (the graph keeps its structure and op types,
so it still exports and quantises as before):

- **TinyGLASS discriminator**: the hidden channels of its first 1x1 convolution. A channel's
  importance is the L1 norm of its filter times the |gamma| of the BatchNorm after it (a channel
  that BN scales down, or whose filter is small, contributes little). The pruned head is rebuilt from
  the ``hidden`` hyperparameter.
- **EfficientNet-Lite backbone**: the expanded channels inside the MBConv blocks of the last stage
  the backbone runs (by default; ``stages`` chooses others): expand 1x1 conv -> BN -> depthwise conv
  -> BN -> project 1x1 conv. Channels are ranked by |gamma| of the expansion BN (network slimming,
  Liu et al. 2017); the expand conv's filters, both BNs and the depthwise filters lose the dropped
  channels, and the project conv loses the matching input columns. Block inputs and outputs keep
  their channels, so residual connections, the other stages and the feature map's channels are
  unchanged. Other backbones are refused with a clear error.

Kept channel counts are rounded to a multiple of 8 (integer accelerators work on channel groups).

Pruning the backbone changes the features, so the head is always refitted on the run's own training
images (``config.extra["dataset"]``) through :func:`edgead.training.fit_run`: PatchCore's memory bank
and PaDiM's Gaussians are rebuilt from scratch; TinyGLASS is retrained starting from its pruned
weights (fine-tuning, with its feature statistics recomputed and its usual model selection on the
normal validation images). The threshold is recalibrated the same way as in ``edgead fit``.

The pruned widths go into the run config, so :func:`edgead.runs.load_run` rebuilds the pruned shapes
before it loads the weights: the head's ``hidden`` hyperparameter, and
``extra["pruned_channels"]["backbone"]`` (block index -> expanded channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from edgead.backbones import PRUNABLE_BACKBONES, build_architecture, count_parameters, create_backbone
from edgead.backbones.base import FeatureExtractor
from edgead.backbones.efficientnet_lite import MBConvBlock
from edgead.errors import DatasetError, EdgeadError, UsageError
from edgead.models import Pipeline, TinyGlass, create_head
from edgead.outputs import check_output_dir
from edgead.runs import CONFIG_FILE, RunConfig, load_run

CHANNEL_DIVISOR = 8

# MBConv tensors that carry the expanded channels, and the dimension that indexes them.
_EXPANDED_DIMS = {
    "_expand_conv.weight": 0,
    "_bn0.weight": 0,
    "_bn0.bias": 0,
    "_bn0.running_mean": 0,
    "_bn0.running_var": 0,
    "_depthwise_conv.weight": 0,
    "_bn1.weight": 0,
    "_bn1.bias": 0,
    "_bn1.running_mean": 0,
    "_bn1.running_var": 0,
    "_project_conv.weight": 1,
}
# The same for the TinyGLASS discriminator (Conv 1x1 -> BN -> LeakyReLU -> Conv 1x1 -> Sigmoid).
_HIDDEN_DIMS = {
    "discriminator.0.weight": 0,
    "discriminator.0.bias": 0,
    "discriminator.1.weight": 0,
    "discriminator.1.bias": 0,
    "discriminator.1.running_mean": 0,
    "discriminator.1.running_var": 0,
    "discriminator.3.weight": 1,
}

PRUNABLE_MODELS = ("patchcore", "padim", "tinyglass")  # the student and baselines train their own networks


def check_ratio(ratio: float) -> float:
    """The share of channels to remove, checked to lie strictly between 0 and 1."""
    if not 0 < ratio < 1:
        raise UsageError(f"pruning ratio must be between 0 and 1 (exclusive), got {ratio}: e.g. 0.25 or 0.5")
    return float(ratio)


def keep_count(channels: int, ratio: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Channels kept when removing ``ratio`` of ``channels``: rounded to a multiple of ``divisor``."""
    kept = int(channels * (1 - ratio) / divisor + 0.5) * divisor
    return min(channels, max(divisor, kept)) if channels >= divisor else channels


def _slice(state: dict[str, Tensor], dims: dict[str, int], prefix: str, keep: Tensor) -> None:
    for suffix, dim in dims.items():
        key = prefix + suffix
        state[key] = state[key].index_select(dim, keep).clone()


def _mbconv_blocks(extractor: FeatureExtractor) -> list[tuple[int, int, str, MBConvBlock]]:
    """(block index, stage index, name, block) of every MBConv block the extractor runs, in order."""
    names = {id(module): name for name, module in extractor.named_modules()}
    found = []
    for stage_index, stage in enumerate(extractor.stages):
        for module in stage.children():
            if isinstance(module, MBConvBlock):
                found.append((len(found), stage_index, names[id(module)], module))
    return found


def pruned_widths(extractor: FeatureExtractor) -> dict[int, int]:
    """Expanded widths that differ from the unpruned architecture: block index -> channels ({} if none)."""
    if extractor.name not in PRUNABLE_BACKBONES:
        return {}
    default = [block.hidden for block in build_architecture(extractor.name)._blocks]
    return {i: b.hidden for i, _, _, b in _mbconv_blocks(extractor) if b.hidden != default[i]}


def prune_backbone(
    extractor: FeatureExtractor, ratio: float, stages: Sequence[int] | None = None
) -> tuple[FeatureExtractor, dict[int, int], dict[str, list[int]]]:
    """Remove ``ratio`` of the expanded channels of the MBConv blocks in ``stages`` of an EfficientNet-Lite.

    ``stages`` defaults to the last stage the extractor runs. Returns the pruned extractor (weights
    copied), the expanded widths that differ from the architecture's (block index -> channels, what
    the run config records) and, per pruned block, [channels before, after].
    """
    ratio = check_ratio(ratio)
    if extractor.name not in PRUNABLE_BACKBONES:
        raise EdgeadError(
            f"backbone '{extractor.name}' cannot be channel-pruned: pruning supports "
            f"{', '.join(PRUNABLE_BACKBONES)} (prune only the head with backbone=False)"
        )
    stages = tuple(stages) if stages is not None else (max(extractor.layers),)
    if not stages or any(not 0 <= s < len(extractor.stages) for s in stages):
        raise EdgeadError(f"stages must be indices in 0..{len(extractor.stages) - 1}, got {stages}")
    state = {k: v.clone() for k, v in extractor.state_dict().items()}
    widths = pruned_widths(extractor)
    changed: dict[str, list[int]] = {}
    for index, stage, name, block in _mbconv_blocks(extractor):
        keep = keep_count(block.hidden, ratio)
        if stage in stages and block.has_expand and keep < block.hidden:
            ranking = block._bn0.weight.detach().abs().argsort(descending=True)
            _slice(state, _EXPANDED_DIMS, name + ".", ranking[:keep].sort().values)
            changed[str(index)] = [block.hidden, keep]
            widths[index] = keep
    pruned = create_backbone(
        extractor.name,
        layers=extractor.layers,
        pretrained=False,
        local_aggregation=extractor.local_aggregation,
        aggregation_border=extractor.aggregation_border,
        expanded_channels=widths,
    )
    pruned.load_state_dict(state, strict=True)
    return pruned, widths, changed


def prune_tinyglass_head(
    head: TinyGlass, ratio: float, hyperparameters: dict[str, Any] | None = None
) -> TinyGlass:
    """A TinyGLASS head with ``ratio`` of its discriminator's hidden channels removed (weights copied).

    Importance of hidden channel j: L1 norm of the first 1x1 conv's filter j times |BN gamma_j|.
    ``hyperparameters`` overrides training settings of the new head (e.g. ``epochs``).
    """
    ratio = check_ratio(ratio)
    head.check_fitted()
    conv, bn = head.discriminator[0], head.discriminator[1]
    importance = conv.weight.detach().abs().flatten(1).sum(dim=1) * bn.weight.detach().abs()
    keep = keep_count(head.hidden, ratio)
    kept = importance.argsort(descending=True)[:keep].sort().values
    state = {k: v.clone() for k, v in head.state_dict().items()}
    _slice(state, _HIDDEN_DIMS, "", kept)
    params = {**head.hyperparameters(), **(hyperparameters or {}), "hidden": keep}
    pruned = create_head(head.name, **params)
    pruned.set_fitted(feature_mean_=head.feature_mean_, feature_std_=head.feature_std_)
    pruned.load_state_dict(state, strict=True)
    return pruned


def prune_pipeline(
    pipeline: Pipeline,
    ratio: float,
    backbone: bool = True,
    head: bool = True,
    stages: Sequence[int] | None = None,
    hyperparameters: dict[str, Any] | None = None,
) -> tuple[Pipeline, dict[str, Any]]:
    """Prune a fitted pipeline's backbone and/or TinyGLASS head; no refit (see :func:`prune_run`).

    Memory-bank heads (PatchCore, PaDiM) come back unfitted: their features changed. A TinyGLASS head
    keeps its (pruned) weights as the starting point of its retraining. ``hyperparameters`` override
    the head's settings (e.g. ``{"epochs": 10}``). Returns the new pipeline and a summary with the
    config entries (``pruned_channels``) that rebuild its shapes.
    """
    ratio = check_ratio(ratio)
    if pipeline.head.name not in PRUNABLE_MODELS:
        raise EdgeadError(
            f"pruning supports {', '.join(PRUNABLE_MODELS)} runs, not '{pipeline.head.name}' (its own networks "
            "are trained from scratch: make them smaller with their width setting instead, e.g. -p width=16)"
        )
    overrides = dict(hyperparameters or {})
    if "hidden" in overrides or "in_channels" in overrides:
        raise EdgeadError("'hidden' and 'in_channels' are set by pruning, not by hyperparameters")
    trainable = isinstance(pipeline.head, TinyGlass)
    if not backbone and not (head and trainable):
        raise EdgeadError(
            "nothing to prune: the head can only be pruned for tinyglass, so prune the backbone "
            f"(model '{pipeline.head.name}')"
        )
    pipeline.head.check_fitted()
    summary: dict[str, Any] = {"ratio": ratio, "params_before": count_parameters(pipeline)}
    extractor, widths = pipeline.backbone, pruned_widths(pipeline.backbone)  # shared: frozen, never trained
    if backbone:
        extractor, widths, changed = prune_backbone(pipeline.backbone, ratio, stages)
        summary["backbone_stages"] = list(stages) if stages is not None else [max(extractor.layers)]
        summary["backbone_blocks"] = changed
    if trainable:
        if head:
            new_head = prune_tinyglass_head(pipeline.head, ratio, overrides)
            summary["head_hidden"] = [pipeline.head.hidden, new_head.hidden]
        else:
            new_head = create_head(pipeline.head.name, **{**pipeline.head.hyperparameters(), **overrides})
            new_head.set_fitted(
                feature_mean_=pipeline.head.feature_mean_, feature_std_=pipeline.head.feature_std_
            )
            new_head.load_state_dict(pipeline.head.state_dict(), strict=True)
    else:
        new_head = create_head(pipeline.head.name, **{**pipeline.head.hyperparameters(), **overrides})
    pruned = Pipeline(
        extractor, new_head, image_size=pipeline.image_size, blur_sigma=pipeline.postprocess.sigma
    )
    pruned.eval()
    summary["params_after"] = count_parameters(pruned)
    summary["pruned_channels"] = (
        {"backbone": {str(k): v for k, v in sorted(widths.items())}} if widths else {}
    )
    return pruned, summary


def prune_run(
    run_dir: str | Path,
    out_dir: str | Path,
    ratio: float,
    progress: bool = True,
    dataset: str | Path | None = None,
    backbone: bool = True,
    head: bool = True,
    stages: Sequence[int] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    force: bool = False,
) -> tuple[Pipeline, RunConfig]:
    """Prune the run in ``run_dir`` by ``ratio`` (share of channels removed), refit it, save it to ``out_dir``.

    The head is refitted on the run's training images (``dataset`` overrides the folder recorded in
    its config), with the run's validation split, seed and threshold quantile. The new run's config
    records the pruned widths (``extra["pruned_channels"]``) and a summary (``extra["pruning"]``).

    Raises:
        EdgeadError: ratio not in (0, 1), missing or invalid run folder, out_dir equal to run_dir,
            a backbone that cannot be pruned, or a training dataset that cannot be found.
    """
    from edgead.training import fit_run

    ratio = check_ratio(ratio)
    run_dir = Path(run_dir)
    if Path(out_dir).resolve() == run_dir.resolve():
        raise UsageError(f"the output folder must be a new folder, not the run being pruned ({run_dir})")
    out_dir = check_output_dir(out_dir, CONFIG_FILE, force=force, kind="run")
    pipeline, config = load_run(run_dir)
    dataset = dataset or config.extra.get("dataset")
    if dataset is None:
        raise DatasetError(
            f"{run_dir} does not record its training dataset: pass the folder with --dataset PATH"
        )
    if not Path(dataset).exists():
        raise DatasetError(
            f"the training dataset of {run_dir} ({dataset}) does not exist here: pass its folder with "
            "--dataset PATH"
        )
    pruned, summary = prune_pipeline(
        pipeline, ratio, backbone=backbone, head=head, stages=stages, hyperparameters=hyperparameters
    )
    summary["source_run"] = str(run_dir.resolve())
    extra = {"pruned_channels": summary.pop("pruned_channels"), "pruning": summary}
    return fit_run(
        dataset,
        out_dir,
        pipeline=pruned,
        validation_fraction=config.extra.get("validation_fraction", 0.1),
        threshold_quantile=config.threshold_quantile,
        seed=config.extra.get("seed", 0),
        pretrained=config.extra.get("pretrained", True),
        weights_path=config.extra.get("weights_path"),
        progress=progress,
        extra=extra,
        force=force,
    )
