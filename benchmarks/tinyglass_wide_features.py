"""Diagnostic: does TinyGLASS on screw get better with wider features from the same Lite0 weights?

The capacity diagnostic (``tinyglass_capacity.py``) points at the 152 stage-output channels as too
little for a per-patch head. EfficientNet-Lite0 has wider features at the same strides for free: the
expanded (hidden) activations inside each MBConv block, 6x the block's output width. This script
feeds TinyGLASS, instead of the outputs of the stride-8 and stride-16 stages, the hidden activations of
their last blocks (after the depthwise conv and ReLU6: 240 + 672 = 912 channels, no extra backbone
parameters) and trains it as ``tinyglass_ablation.py`` does, reading the test set after every epoch
(diagnosis only, never a way to pick settings).

    cd benchmarks && ../.venv/bin/python tinyglass_wide_features.py ../../shared/datasets/mvtec_ad/screw \
        --cache-settings '{"augment": false}' '{"augment": false}'
"""

from __future__ import annotations

import tinyglass_ablation
from torch import Tensor

import edgead.backbones as backbones
from edgead.backbones.base import FeatureExtractor


class ExpandedFeatures(FeatureExtractor):
    """A FeatureExtractor that returns the hidden activations of each chosen stage's last MBConv block."""

    @classmethod
    def wrap(cls, extractor: FeatureExtractor) -> ExpandedFeatures:
        extractor.__class__ = cls
        extractor.layer_channels = tuple(extractor.stages[i][-1].hidden for i in extractor.layers)
        extractor.out_channels = sum(extractor.layer_channels)
        return extractor

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        feats: list[Tensor] = []
        for i, stage in enumerate(self.stages):
            if i not in self.layers:
                x = stage(x)
                continue
            *first, block = stage
            for module in first:
                x = module(x)
            hidden = block.act(block._bn0(block._expand_conv(x))) if block.has_expand else x
            hidden = block.act(block._bn1(block._depthwise_conv(hidden)))
            feats.append(self.pool(hidden))
            out = block._bn2(block._project_conv(hidden))
            x = out + x if block.use_residual else out
        return feats


def main() -> None:
    create = backbones.create_backbone
    backbones.create_backbone = lambda *args, **kwargs: ExpandedFeatures.wrap(create(*args, **kwargs))
    tinyglass_ablation.main(__doc__, cache_prefix="tinyglass_wide")


if __name__ == "__main__":
    main()
