"""End to end on the synthetic dataset with the real pretrained backbone, and run folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_sealed_config

from edgead.errors import DatasetError, RunFolderError
from edgead.evaluation import evaluate_run
from edgead.runs import load_run, read_config


def test_patchcore_detects_synthetic_defects(fitted_run: Path, tmp_path: Path):
    metrics = evaluate_run(fitted_run, out_dir=tmp_path / "report", progress=False)
    assert metrics["image_auroc"] > 0.9
    assert metrics["pixel_auroc"] > 0.9
    report = tmp_path / "report"
    for name in ("metrics.json", "scores.csv", "roc.png", "pixel_roc.png"):
        assert (report / name).is_file(), name
    assert json.loads((report / "metrics.json").read_text())["image_auroc"] == pytest.approx(
        metrics["image_auroc"]
    )
    assert list((report / "examples").glob("*.png"))


def test_threshold_comes_from_validation_images_only(fitted_run: Path):
    config = read_config(fitted_run)
    assert config.extra["n_validation"] >= 2
    assert config.extra["n_train"] + config.extra["n_validation"] == 30  # train/good only
    assert config.score_min <= config.threshold < config.score_max


@pytest.mark.parametrize("model", ["patchcore", "padim"])
def test_run_folder_round_trip_gives_the_fitted_pipelines_scores(model, synthetic_dataset: Path, tmp_path: Path):
    from edgead.training import fit_run

    fitted, _ = fit_run(synthetic_dataset, tmp_path / model, model=model, image_size=64, progress=False)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps_before, scores_before = fitted.predict(images)  # the pipeline as fitted, before any saving
    loaded, _ = load_run(tmp_path / model)
    maps_after, scores_after = loaded.predict(images)
    assert torch.equal(scores_before, scores_after) and torch.equal(maps_before, maps_after)
    assert scores_before.std() > 0  # real, varying scores, not a constant that would match anyway


def test_run_folder_errors(fitted_run: Path, tmp_path: Path):
    with pytest.raises(RunFolderError, match="does not exist"):
        load_run(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunFolderError, match="no config.json"):
        load_run(empty)
    broken = tmp_path / "broken"
    shutil.copytree(fitted_run, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunFolderError, match="safetensors"):
        load_run(broken)
    other = tmp_path / "other"
    shutil.copytree(fitted_run, other)
    config = json.loads((other / "config.json").read_text())
    config["model"], config["head"] = "padim", {}
    write_sealed_config(other, config)
    with pytest.raises(RunFolderError, match="another model"):
        load_run(other)
    with pytest.raises(RunFolderError, match="not 'padim'"):
        load_run(fitted_run, expect_model="padim")


def test_runs_record_the_aggregation_border_and_old_runs_keep_theirs(fitted_run: Path, tmp_path: Path):
    config = json.loads((fitted_run / "config.json").read_text())
    assert config["aggregation_border"] == "zeros"
    old = tmp_path / "old"
    shutil.copytree(fitted_run, old)
    del config["aggregation_border"]  # a run written before the field existed
    write_sealed_config(old, config)
    pipeline, loaded = load_run(old)
    assert loaded.aggregation_border == "valid" and pipeline.backbone.aggregation_border == "valid"
    assert pipeline.backbone.pool.count_include_pad is False


def test_padim_pipeline_fits_and_scores(synthetic_dataset: Path, tmp_path: Path):
    from edgead.training import fit_run

    pipeline, config = fit_run(
        synthetic_dataset, tmp_path / "padim", model="padim", image_size=128, progress=False
    )
    metrics = evaluate_run(tmp_path / "padim", out_dir=tmp_path / "report", progress=False)
    assert metrics["image_auroc"] > 0.8
    loaded, _ = load_run(tmp_path / "padim")
    images = torch.rand(1, 3, 128, 128)
    assert np.allclose(pipeline.predict(images)[1].numpy(), loaded.predict(images)[1].numpy())


def test_benchmark_writes_table_and_json(synthetic_dataset: Path, tmp_path: Path):
    from edgead.benchmark import run_benchmark

    out = tmp_path / "bench.md"
    rows = run_benchmark(
        [synthetic_dataset],
        ["padim"],
        out,
        runs_dir=tmp_path / "runs",
        image_size=96,
        layer_sets=[None, (2,)],
        latency_images=2,
        progress=False,
        command="edgead benchmark (test)",
    )
    assert [row["layers"] for row in rows] == ["2,3", "2"]
    assert all(row["backbone_ms"] > 0 and row["head_ms"] > 0 for row in rows)
    table = out.read_text()
    assert "edgead benchmark (test)" in table and table.count("| parts |") == 2
    assert json.loads(out.with_suffix(".json").read_text())[0]["model"] == "padim"


def test_threshold_from_a_separate_folder_of_good_images(synthetic_dataset: Path, tmp_path: Path):
    """With --validation, every training image is fitted and the threshold comes from the other folder."""
    from edgead.training import fit_run

    held_out = tmp_path / "line_recording" / "good"
    held_out.mkdir(parents=True)
    for image in sorted((synthetic_dataset / "test" / "good").glob("*.png"))[:5]:
        shutil.copy(image, held_out / image.name)
    _, config = fit_run(
        synthetic_dataset, tmp_path / "run", model="padim", image_size=64, pretrained=False, progress=False,
        validation_dataset=held_out.parent,
    )
    assert config.extra["n_train"] == len(list((synthetic_dataset / "train" / "good").glob("*.png")))
    assert config.extra["n_validation"] == 5
    with pytest.raises(DatasetError, match="--validation: .* has no images"):
        fit_run(synthetic_dataset, tmp_path / "run2", model="padim", image_size=64, pretrained=False,
                progress=False, validation_dataset=tmp_path / "run")
    assert not (tmp_path / "run2").exists()  # checked before any work
