"""How big may PatchCore's memory bank be before its kNN search costs more than the backbone?

Times, at batch 1 and 256x256 on this machine, the default backbone (EfficientNet-Lite0, stride 8 + 16)
against the exact nearest-neighbour search over banks of several coreset ratios, with faiss and with
torch.cdist. Exact flat search costs the same whatever the data, so random features of the real shapes
are used. Writes docs/results/patchcore_knn.md.

    .venv/bin/python benchmarks/knn_latency.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from edgead.models import create_pipeline
from edgead.models.patchcore import NearestNeighbourIndex
from edgead.reporting import markdown_table, results_header

TRAIN_IMAGES = 188  # MVTec bottle after the validation split
RATIOS = (0.01, 0.02, 0.05, 0.1)


def median_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    pipeline = create_pipeline("patchcore", image_size=256)
    image = torch.rand(1, 3, 256, 256)
    backbone_ms = median_ms(lambda: pipeline.features(image))
    features = pipeline.features(image)
    queries = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    rows = []
    for ratio in RATIOS:
        bank_size = int(round(TRAIN_IMAGES * queries.shape[0] * ratio))
        index = NearestNeighbourIndex(torch.randn(bank_size, queries.shape[1]))
        faiss_ms = median_ms(lambda index=index: index.search(queries, 1))
        cdist_ms = median_ms(lambda index=index: torch.cdist(queries, index.bank).min(dim=1), repeats=10)
        rows.append(
            {
                "coreset_ratio": ratio,
                "bank_size": bank_size,
                "bank_mb": bank_size * queries.shape[1] * 4 / 1e6,
                "faiss_knn_ms": faiss_ms,
                "torch_cdist_ms": cdist_ms,
                "backbone_ms": backbone_ms,
                "knn_below_backbone": "yes" if faiss_ms <= backbone_ms else "no",
            }
        )
    out = Path(__file__).resolve().parents[1] / "docs" / "results" / "patchcore_knn.md"
    out.write_text(
        "\n".join(
            [
                *results_header(
                    "PatchCore: kNN search cost against the backbone",
                    ".venv/bin/python benchmarks/knn_latency.py",
                ),
                f"- Backbone: efficientnet_lite0, stride 8 + 16 ({queries.shape[1]} channels), 256x256, batch 1: "
                f"{queries.shape[0]} query patches per image; bank = ratio x {TRAIN_IMAGES} images x "
                f"{queries.shape[0]} patches. Median ms of exact search (k=1).",
                "",
                markdown_table(rows, list(rows[0])),
                "",
            ]
        )
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
