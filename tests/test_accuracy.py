"""Accuracy guard: the default models on the real MVTec bottle images must stay where they are.

A regression anywhere in the pipeline (features, aggregation, coreset, kNN, Gaussians, postprocess,
metrics) shows here as a failed test, not as a quietly worse table. Skipped where ../shared/datasets
is absent (the images are CC BY-NC-SA and never copied into the repository).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_shared_datasets


@pytest.mark.datasets
@pytest.mark.parametrize("model", ["patchcore", "padim"])
def test_default_model_on_real_bottle_images(model: str, tmp_path: Path):
    from edgead.evaluation import evaluate_run
    from edgead.training import fit_run

    bottle = require_shared_datasets() / "mvtec_ad" / "bottle"
    fit_run(bottle, tmp_path / "run", model=model, progress=False)
    metrics = evaluate_run(tmp_path / "run", out_dir=tmp_path / "report", progress=False)
    assert metrics["n_anomalous"] == 63 and metrics["n_normal"] == 20
    assert metrics["image_auroc"] >= 0.99
    assert metrics["pixel_auroc"] >= 0.96
