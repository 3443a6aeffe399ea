"""Per-image latency at batch 1, split by pipeline stage, so that e.g. PatchCore's kNN search (the
head) can be compared with the backbone it follows."""

from __future__ import annotations

import statistics
import time

import torch

from edgead.inference import Predictor
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


@torch.no_grad()
def measure_end_to_end(
    predictor: Predictor, images: torch.Tensor, batch_size: int = 16, warmup: int = 3, repeats: int = 3
) -> dict[str, float]:
    """Whole-model latency on any runtime: p50/p95 ms per image at batch 1, images/s at ``batch_size``.

    Works for a torch Pipeline and for the ONNX Runtime / OpenVINO inferencers alike (same input,
    same outputs), so the runtimes are compared on equal terms.
    """
    predictor.eval()
    for image in images[:warmup]:
        predictor.predict(image[None])
    single = []
    for image in images:
        t0 = time.perf_counter()
        predictor.predict(image[None])
        single.append((time.perf_counter() - t0) * 1000)
    batch = images[:batch_size]
    if len(batch) < batch_size:  # repeat images to fill the batch
        batch = batch.repeat((batch_size + len(batch) - 1) // len(batch), 1, 1, 1)[:batch_size]
    predictor.predict(batch)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict(batch)
        rates.append(batch_size / (time.perf_counter() - t0))
    ordered = sorted(single)
    return {
        "p50_ms": statistics.median(single),
        "p95_ms": ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))],
        f"ips_b{batch_size}": statistics.median(rates),
        "threads": torch.get_num_threads(),
    }
