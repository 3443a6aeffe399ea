"""Options and files nobody should trust: sizes too large for the image or for memory, and weights files
that are pickled code, empty or truncated. Each fails with one clear error before any work starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgead.backbones import build_architecture, create_backbone
from edgead.errors import EdgeadError, SizeError, UsageError, WeightsError
from edgead.models import HEADS, create_head, create_pipeline
from edgead.training import FitSettings, fit_run

# --- size-like hyperparameters ------------------------------------------------------------------------

HUGE = 10**12

TOO_LARGE = [
    ("patchcore", "max_bank_size"),
    ("patchcore", "chunk_size"),
    ("patchcore", "num_neighbours"),
    ("patchcore", "projection_dim"),
    ("patchcore", "ef_search"),
    ("patchcore", "hnsw_neighbours"),
    ("patchcore", "bank_size"),
    ("padim", "n_features"),
    ("tinyglass", "in_channels"),
    ("tinyglass", "hidden"),
    ("tinyglass", "epochs"),
    ("tinyglass", "views"),
    ("tinyglass", "batch_size"),
    ("tinyglass", "patches_per_image"),
    ("tinyglass", "gas_steps"),
    ("student", "width"),
    ("student", "steps"),
    ("student", "batch_size"),
    ("student", "views"),
    ("autoencoder", "code"),
    ("autoencoder", "width"),
    ("autoencoder", "steps"),
    ("autoencoder", "batch_size"),
    ("simclr", "dim"),
    ("simclr", "width"),
    ("simclr", "steps"),
    ("simclr", "batch_size"),
    ("simclr", "crop"),
    ("differnet", "scales"),
    ("differnet", "blocks"),
    ("differnet", "hidden"),
    ("differnet", "epochs"),
    ("differnet", "views"),
    ("differnet", "batch_size"),
    ("differnet", "test_transforms"),
]


@pytest.mark.parametrize(("model", "option"), TOO_LARGE)
def test_every_size_like_hyperparameter_has_an_upper_bound(model: str, option: str):
    with pytest.raises(UsageError, match=rf"'{model}': {option}: input should be less than or equal to"):
        create_head(model, **{option: HUGE})


@pytest.mark.parametrize("model", sorted(HEADS))
def test_defaults_are_within_the_bounds_at_the_default_image_size(model: str):
    head = create_head(model)
    head.check_sizes(256)
    head.check_sizes(256, SimpleNamespace(out_channels=152, stride=8, name="efficientnet_lite0", layers=(2, 3)))


@pytest.mark.parametrize(
    ("model", "settings", "image_size", "named"),
    [
        ("student", {"width": 1024}, 2048, "width 1024"),
        ("autoencoder", {"width": 1024, "code": 4096}, 2048, "width 1024, code 4096"),
        ("tinyglass", {"hidden": 16384}, 2048, "hidden 16384"),
        ("simclr", {"width": 1024, "batch_size": 1024, "crop": 512}, 512, "width 1024"),
    ],
)
def test_sizes_that_would_not_fit_in_memory_are_range_errors(model, settings, image_size, named):
    """Refused before the networks are built: no allocation is tried, so this is fast and never OOMs."""
    with pytest.raises(SizeError, match=rf"{named}.* GiB of memory, more than the 64 GiB limit"):
        create_pipeline(model, pretrained=False, image_size=image_size, **settings)


def test_memory_checks_that_need_the_backbone():
    wide = SimpleNamespace(out_channels=1792, stride=8, name="wide_resnet50_2", layers=(1, 2, 3))
    with pytest.raises(SizeError, match=r"n_features 4096 \(1792 channels kept\) at image size 1024"):
        create_head("padim", n_features=4096).check_sizes(1024, wide)
    create_head("padim", n_features=4096).check_sizes(256, SimpleNamespace(out_channels=152, stride=8))
    with pytest.raises(SizeError, match="64 blocks with hidden 65536 on 5376 dimensions"):
        create_head("differnet", blocks=64, hidden=65536).check_sizes(448, wide)
    with pytest.raises(SizeError, match="in_channels 5 is not the 152 channels"):
        create_pipeline("tinyglass", pretrained=False, image_size=64, in_channels=5)
    pipeline = create_pipeline("tinyglass", pretrained=False, image_size=64, views=256)
    with pytest.raises(SizeError, match="views 256 of 1000000 images"):
        pipeline.head.check_cache(pipeline, 1_000_000)


def test_image_size_cross_checks_name_both_values():
    with pytest.raises(SizeError, match="crop 512 is larger than the image size 256"):
        create_head("simclr", crop=512).check_sizes(256)
    create_head("simclr", crop=256).check_sizes(256)
    with pytest.raises(SizeError, match="multiple of 64, not 96"):
        create_head("autoencoder").check_sizes(96)
    with pytest.raises(SizeError, match="smallest scale"):
        create_head("differnet", scales=7).check_sizes(1024)


def test_crop_larger_than_the_image_fails_before_any_work(tmp_path: Path):
    """The dataset does not even exist: the options are checked before it is looked at."""
    with pytest.raises(SizeError, match="crop 128 is larger than the image size 64"):
        fit_run(tmp_path / "no-such-dataset", tmp_path / "run", model="simclr", image_size=64,
                hyperparameters={"crop": 128}, progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


def fit_settings(**changes) -> FitSettings:
    values = dict(model="patchcore", backbone="efficientnet_lite0", image_size=256, layers=None,
                  validation_fraction=0.1, threshold_quantile=0.99, seed=0, batch_size=16, aggregation_border=None)  # fmt: skip
    return FitSettings.check(**{**values, **changes})


def test_fit_batch_size_is_bounded_and_checked_against_the_image_size():
    with pytest.raises(UsageError, match="batch_size: input should be less than or equal to 1024"):
        fit_settings(batch_size=HUGE)
    with pytest.raises(UsageError, match="batch_size: 1024 images of 2048 px .* at most 256"):
        fit_settings(batch_size=1024, image_size=2048)
    assert fit_settings(batch_size=256, image_size=2048).batch_size == 256
    assert fit_settings(batch_size=1024, image_size=256).batch_size == 1024
    with pytest.raises(UsageError, match="image_size: input should be less than or equal to 2048"):
        fit_settings(image_size=HUGE)


# --- weights files ------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create ``marker``: the proof that a refused file ran nothing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pickled_code_is_refused_unread_and_never_advised_to_load(tmp_path: Path):
    marker = tmp_path / "it-ran"
    path = tmp_path / "checkpoint.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(WeightsError) as caught:
        create_backbone("resnet18", weights_path=path)
    message = str(caught.value)
    assert "Python code or objects beyond tensors" in message and "must not be loaded" in message
    assert "weights_only" not in message and "\n" not in message
    assert not marker.exists()


def test_empty_and_truncated_weights_files_get_one_line(tmp_path: Path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty \(0 bytes\)") as caught:
        create_backbone("resnet18", weights_path=empty)
    assert "\n" not in str(caught.value)
    full = tmp_path / "full.pth"
    torch.save(build_architecture("resnet18").state_dict(), full)
    for suffix in (".pth", ".safetensors"):
        truncated = tmp_path / f"truncated{suffix}"
        if suffix == ".pth":
            data = full.read_bytes()
        else:
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(1000)}, str(truncated))
            data = truncated.read_bytes()
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match="truncated, corrupt or another kind of file") as caught:
            create_backbone("resnet18", weights_path=truncated)
        assert "\n" not in str(caught.value)


# --- the command line -----------------------------------------------------------------------------------


def edgead(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgead", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "RuntimeWarning" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_cli_refuses_huge_and_impossible_sizes(synthetic_dataset: Path, tmp_path: Path):
    out = tmp_path / "run"
    line = one_error_line(
        edgead("fit", synthetic_dataset, "--model", "tinyglass", "--random-init", "-o", out, "-p", "hidden=1000000000000"),
        2,
    )
    assert "hidden" in line and "16384" in line
    line = one_error_line(
        edgead("fit", synthetic_dataset, "--model", "simclr", "--image-size", "64", "-o", out, "-p", "crop=128"), 2
    )
    assert "crop 128" in line and "image size 64" in line
    assert not out.exists()


def test_cli_refuses_pickled_weights(synthetic_dataset: Path, tmp_path: Path):
    marker = tmp_path / "it-ran"
    path = tmp_path / "resnet18.pth"
    torch.save({"payload": _Payload(marker)}, path)
    line = one_error_line(
        edgead("fit", synthetic_dataset, "--backbone", "resnet18", "--weights", path, "-o", tmp_path / "run"), 1
    )
    assert "must not be loaded" in line and "weights_only" not in line
    assert not marker.exists()


def test_edgead_errors_are_value_errors_only_for_sizes():
    assert issubclass(SizeError, UsageError) and issubclass(SizeError, ValueError)
    assert not issubclass(UsageError, ValueError) and issubclass(UsageError, EdgeadError)
