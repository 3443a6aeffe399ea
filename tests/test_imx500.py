"""IMX500 target: clear errors without the toolchain; a real conversion where it is installed.

The toolchain (``bash scripts/setup_imx500.sh``, ~3 GB) is never installed by CI, so the conversion
test skips there; the error tests run everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import fit_small_tinyglass

from edgead.deploy.imx500 import HOME_ENV, SUMMARY_FILE, export_imx500, toolchain_available
from edgead.errors import EdgeadError


@pytest.fixture(scope="module")
def tiny_tinyglass_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TinyGLASS run small enough to fit in seconds (random-init backbone, 64x64, one epoch)."""
    run_dir = tmp_path_factory.mktemp("imx500") / "tinyglass"
    return fit_small_tinyglass(synthetic_dataset, run_dir, 64, pretrained=False, epochs=1, views=1, hidden=16)


def test_missing_toolchain_says_how_to_install_it(
    tiny_tinyglass_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    empty = tmp_path / "no_toolchain_here"
    empty.mkdir()
    monkeypatch.setenv(HOME_ENV, str(empty))
    assert not toolchain_available()
    with pytest.raises(EdgeadError, match=r"run `bash scripts/setup_imx500\.sh`") as info:
        export_imx500(tiny_tinyglass_run, tmp_path / "out", n_calibration=4, progress=False)
    assert str(empty) in str(info.value)  # it says where it looked
    assert not (tmp_path / "out").exists()  # and failed before writing anything


def test_bad_run_folder_and_calibration_count(tmp_path: Path):
    with pytest.raises(EdgeadError, match="does not exist"):
        export_imx500(tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(EdgeadError, match="n_calibration"):
        export_imx500(tmp_path / "missing", tmp_path / "out", n_calibration=0, progress=False)


def test_converts_a_tiny_tinyglass_run(tiny_tinyglass_run: Path, tmp_path: Path):
    if not toolchain_available():
        pytest.skip("IMX500 toolchain not installed (bash scripts/setup_imx500.sh) or no Java")
    out = tmp_path / "imx500"
    summary = export_imx500(tiny_tinyglass_run, out, n_calibration=8, progress=False)

    assert summary["ok"] and summary["fits"] is True
    assert summary == json.loads((out / SUMMARY_FILE).read_text())
    assert (out / "packerOut.zip").stat().st_size > 0
    assert (out / "edgead_tinyglass.onnx").stat().st_size > 0
    memory = summary["memory"]
    for key in ("model_memory", "runtime_memory", "memory_usage"):
        assert memory[f"{key}_bytes"] > 0, key
    assert memory["model_memory_bytes"] < memory["memory_usage_bytes"] <= 8 * 1024**2
    assert summary["input"]["shape"] == [1, 3, 64, 64]
    assert summary["output"]["shape"] == [1, 1, 8, 8]  # stride-8 patch scores; the host upsamples
    assert summary["n_calibration"] == 8
    assert summary["float_fold_max_abs_error"] < 1e-4  # folding the standardisation changed nothing
    assert summary["tool_versions"]["model-compression-toolkit"] == "2.5.1"
    assert summary["files"]["packerOut.zip"] == (out / "packerOut.zip").stat().st_size
