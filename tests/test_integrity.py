"""Everything that decides is sealed (edgead.integrity): edits, deleted or nulled hashes, files naming another
run, interrupted and misdirected writes. Each case as a user meets it: one `error:` line, nothing lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from conftest import assert_error, copy_run, edgead, edgead_inprocess, write_sealed_config

from edgead.backbones.weights import sha256_of
from edgead.deploy.onnx_export import METADATA_SEAL_KEY, read_metadata, seal_metadata
from edgead.errors import EdgeadError
from edgead.integrity import IntegrityError
from edgead.runs import SEAL_KEY, load_run


def changed(fields: dict, changes: dict) -> dict:
    """``fields`` with ``changes`` applied; a value of ``KeyError`` deletes the key."""
    fields = {**fields, **changes}
    return {key: value for key, value in fields.items() if value is not KeyError}


def edit_config(run: Path, reseal: bool = False, **changes) -> dict:
    config = changed(json.loads((run / "config.json").read_text()), changes)
    if reseal:
        write_sealed_config(run, config)
    else:
        (run / "config.json").write_text(json.dumps(config))
    return config


def edit_onnx_metadata(path: Path, out: Path, reseal: bool = False, **changes) -> Path:
    model = onnx.load(str(path))
    metadata = changed({p.key: p.value for p in model.metadata_props}, changes)
    if reseal:
        metadata = seal_metadata(metadata)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def exported(padim_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the PaDiM run with its ONNX export and INT8 file."""
    run = copy_run(padim_run, tmp_path_factory.mktemp("integrity"), "exported")
    result = edgead("export", run, "--int8", "--calibration", "8")
    assert result.returncode == 0, result.stderr
    return run


# --- run folders -------------------------------------------------------------------------------------------


def test_a_hand_edited_threshold_is_refused(padim_run: Path, tmp_path: Path, capsys):
    run = copy_run(padim_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    raised = (config["threshold"] + config["score_max"]) / 2  # well-formed, in range: only the seal sees it
    edit_config(run, threshold=raised)
    line = assert_error(edgead_inprocess(capsys, "test", run), 1, "edited or damaged", SEAL_KEY)
    assert "refit" in line


@pytest.mark.parametrize("change", ["delete_seal", "null_seal", "null_model_hash_resealed", "delete_model_hash"])
def test_a_missing_or_null_hash_is_an_error_never_a_pass(change: str, padim_run: Path, tmp_path: Path):
    run = copy_run(padim_run, tmp_path)
    if change == "delete_seal":
        edit_config(run, **{SEAL_KEY: KeyError})
    elif change == "null_seal":
        edit_config(run, **{SEAL_KEY: None})
    elif change == "null_model_hash_resealed":  # even resealed: a run without its weights' hash is refused
        edit_config(run, reseal=True, model_sha256=None)
    else:
        edit_config(run, model_sha256=KeyError)
    with pytest.raises(EdgeadError, match="config_sha256|model_sha256"):
        load_run(run)


def test_changed_weights_with_a_nulled_hash_are_refused(padim_run: Path, tmp_path: Path):
    run = copy_run(padim_run, tmp_path)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-100] ^= 0x01
    (run / "model.safetensors").write_bytes(bytes(data))
    edit_config(run, model_sha256=None)
    with pytest.raises(EdgeadError, match="config_sha256|model_sha256"):
        load_run(run)
    edit_config(run, reseal=True, model_sha256=sha256_of(run / "model.safetensors"))
    load_run(run)  # what edgead itself writes for new weights loads: the check is the seal, not the test


def test_runs_of_the_unsealed_format_are_refused_with_the_remedy(padim_run: Path, tmp_path: Path):
    run = copy_run(padim_run, tmp_path)
    edit_config(run, format_version=1, **{SEAL_KEY: KeyError})
    with pytest.raises(EdgeadError, match="format version 1.*refit"):
        load_run(run)


# --- exported files ----------------------------------------------------------------------------------------


