"""Report files are written, readable and well-formed."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from edgead.reporting import (
    SCORE_COLUMNS,
    markdown_table,
    overlay_heatmap,
    save_heatmap_examples,
    save_pixel_roc_plot,
    save_roc_plot,
    write_metrics_json,
    write_scores_csv,
)


def assert_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(0)
    n = 10
    images = rng.integers(60, 200, size=(n, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((n, 32, 32), bool)
    masks[5:, 8:16, 10:20] = True
    maps = rng.random((n, 32, 32)) + masks
    labels = masks.reshape(n, -1).any(axis=1)
    scores = maps.reshape(n, -1).max(axis=1)
    return images, maps, masks, scores, labels


def test_write_scores_csv(tmp_path):
    rows = [
        {"path": "a.png", "label": 0, "defect_type": "good", "score": np.float32(0.25),
         "normalized_score": 0.4, "decision": False},
        {"path": "b.png", "label": 1, "defect_type": "crack", "score": 1.5,
         "normalized_score": 0.9, "decision": True, "latency_ms": 3.2},
    ]  # fmt: skip
    path = write_scores_csv(tmp_path / "out" / "scores.csv", rows)
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == [*SCORE_COLUMNS, "latency_ms"]
    assert SCORE_COLUMNS == ["path", "label", "defect_type", "score", "normalized_score", "decision"]
    assert read[0]["score"] == "0.25" and read[0]["latency_ms"] == ""
    assert read[1]["defect_type"] == "crack" and read[1]["decision"] == "True"


def test_write_metrics_json_is_nan_safe(tmp_path):
    metrics = {"image_auroc": float("nan"), "aupro": np.float64(0.8), "n": np.int64(3), "curve": np.arange(3)}
    path = write_metrics_json(tmp_path / "metrics.json", metrics)
    data = json.loads(path.read_text())
    assert data == {"image_auroc": None, "aupro": 0.8, "n": 3, "curve": [0, 1, 2]}


def test_roc_plots_are_png(tmp_path, synthetic):
    _, maps, masks, scores, labels = synthetic
    assert_png(save_roc_plot(tmp_path / "roc.png", labels, scores, "image ROC"))
    assert_png(save_pixel_roc_plot(tmp_path / "pixel_roc.png", masks, maps, "pixel ROC", max_points=50))
    # a single class gives an explanatory image, not an exception
    assert_png(save_roc_plot(tmp_path / "single.png", np.zeros(4), np.arange(4.0), "one class"))


def test_overlay_heatmap_shape_and_dtype():
    image = np.full((48, 64, 3), 128, np.uint8)
    amap = np.zeros((12, 16), np.float32)
    amap[6:, 8:] = 1.0  # different size: resized to the image
    out = overlay_heatmap(image, amap, vmin=0.0, vmax=1.0)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0, 0], image[0, 0])  # value at vmin: image unchanged
    r, g, b = out[-1, -1].astype(int)
    assert r > g and r > b  # value at vmax: red
    gray = overlay_heatmap(np.zeros((8, 8), np.uint8), np.ones((8, 8)), 0.0, 1.0)
    assert gray.shape == (8, 8, 3)


def test_save_heatmap_examples(tmp_path, synthetic):
    images, maps, masks, scores, labels = synthetic
    threshold = float(np.median(scores))
    out = tmp_path / "ex"
    paths = save_heatmap_examples(out, images, maps, masks, scores, labels, threshold, max_examples=4)
    assert len(paths) == 4 and len(set(paths)) == 4
    for path in paths:
        assert_png(path)
    kinds = {p.name.split("_", 1)[1].rsplit("_", 1)[0] for p in paths}
    assert len(kinds) >= 2  # a mix, not only the top scores
    few = save_heatmap_examples(tmp_path / "few", images[:3], maps[:3], None, scores[:3], labels[:3], None)
    assert len(few) == 3


def test_markdown_table():
    rows = [{"model": "patchcore", "auroc": 0.98765, "ms": 12}, {"model": "padim|x", "auroc": None, "ms": 7}]
    table = markdown_table(rows, ["model", "auroc", "ms"])
    lines = table.strip().split("\n")
    assert lines[0] == "| model | auroc | ms |"
    assert lines[1] == "| --- | ---: | ---: |"
    assert lines[2] == "| patchcore | 0.988 | 12 |"
    assert lines[3] == "| padim\\|x | - | 7 |"


def test_benchmark_compare_rows_are_checked_and_filtered(tmp_path):
    from edgead.benchmark import BenchmarkReport, earlier_rows
    from edgead.errors import UsageError

    page = tmp_path / "earlier.json"
    page.write_text(json.dumps([
        {"dataset": "bottle", "model": "padim", "layers": "2,3", "image_auroc": 1.0},
        {"dataset": "bottle", "model": "padim", "layers": "2,3,4", "image_auroc": 0.99},
        {"dataset": "screw", "model": "padim", "layers": "2,3", "image_auroc": 0.9},
    ]))  # fmt: skip
    rows = earlier_rows([page], {"bottle"})
    assert [r["layers"] for r in rows] == ["2,3", "2,3,4"] and rows[0]["source"] == "earlier.json"
    for bad in ("not json", json.dumps({"dataset": "bottle"}), json.dumps([{"model": "padim"}])):
        page.write_text(bad)
        with pytest.raises(UsageError, match="--compare"):
            earlier_rows([page], {"bottle"})
    report = BenchmarkReport(tmp_path / "out.md", ["student"], "efficientnet_lite0", 256, "cmd", [], ["torch"], False)
    report.earlier = rows
    report.rows = [{"dataset": "bottle", "model": "student", "layers": "2,3", "image_auroc": 0.99}]
    report.write()
    text = (tmp_path / "out.md").read_text()
    assert "earlier measurements" in text and "earlier.json" in text
    assert "0.990" not in text.split("## Beside")[1]  # the 2,3,4 row is not shown beside a 2,3 benchmark
