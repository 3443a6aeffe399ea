"""Per-image latency at batch 1, split by pipeline stage, so that e.g. PatchCore's kNN search (the
head) can be compared with the backbone it follows."""

from __future__ import annotations

import statistics
import time

import torch

from edgead.models import Pipeline


@torch.no_grad()
def measure_latency(pipeline: Pipeline, images: torch.Tensor, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per image over ``images`` [N, 3, S, S], run one at a time.

    backbone = preprocess + backbone; head = patch scores + image score; postprocess = upsample + blur.
    """
    pipeline.eval()
    for image in images[:warmup]:
        pipeline.score_features(pipeline.features(image[None]))
    stages: dict[str, list[float]] = {"backbone_ms": [], "head_ms": [], "postprocess_ms": [], "total_ms": []}
    for image in images:
        t0 = time.perf_counter()
        features = pipeline.features(image[None])
        t1 = time.perf_counter()
        patch_scores = pipeline.head(features)
        pipeline.head.image_scores(features, patch_scores)
        t2 = time.perf_counter()
        pipeline.postprocess(patch_scores)
        t3 = time.perf_counter()
        for key, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            stages[key].append(seconds * 1000)
    result = {key: statistics.median(values) for key, values in stages.items()}
    result.update(n_images=len(images), threads=torch.get_num_threads())
    return result