def test_onnx_metadata_edits_are_refused(exported: Path, tmp_path: Path):
    path = exported / "export" / "model.onnx"
    metadata = read_metadata(path)
    inner = json.loads(metadata["edgead_config"])
    raised = repr((inner["threshold"] + inner["score_max"]) / 2)
    cases = {
        "threshold": {"threshold": raised},  # would make every defect "normal"
        "source_run": {"source_run": str(tmp_path / "another_run")},
        "no_graph_hash": {"graph_sha256": KeyError},
        "no_seal": {METADATA_SEAL_KEY: KeyError},
    }
    for name, changes in cases.items():
        bad = edit_onnx_metadata(path, tmp_path / f"{name}.onnx", **changes)
        with pytest.raises(EdgeadError, match="edited or damaged|no metadata_sha256|invalid edgead metadata"):
            read_metadata(bad)
    # Resealed by a forger without the graph hash: still refused (a hash that is missing is never a pass).
    bad = edit_onnx_metadata(path, tmp_path / "resealed.onnx", reseal=True, graph_sha256=KeyError)
    with pytest.raises(IntegrityError, match="no valid graph_sha256"):
        read_metadata(bad)
    # The run config inside the metadata is sealed too: a raised threshold there and in the metadata.
    inner["threshold"] = float(raised)
    bad = edit_onnx_metadata(
        path, tmp_path / "inner.onnx", reseal=True, threshold=raised, edgead_config=json.dumps(inner)
    )
    with pytest.raises(EdgeadError, match="config_sha256"):
        read_metadata(bad)


def test_tampered_int8_file_through_the_cli(exported: Path, tmp_path: Path):
    path = exported / "export" / "model.int8.onnx"
    bad = edit_onnx_metadata(path, tmp_path / "model.int8.onnx", threshold="1e9")
    assert_error(edgead("test", bad), 1, "edited or damaged")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert_error(edgead("test", empty), 1, "empty (0 bytes)")


def test_int8_file_is_compared_only_with_the_run_it_came_from(exported: Path, padim_run: Path, tmp_path: Path):
    from edgead.data.datasets import open_dataset
    from edgead.evaluation import compare_with_source_run

    metadata = read_metadata(exported / "export" / "model.int8.onnx")
    config = load_run(exported)[1]
    data = open_dataset(config.extra["dataset"])
    assert "fp32_image_auroc" in compare_with_source_run(metadata, data, config, 16, False)
    # A metadata that names another run (here: a refitted one, same path) is refused, not compared.
    other = copy_run(padim_run, tmp_path, "other")
    edit_config(other, reseal=True, threshold_quantile=0.95)  # another decision rule: another identity
    answer = compare_with_source_run({**metadata, "source_run": str(other)}, data, config, 16, False)
    assert "fp32_comparison_refused" in answer and "not the one" in answer["fp32_comparison_refused"]


def test_upper_case_suffixes_are_recognised(exported: Path, tmp_path: Path):
    from edgead.deploy.runtimes import load_inferencer

    upper = tmp_path / "MODEL.ONNX"
    upper.write_bytes((exported / "export" / "model.onnx").read_bytes())
    assert load_inferencer(upper).runtime == "onnxruntime"


def test_sensor_summary_edits_are_refused(tmp_path: Path):
    from edgead.deploy.imx500 import SUMMARY_SEAL_KEY
    from edgead.deploy.imx500_host import SensorDecoder
    from edgead.integrity import seal

    post = {"upsample_to": [64, 64], "blur_sigma": 4.0, "threshold": 1.0, "score_min": 0.0, "score_max": 2.0}
    summary = seal({"ok": True, "postprocess": post}, SUMMARY_SEAL_KEY)
    path = tmp_path / "imx500_summary.json"
    path.write_text(json.dumps(summary))
    assert SensorDecoder.from_summary(path).threshold == 1.0
    summary["postprocess"]["threshold"] = 1.9
    path.write_text(json.dumps(summary))
    with pytest.raises(IntegrityError, match="edited or damaged"):
        SensorDecoder.from_summary(path)
    del summary[SUMMARY_SEAL_KEY]
    path.write_text(json.dumps(summary))
    with pytest.raises(IntegrityError, match="no summary_sha256"):
        SensorDecoder.from_summary(path)


# --- writes that never clobber -----------------------------------------------------------------------------


def test_sigterm_during_int8_export_keeps_the_previous_file(exported: Path, tmp_path: Path):
    run = copy_run(exported, tmp_path)
    int8 = run / "export" / "model.int8.onnx"
    before = int8.read_bytes()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgead", "export", str(run), "--int8", "--calibration", "8"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    try:
        while not list((run / "export").glob(".edgead-model.int8.*.partial.onnx")):  # the quantizer has started
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the INT8 quantization never started"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "terminated" in stderr
    assert int8.read_bytes() == before  # the good INT8 file, not the quantizer's unfinished one
    assert not [p.name for p in (run / "export").iterdir() if p.name.startswith(".edgead-")]
    read_metadata(int8)


