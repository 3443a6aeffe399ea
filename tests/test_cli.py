"""The `edgead` command as a user runs it: real subprocesses, exit codes and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_sealed_config


def edgead(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgead", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_every_command():
    result = edgead("--help")
    assert result.returncode == 0
    for command in ("fit", "test", "predict", "benchmark", "demo"):
        assert command in result.stdout


def test_fit_rejects_bad_datasets(tmp_path: Path):
    assert_clean_error(edgead("fit", tmp_path / "missing"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(edgead("fit", empty), "train/good")
    no_images = tmp_path / "no_images" / "train" / "good"
    no_images.mkdir(parents=True)
    assert_clean_error(edgead("fit", no_images.parents[1]), "no images")


def test_fit_names_a_corrupt_or_fake_png(synthetic_dataset: Path, tmp_path: Path):
    for name, content in (("corrupt.png", None), ("notes.png", b"this is a text file, not a PNG\n")):
        dataset = tmp_path / name / "parts"
        shutil.copytree(synthetic_dataset, dataset)
        bad = dataset / "train" / "good" / name
        if content is None:  # a real PNG cut in half
            good = sorted((dataset / "train" / "good").glob("*.png"))[0].read_bytes()
            content = good[: len(good) // 2]
        bad.write_bytes(content)
        assert_clean_error(edgead("fit", dataset, "--out", tmp_path / "run", "--image-size", "64"), name)


def test_fit_test_predict_round_trip(synthetic_dataset: Path, fitted_run: Path, tmp_path: Path):
    result = edgead("test", fitted_run, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert "image_auroc" in result.stdout and "pixel_auroc" in result.stdout
    images = synthetic_dataset / "test"
    fake = tmp_path / "inputs"
    shutil.copytree(images / "good", fake)
    (fake / "broken.png").write_text("not an image")
    result = edgead("predict", fitted_run, fake, "--out", tmp_path / "pred")
    assert result.returncode == 1  # one unreadable file: reported, the rest still scored
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    csv_lines = (tmp_path / "pred" / "predictions.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(list(fake.iterdir()))
    assert len(list((tmp_path / "pred" / "frames").glob("*.png"))) == len(csv_lines) - 2


def test_run_folder_from_another_model_or_tool(fitted_run: Path, tmp_path: Path):
    not_a_run = tmp_path / "anomalib_run"
    not_a_run.mkdir()
    (not_a_run / "model.ckpt").write_bytes(b"\x80\x04 pickle")
    assert_clean_error(edgead("test", not_a_run), "config.json")
    mixed = tmp_path / "mixed"
    shutil.copytree(fitted_run, mixed)
    text = (mixed / "config.json").read_text().replace('"model": "patchcore"', '"model": "padim"')
    write_sealed_config(mixed, json.loads(text))
    assert_clean_error(edgead("predict", mixed, fitted_run / "config.json"), "padim")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("predict",), "Missing argument"),
        (("fit", ".", "--model", "nope"), "unknown model 'nope'"),
        (("fit", ".", "--image-size", "abc"), "--image-size"),
    ],
)
def test_usage_errors_exit_2_and_say_what_is_wrong(args, message, tmp_path: Path):
    result = edgead(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.replace("│", " ").split())
    assert "Traceback" not in result.stderr


def test_profile_reports_params_and_macs(fitted_run: Path):
    result = edgead("profile", fitted_run)
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "MACs" in result.stdout and "head data" in result.stdout
