"""The autoencoder baseline: SSIM is right, the graph is static and 4D, and training learns the normal images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgead.models import create_pipeline
from edgead.models.autoencoder.model import reconstruction_error, ssim_map


def test_ssim_is_one_for_equal_images_and_drops_with_noise():
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ssim_map(a, a), torch.ones_like(a), rtol=0, atol=1e-5)
    noisy = a + 0.5 * torch.randn_like(a)
    assert ssim_map(a, noisy).mean() < 0.9
    assert reconstruction_error(a, a, "l2").abs().max() == 0
    assert reconstruction_error(a, noisy, "ssim").shape == (2, 1, 32, 32)


def test_graph_is_static_4d():
    pipeline = create_pipeline("autoencoder", pretrained=False, image_size=128)
    pipeline.head.set_fitted(normal_error_=torch.ones(1, 1, 1, 1))
    program = torch.export.export(pipeline.eval(), (torch.rand(1, 3, 128, 128),))
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "call_function" and node.users:
            assert isinstance(value, torch.Tensor) and value.dim() == 4, f"{node.target}: {value}"
    assert "teacher" not in str(pipeline) and "stages" not in dict(pipeline.named_modules())


def test_side_must_be_a_multiple_of_64():
    with pytest.raises(ValueError, match="multiple of 64"):
        create_pipeline("autoencoder", pretrained=False, image_size=96)


@pytest.mark.parametrize("error", ["l2", "ssim"])
def test_autoencoder_learns_to_reconstruct_normal_images(synthetic_dataset: Path, tmp_path: Path, error: str):
    from edgead.data.datasets import open_dataset
    from edgead.models.image_training import load_images
    from edgead.runs import load_run
    from edgead.training import fit_run

    run = tmp_path / error
    pipeline, _ = fit_run(
        synthetic_dataset, run, model="autoencoder", image_size=128, progress=False,
        hyperparameters={"error": error, "steps": 120, "batch_size": 4},
    )  # fmt: skip
    history = pipeline.head.history_
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]  # it learned to reconstruct
    normal = load_images(open_dataset(synthetic_dataset).test[:4], 128).float() / 255
    loaded, _ = load_run(run)
    torch.testing.assert_close(loaded.predict(normal)[1], pipeline.predict(normal)[1])
