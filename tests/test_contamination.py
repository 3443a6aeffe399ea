"""Contaminated training sets: the data operation, the experiment's report and its command."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from edgead.data.contamination import anomalous_share, contaminate
from edgead.data.datasets import AnomalyDataset, Sample
from edgead.errors import DatasetError
from edgead.experiments.contamination import run_contamination, scored_test_sets


def make_dataset(defects: dict[str, int]) -> AnomalyDataset:
    """An in-memory dataset (no files): 20 train, 5 good test, then the given defects per type."""
    train = [Sample(Path(f"train/{i}.png"), 0, "good") for i in range(20)]
    test = [Sample(Path(f"test/good/{i}.png"), 0, "good") for i in range(5)]
    for defect_type, count in defects.items():
        test += [Sample(Path(f"test/{defect_type}/{i}.png"), 1, defect_type) for i in range(count)]
    return AnomalyDataset("toy", Path("toy"), "mvtec", train, test)


def test_contaminate_moves_a_stratified_share_from_test_to_train():
    data = make_dataset({"a": 6, "b": 3, "c": 1})
    mixed = contaminate(data, 0.3, seed=0)
    moved = mixed.train[len(data.train) :]
    # round(0.3 x 10) = 3, split over types by largest remainder: a 1.8 -> 2, b 0.9 -> 1, c 0.3 -> 0.
    assert Counter(s.defect_type for s in moved) == {"a": 2, "b": 1}
    assert all(s.label == 1 for s in moved)
    assert mixed.train[: len(data.train)] == data.train  # train only grows at its end
    assert not set(moved) & set(mixed.test)
    assert [s for s in data.test if s not in moved] == mixed.test  # test order kept
    assert anomalous_share(mixed.train) == pytest.approx(3 / 23)
    assert len(data.train) == 20 and len(data.test) == 15  # the input is left as it was


def test_contaminate_is_seeded():
    data = make_dataset({"a": 6, "b": 6})
    assert contaminate(data, 0.5, seed=3) == contaminate(data, 0.5, seed=3)
    picks = {tuple(s.path for s in contaminate(data, 0.5, seed=seed).train[20:]) for seed in range(6)}
    assert len(picks) > 1


def test_larger_ratios_move_the_same_images_and_more():
    data = make_dataset({"a": 7, "b": 5, "c": 2})
    moved = [set(contaminate(data, ratio, seed=1).train[20:]) for ratio in (0.0, 0.1, 0.2, 0.5, 0.7)]
    assert all(small <= large for small, large in zip(moved, moved[1:], strict=False))
    assert [len(m) for m in moved] == [0, 1, 3, 7, 10]


def test_scored_test_sets_shared_or_per_ratio():
    data = make_dataset({"a": 10})
    shared = scored_test_sets(data, [0.0, 0.2, 0.5], seed=0, same_test_set=True)
    assert shared[0] == shared[1] == shared[2] == contaminate(data, 0.5).test
    per_ratio = scored_test_sets(data, [0.0, 0.2, 0.5], seed=0, same_test_set=False)
    assert [len(t) for t in per_ratio] == [15, 13, 10]


def test_ratio_zero_is_an_equivalent_copy():
    data = make_dataset({"a": 4})
    same = contaminate(data, 0.0)
    assert same == data and same.train is not data.train and same.test is not data.test


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 0.96])
def test_contaminate_rejects_bad_ratios(ratio: float):
    # 0.96 x 10 rounds to 10: every anomalous test image would move and none would be left to test.
    with pytest.raises(DatasetError, match="ratio"):
        contaminate(make_dataset({"a": 10}), ratio)


def test_contaminate_needs_anomalous_test_images():
    with pytest.raises(DatasetError, match="no anomalous test images"):
        contaminate(make_dataset({}), 0.1)


def test_run_contamination_writes_table_json_and_plot(synthetic_dataset: Path, tmp_path: Path):
    out = tmp_path / "report" / "contamination.md"
    rows = run_contamination(
        [synthetic_dataset],
        [0.0, 0.5],
        out,
        model="padim",
        runs_dir=tmp_path / "runs",
        image_size=64,
        progress=False,
        command="test",
    )
    assert [row["n_contaminated"] for row in rows] == [0, 4]  # half of the 8 defective test images
    assert [row["n_test"] for row in rows] == [12, 12]  # what neither ratio moved
    assert rows[1]["train_anomalous_share"] == pytest.approx(4 / 34)
    assert all(row["image_auroc"] is not None and row["pixel_auroc"] is not None for row in rows)
    text = out.read_text()
    assert "## parts" in text and "share of the anomalous test images" in text
    assert (out.parent / "contamination_parts.png").stat().st_size > 0
    assert len(json.loads(out.with_suffix(".json").read_text())) == 2


def edgead(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgead", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_cli_help_and_bad_ratio(synthetic_dataset: Path, tmp_path: Path):
    result = edgead("experiment", "contamination", "--help")
    assert result.returncode == 0 and "--ratios" in result.stdout
    result = edgead(
        "experiment", "contamination", synthetic_dataset, "--ratios", "0,1.5", "--out", tmp_path / "r.md"
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "ratio" in result.stderr
