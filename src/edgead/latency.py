"""Per-image latency at batch 1, split into the edge side (preprocess + backbone) and the head side
(head + postprocess), so that e.g. the kNN search can be compared with the backbone it follows."""

from __future__ import annotations

import statistics
import time

import torch

from edgead.models import Pipeline


@torch.no_grad()
def measure_latency(pipeline: Pipeline, images: torch.Tensor, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per image over ``images`` [N, 3, S, S], run one at a time."""
    pipeline.eval()
    for image in images[:warmup]:
        pipeline.score_features(pipeline.features(image[None]))
    backbone_ms, head_ms = [], []
    for image in images:
        t0 = time.perf_counter()
        features = pipeline.features(image[None])
        t1 = time.perf_counter()
        pipeline.score_features(features)
        t2 = time.perf_counter()
        backbone_ms.append((t1 - t0) * 1000)
        head_ms.append((t2 - t1) * 1000)
    total = [b + h for b, h in zip(backbone_ms, head_ms, strict=True)]
    return {
        "backbone_ms": statistics.median(backbone_ms),
        "head_ms": statistics.median(head_ms),
        "total_ms": statistics.median(total),
        "n_images": len(images),
        "threads": torch.get_num_threads(),
    }
