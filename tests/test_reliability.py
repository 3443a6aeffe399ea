"""Bad input, one class at a time, as a user meets it: the `edgead` command in a subprocess.

Every case must end in one `error:` line (exit 2 for a wrong option, 1 for bad input), no traceback,
nothing lost and nothing silently wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_error, copy_run, edgead, edgead_inprocess, write_sealed_config
from safetensors.torch import load_file, save_file

from edgead.backbones.weights import sha256_of

# --- output paths are checked before the work, and finished work is never lost ----------------------


def test_output_paths_are_checked_before_any_work(synthetic_dataset: Path, padim_run: Path, tmp_path: Path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert_error(edgead("fit", synthetic_dataset, "--out", a_file), 1, "is a file")  # a real process once
    assert_error(edgead_inprocess(capsys, "fit", synthetic_dataset, "--out", a_file / "run"), 1, "is a file")
    assert_error(edgead_inprocess(capsys, "fit", synthetic_dataset, "--out", ""), 2, "--out is empty")
    assert a_file.read_text() == "mine"
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("years of work")
    for args in (("fit", synthetic_dataset, "--force"), ("test", padim_run), ("predict", padim_run, a_file)):
        assert_error(edgead_inprocess(capsys, *args, "--out", foreign), 1, "other files")
    assert (foreign / "thesis.txt").read_text() == "years of work"
    bench = ("benchmark", synthetic_dataset, "--models", "padim", "--out", tmp_path)
    assert_error(edgead_inprocess(capsys, *bench), 1, "is a folder")
    assert_error(edgead_inprocess(capsys, "export", padim_run, "--out", a_file), 1, "is a file")


def test_benchmark_keeps_the_rows_that_finished_when_one_dataset_fails(synthetic_dataset: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_dataset, broken)
    test_image = sorted((broken / "test" / "good").iterdir())[0]
    test_image.write_bytes(b"not an image")  # fits fine, fails at test time
    out = tmp_path / "report" / "bench.md"
    result = edgead(
        "benchmark", synthetic_dataset, broken, "--models", "padim", "--image-size", "64",
        "--runs-dir", tmp_path / "runs", "--out", out,
    )  # fmt: skip
    assert_error(result, 1, "1 benchmark run(s) failed", "broken/padim")
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["dataset"], r["model"]) for r in rows] == [(synthetic_dataset.name, "padim")]
    report = out.read_text()
    assert "## Failed" in report and test_image.name in report


# --- never overwrite a run silently --------------------------------------------------------------------


def test_fit_refuses_an_existing_run_unless_forced_and_force_clears_it(
    synthetic_dataset: Path, padim_run: Path, tmp_path: Path
):
    run = copy_run(padim_run, tmp_path)
    (run / "export").mkdir()
    (run / "export" / "model.int8.onnx").write_bytes(b"stale")
    before = sha256_of(run / "model.safetensors")
    assert_error(edgead("fit", synthetic_dataset, "--image-size", "64", "--out", run), 1, "--force")
    assert sha256_of(run / "model.safetensors") == before and (run / "export").is_dir()
    result = edgead("fit", synthetic_dataset, "--model", "padim", "--image-size", "96", "--out", run, "--force")
    assert result.returncode == 0, result.stderr
    assert not (run / "export").exists()
    assert json.loads((run / "config.json").read_text())["image_size"] == 96
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgead-")]  # no staging left


def test_int8_file_is_not_compared_with_a_refitted_run(synthetic_dataset: Path, padim_run: Path, tmp_path: Path):
    run = copy_run(padim_run, tmp_path)
    result = edgead("export", run, "--int8", "--calibration", "4")
    assert result.returncode == 0, result.stderr
    exported = tmp_path / "model.int8.onnx"
    shutil.copy(run / "export" / "model.int8.onnx", exported)  # kept while the run is refitted
    result = edgead("fit", synthetic_dataset, "--model", "padim", "--image-size", "64", "--seed", "3", "--out", run, "--force")  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = edgead("test", exported)
    assert result.returncode == 0, result.stderr
    assert "not compared with fp32" in result.stderr and "change vs fp32" not in result.stdout


# --- options and untrusted files are validated before anything runs -------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--image-size", "0"), "image_size"),
        (("--image-size", "100"), "multiple of 32"),
        (("--image-size", "100000"), "image_size"),
        (("--threshold-quantile", "1.5"), "threshold_quantile"),
        (("--validation-fraction", "1"), "validation_fraction"),
        (("-p", "coreset_ratio=2"), "coreset_ratio"),
        (("-p", "knn=fast"), "knn"),
        (("-p", "no_such=1"), "no_such"),
        (("--layers", "2,x"), "--layers"),
    ],
)
def test_fit_options_are_checked_first(args, fragment, synthetic_dataset: Path, tmp_path: Path, capsys):
    assert_error(edgead_inprocess(capsys, "fit", synthetic_dataset, "--out", tmp_path / "run", *args), 2, fragment)
    assert not (tmp_path / "run").exists()


def test_a_bad_option_in_a_real_process(synthetic_dataset: Path, tmp_path: Path):
    assert_error(edgead("fit", synthetic_dataset, "--out", tmp_path / "run", "-p", "coreset_ratio=2"), 2, "coreset_ratio")


def test_other_commands_check_their_options(synthetic_dataset: Path, padim_run: Path, tmp_path: Path, capsys):
    image = next((synthetic_dataset / "test" / "good").iterdir())
    cases = [
        (("predict", padim_run, image, "--max-frames", "0", "--out", tmp_path / "p"), "--max-frames"),
        (("predict", padim_run, image, "--threads", "0", "--out", tmp_path / "p"), "--threads"),
        (("export", padim_run, "--int8", "--calibration", "0"), "--calibration"),
        (("benchmark", synthetic_dataset, "--models", ",", "--out", tmp_path / "b.md"), "--models"),
        (("benchmark", synthetic_dataset, "--layers", "9", "--out", tmp_path / "b.md"), "layers"),
        (("prune", padim_run, "--ratio", "1.5"), "ratio"),
        (("export", padim_run, "--format", "coreml"), "coreml"),
        (("budget", padim_run, "--image-size", "100"), "--image-size"),
        (("budget", padim_run, "--device", "iphone"), "unknown device"),
        (("demo", "--seconds", "0", "--out", tmp_path / "demo"), "--seconds"),
    ]
    for args, fragment in cases:
        assert_error(edgead_inprocess(capsys, *args), 2, fragment)
    assert not (tmp_path / "p").exists() and not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("image_size", "256", "image_size"),
        ("threshold", None, "threshold"),
        ("threshold", float("nan"), "threshold"),
        ("score_max", "SAME_AS_MIN", "score_min"),
        ("backbone", "../../etc/passwd", "unknown backbone"),
        ("unexpected_key", 1, "unexpected_key"),
        ("head", {"n_features": -3}, "n_features"),
        ("extra", {"n_train": "many"}, "n_train"),
    ],
)
def test_tampered_config_json_is_a_clear_error(field, value, fragment, padim_run: Path, tmp_path: Path, capsys):
    run = copy_run(padim_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    if value == "SAME_AS_MIN":
        value = config["score_min"]
    if field == "extra":
        value = {**config["extra"], **value}
    config[field] = value
    (run / "config.json").write_text(json.dumps(config))
    assert_error(edgead_inprocess(capsys, "test", run), 1, fragment)


def test_flipped_byte_in_a_model_file_is_detected(padim_run: Path, tmp_path: Path):
    run = copy_run(padim_run, tmp_path)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    (run / "model.safetensors").write_bytes(bytes(data))
    assert_error(edgead("test", run), 1, "sha256")

    exported = copy_run(padim_run, tmp_path, "exported")
    assert edgead("export", exported).returncode == 0
    onnx_file = exported / "export" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    at = len(data) // 2
    data[at] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    assert_error(edgead("test", onnx_file), 1)


def test_tampered_onnx_metadata_is_a_clear_error(padim_run: Path, tmp_path: Path):
    import onnx

    run = copy_run(padim_run, tmp_path)
    assert edgead("export", run).returncode == 0
    path = run / "export" / "model.onnx"
    for key, value, fragment in (
        ("threshold", "nan", "threshold"),
        ("input_size", "../x", "input_size"),
        ("surprise", "1", "surprise"),
    ):
        model = onnx.load(str(path))
        for entry in model.metadata_props:
            if entry.key == key:
                entry.value = value
                break
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        bad = tmp_path / f"bad_{key}.onnx"
        onnx.save(model, str(bad))
        assert_error(edgead("test", bad), 1, fragment)


# --- NaN and inf fail closed ----------------------------------------------------------------------------


def nan_run(padim_run: Path, tmp_path: Path) -> Path:
    """A copy of the run whose Gaussians hold a NaN, with a matching sha256 (a diverged fit, not a flip)."""
    run = copy_run(padim_run, tmp_path, "nan")
    tensors = load_file(str(run / "model.safetensors"))
    tensors["head.mean_"][0, 0] = float("nan")
    save_file(tensors, str(run / "model.safetensors"))
    config = json.loads((run / "config.json").read_text())
    config["model_sha256"] = sha256_of(run / "model.safetensors")
    write_sealed_config(run, config)
    return run


def test_nan_scores_fail_closed(synthetic_dataset: Path, padim_run: Path, tmp_path: Path):
    run = nan_run(padim_run, tmp_path)
    assert_error(edgead("test", run), 1, "NaN")
    assert_error(edgead("export", run), 1, "NaN")
    assert not (run / "export" / "model.onnx").exists()
    image = next((synthetic_dataset / "test" / "good").iterdir())
    result = edgead("predict", run, image, "--out", tmp_path / "pred")
    assert result.returncode == 1
    row = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()[1]
    assert "NaN" in row and ",normal," not in row and ",anomalous," not in row


def test_fit_refuses_to_save_non_finite_models():
    from edgead.errors import NonFiniteError
    from edgead.training import calibrate

    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        calibrate(np.array([0.1, float("nan"), 0.3]), 0.99)
    assert calibrate(np.array([1e12, 1e12]), 0.99)["score_max"] > 1e12  # a constant score still calibrates


# --- file names that are not UTF-8 ----------------------------------------------------------------------


def test_predict_handles_non_utf8_file_and_folder_names(synthetic_dataset: Path, padim_run: Path, tmp_path: Path):
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    source = next((synthetic_dataset / "test" / "good").iterdir()).read_bytes()
    with open(folder + b"/pi\xe8ce.png", "wb") as f:
        f.write(source)
    out = os.fsencode(tmp_path) + b"/sortie\xff"
    result = edgead("predict", padim_run, folder, "--out", out)
    assert result.returncode == 0, result.stderr
    frames = os.listdir(out + b"/frames")
    assert len(frames) == 1 and frames[0].endswith(b"pi\xe8ce.png")
    assert "\\xe8" in (Path(os.fsdecode(out)) / "predictions.csv").read_text()


# --- messages that say what is wrong ----------------------------------------------------------------------


def test_an_exported_file_where_a_run_folder_is_expected(padim_run: Path, tmp_path: Path, capsys):
    run = copy_run(padim_run, tmp_path)
    assert edgead("export", run).returncode == 0
    onnx_file = run / "export" / "model.onnx"
    assert_error(edgead("budget", onnx_file), 1, "is a file, not a run folder")
    for command in ("export", "budget", "prune", "profile"):
        line = assert_error(edgead_inprocess(capsys, command, onnx_file), 1, "is a file, not a run folder")
        assert "does not exist" not in line


def test_prune_names_the_option_it_asks_for(padim_run: Path, tmp_path: Path):
    run = copy_run(padim_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["extra"]["dataset"] = str(tmp_path / "moved_away")
    write_sealed_config(run, config)
    assert_error(edgead("prune", run, "--out", tmp_path / "pruned"), 1, "--dataset")


def test_help_text_keeps_brackets():
    result = edgead("predict", "--help")
    assert '{"polygons": [[[x, y], ...]]}' in " ".join(result.stdout.replace("│", " ").split())


def test_ctrl_c_says_interrupted(synthetic_dataset: Path, tmp_path: Path):
    process = subprocess.Popen(
        [sys.executable, "-m", "edgead", "fit", str(synthetic_dataset), "--model", "tinyglass",
         "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell that starts the suite in the background (`pytest &`) ignores SIGINT, its children inherit
        # that and Python then installs no Ctrl-C handler: give the command a terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )  # fmt: skip
    time.sleep(8)  # past start-up, into the fit
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


# --- budget counts what the exported file holds ---------------------------------------------------------


def test_budget_counts_float_gaussians_at_their_real_size(padim_run: Path):
    from edgead.deploy.budget import budget_run
    from edgead.runs import load_run

    pipeline, _ = load_run(padim_run)
    stored = sum(t.numel() * t.element_size() for t in (pipeline.head.mean_, pipeline.head.cov_inv_))
    report = budget_run(padim_run, "rpi5")
    assert report["data_bytes"] >= stored
