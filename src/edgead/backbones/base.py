"""The one wrapper every backbone goes through: a frozen CNN that returns ONE feature tensor.

An architecture module (``EfficientNetLite``, ``MobileNetV2``, ``ResNet``) only has to expose

- ``stages``: an ``nn.ModuleList`` whose members, run in order, reproduce the network;
- ``stage_strides`` / ``stage_channels``: output stride and channels after each stage;
- ``mean`` / ``std``: the input normalisation its weights were trained with (0..1 scale).

:class:`FeatureExtractor` keeps only the stages it needs, so parameter and MAC budgets count only
what runs, and turns the chosen stage outputs into a single 4D tensor (pooled, resized to the finest
chosen stride, concatenated). That single static tensor is what heads consume and what the
edge/server split cuts at, so there are no hooks, no dicts and no tuples on the way.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.errors import EdgeadError

# How the local-aggregation pool treats the border: pad with zeros, or average the inside pixels only.
AGGREGATION_BORDERS: tuple[str, ...] = ("zeros", "valid")
DEFAULT_AGGREGATION_BORDER = "zeros"


class BackboneError(EdgeadError, ValueError):
    """A backbone was asked for by an unknown name or with stages it does not have."""


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once), trainable or not."""
    return sum(p.numel() for p in module.parameters())


def init_conv_weights(module: nn.Module) -> None:
    """He-normal (fan-in) conv init, unit BatchNorm: random-init features keep a sane scale.

    PyTorch's default conv init shrinks activations layer after layer, which makes random-init
    backbones (used in tests and as a no-weights baseline) produce near-constant features.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FeatureExtractor(nn.Module):
    """A frozen backbone cut after the deepest chosen stage, returning one feature map.

    Args:
        arch: an architecture module exposing ``stages``, ``stage_strides``, ``stage_channels``,
            ``mean`` and ``std`` (see the module docstring). Its weights should already be loaded.
        layers: indices into ``arch.stages`` whose outputs are concatenated, e.g. ``(2, 3)`` for
            the stride-8 and stride-16 stages.
        local_aggregation: odd kernel size of the stride-1 average pool applied to every chosen
            output (PatchCore's "locally aware patch features"); 1 disables it.
        aggregation_border: how that pool treats the image border. ``"zeros"`` (the default, as in
            PatchCore's own code) pads with zeros and always divides by the full window, so border
            patches keep a smaller magnitude than interior ones; ``"valid"`` averages only the pixels
            inside the image (edgead's behaviour before 0.2; runs fitted that way keep it). Measured in
            docs/results/aggregation_border.md.
        name: the registry name, kept for reports and saved runs.

    ``forward(x)`` takes an already normalised ``[N, 3, H, W]`` batch and returns
    ``[N, out_channels, H / stride, W / stride]`` (exact when H and W are multiples of 32).
    """

    def __init__(
        self,
        arch: nn.Module,
        layers: tuple[int, ...],
        local_aggregation: int = 3,
        name: str | None = None,
        aggregation_border: str = DEFAULT_AGGREGATION_BORDER,
    ) -> None:
        super().__init__()
        strides: list[int] = list(arch.stage_strides)
        channels: list[int] = list(arch.stage_channels)
        layers = check_layers(layers, len(strides))
        if local_aggregation < 1 or local_aggregation % 2 == 0:
            raise BackboneError(
                f"local_aggregation must be a positive odd kernel size (1 disables it), "
                f"got {local_aggregation}."
            )
        if aggregation_border not in AGGREGATION_BORDERS:
            raise BackboneError(
                f"aggregation_border must be one of {', '.join(AGGREGATION_BORDERS)}, got {aggregation_border!r}."
            )

        # Keep only the stages that run: later ones are not referenced, so they are not part of this
        # module (its state_dict, parameter count and exported graph).
        self.stages = nn.ModuleList(list(arch.stages)[: max(layers) + 1])
        self.layers = layers
        self.stride = min(strides[i] for i in layers)
        self.out_channels = sum(channels[i] for i in layers)
        self.layer_strides = tuple(strides[i] for i in layers)
        self.layer_channels = tuple(channels[i] for i in layers)
        self.local_aggregation = local_aggregation
        self.aggregation_border = aggregation_border
        self.mean: tuple[float, float, float] = tuple(arch.mean)
        self.std: tuple[float, float, float] = tuple(arch.std)
        self.name = name or type(arch).__name__
        if local_aggregation > 1:
            self.pool: nn.Module = nn.AvgPool2d(
                local_aggregation,
                stride=1,
                padding=local_aggregation // 2,
                count_include_pad=aggregation_border == "zeros",
            )
        else:
            self.pool = nn.Identity()

        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stay in eval mode whatever is asked: BatchNorm statistics of a frozen backbone never move."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(self.stage_outputs(x))

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """The chosen stages' outputs, locally aggregated, at their own strides."""
        feats: list[Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.layers:
                feats.append(self.pool(x))
        return feats

    def merge(self, feats: list[Tensor]) -> Tensor:
        """Resize every chosen output to the finest chosen stride and concatenate them."""
        finest = feats[self.layer_strides.index(self.stride)]
        out: list[Tensor] = []
        for f, s in zip(feats, self.layer_strides, strict=True):
            if s != self.stride:
                # A constant integer scale keeps the exported Resize static.
                scale = float(s // self.stride)
                f = F.interpolate(f, scale_factor=scale, mode="bilinear", align_corners=False)
            if not torch.jit.is_tracing() and f.shape[-2:] != finest.shape[-2:]:
                # Only for input sides that are not multiples of the deepest stride (never in an export,
                # whose input size is a multiple of 32; the check would only add tracer warnings there).
                f = F.interpolate(f, size=finest.shape[-2:], mode="bilinear", align_corners=False)
            out.append(f)
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, layers={self.layers}, out_channels={self.out_channels}, "
            f"stride={self.stride}, local_aggregation={self.local_aggregation}, "
            f"aggregation_border={self.aggregation_border!r}"
        )


def check_layers(layers: Sequence[int], num_stages: int) -> tuple[int, ...]:
    """Sorted, de-duplicated stage indices, or a BackboneError that lists the valid ones."""
    chosen = tuple(sorted({int(i) for i in layers}))
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_stages:
        raise BackboneError(
            f"layers must be a non-empty set of stage indices in 0..{num_stages - 1}, got {tuple(layers)}."
        )
    return chosen