def test_export_out_refuses_other_runs_exports_and_user_files(
    exported: Path, padim_run: Path, tmp_path: Path, capsys
):
    other = copy_run(padim_run, tmp_path, "other")
    edit_config(other, reseal=True, threshold_quantile=0.95)
    target = exported / "export"
    before = (target / "model.onnx").read_bytes()
    assert_error(edgead_inprocess(capsys, "export", other, "--out", target), 1, "another run", "--force")
    assert (target / "model.onnx").read_bytes() == before
    mine = tmp_path / "my_files"
    mine.mkdir()
    (mine / "model.onnx").write_text("the user's own file")
    assert_error(edgead_inprocess(capsys, "export", other, "--out", mine), 1, "not an edgead export")
    assert (mine / "model.onnx").read_text() == "the user's own file"
    assert edgead_inprocess(capsys, "export", other, "--out", mine, "--force").returncode == 0
    assert edgead_inprocess(capsys, "export", other, "--out", mine).returncode == 0  # now its own export


def test_preconditions_are_checked_before_any_work(
    padim_run: Path, synthetic_dataset: Path, tmp_path: Path, monkeypatch, capsys
):
    from conftest import fit_small_tinyglass

    monkeypatch.setenv("EDGEAD_IMX500_HOME", str(tmp_path / "no_imx500"))
    monkeypatch.setenv("EDGEAD_TFLITE_HOME", str(tmp_path / "no_tflite"))
    tinyglass = fit_small_tinyglass(synthetic_dataset, tmp_path / "tg")
    for fmt, fragment in (("imx500", "setup_imx500"), ("tflite", "setup_tflite")):
        out = tmp_path / f"qat_{fmt}"
        args = ["export", tinyglass, "--format", fmt, "--qat", "--out", out] + (["--int8"] if fmt == "tflite" else [])
        assert_error(edgead_inprocess(capsys, *args), 1, fragment)
        assert not (out / "qat_run").exists()  # no fine-tuning happened
    no_test = tmp_path / "no_test"
    (no_test / "train" / "good").mkdir(parents=True)
    for image in sorted((synthetic_dataset / "train" / "good").iterdir())[:5]:
        (no_test / "train" / "good" / image.name).write_bytes(image.read_bytes())
    runs = tmp_path / "bench_runs"
    result = edgead_inprocess(
        capsys, "benchmark", no_test, "--models", "padim", "--out", tmp_path / "b.md", "--runs-dir", runs
    )
    assert_error(result, 1, "no test images")
    assert not runs.exists() or not any(runs.iterdir())
    result = edgead_inprocess(
        capsys, "benchmark", synthetic_dataset, "--models", "padim", "--runtime", "litert",
        "--out", tmp_path / "b.md", "--runs-dir", runs,
    )
    assert_error(result, 1, "setup_tflite")
    assert not runs.exists() or not any(runs.iterdir())


def test_outputs_inside_the_dataset_are_refused(padim_run: Path, synthetic_dataset: Path, capsys):
    inside = synthetic_dataset / "test" / "report"
    assert_error(edgead_inprocess(capsys, "test", padim_run, "--out", inside), 1, "inside the dataset")
    assert not inside.exists()
    folder = synthetic_dataset / "test" / "good"
    result = edgead_inprocess(capsys, "predict", padim_run, folder, "--out", folder / "predictions")
    assert_error(result, 1, "inside the input folder")
    assert not (folder / "predictions").exists()


def test_fit_refuses_a_run_folder_inside_its_dataset(synthetic_dataset: Path, capsys):
    out = synthetic_dataset / "runs" / "bad"
    assert_error(edgead_inprocess(capsys, "fit", synthetic_dataset, "--out", out), 1, "inside the dataset")
    assert not out.exists()




def test_edge_feature_file_edits_are_refused(exported: Path, tmp_path: Path, capsys):
    from edgead.edge.backbone import load_edge

    assert edgead_inprocess(capsys, "export", exported, "--format", "edge").returncode == 0
    features = exported / "edge" / "features.onnx"
    load_edge(features)
    bad = edit_onnx_metadata(features, tmp_path / "features.onnx", feature_shape="[1, 1, 1]")
    with pytest.raises(IntegrityError, match="edited or damaged"):
        load_edge(bad)
