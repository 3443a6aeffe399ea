"""Shared fixtures: a small synthetic dataset made once per session, and the real datasets' location."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgead.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "parts"
    return make_synthetic_dataset(root, n_train=30, n_test_good=8, n_test_defect=8, size=128, seed=1)


@pytest.fixture(scope="session")
def fitted_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PatchCore run fitted on the synthetic dataset with the pretrained default backbone."""
    from edgead.training import fit_run

    run_dir = tmp_path_factory.mktemp("runs") / "patchcore"
    fit_run(synthetic_dataset, run_dir, model="patchcore", image_size=128, progress=False)
    return run_dir


def fit_small_tinyglass(
    dataset: Path, run_dir: Path, image_size: int = 128, pretrained: bool = True, **head
) -> Path:
    """A short TinyGLASS fit for tests (default 4 epochs, 2 views); ``head`` overrides hyperparameters."""
    from edgead.training import fit_run

    fit_run(
        dataset,
        run_dir,
        model="tinyglass",
        image_size=image_size,
        pretrained=pretrained,
        progress=False,
        hyperparameters={"epochs": 4, "views": 2, **head},
    )
    return run_dir


@pytest.fixture(scope="session")
def tinyglass_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TinyGLASS run on the synthetic dataset, short but with the pretrained backbone."""
    return fit_small_tinyglass(synthetic_dataset, tmp_path_factory.mktemp("runs") / "tinyglass")


def require_shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} is absent")
    return SHARED_DATASETS
