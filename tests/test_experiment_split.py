"""`edgead experiment split` end to end on the synthetic dataset (real server, real client), and its checks."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from edgead.edge.payload import HEADER_SIZE
from edgead.errors import DatasetError, EdgeadError, OutputError, UsageError
from edgead.experiments.split import (
    CURVE_BANDWIDTHS,
    FRAMES_CSV,
    SERVER_LOG,
    pick_samples,
    run_split_experiment,
    running_server,
    server_backbone_problem,
)

MODES = ["image", "features", "pq"]


def _broken_dataset(root: Path) -> Path:
    for folder in ("train/good", "test/good"):
        (root / folder).mkdir(parents=True)
        (root / folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return root


def test_split_end_to_end(synthetic_dataset: Path, tmp_path: Path) -> None:
    from edgead.data.datasets import open_dataset
    from edgead.inference import predict_samples
    from edgead.metrics import image_auroc, pixel_auroc
    from edgead.runs import load_run

    out = tmp_path / "report" / "edge.md"
    runs = tmp_path / "runs"
    warnings: list[str] = []
    with pytest.raises(EdgeadError, match=r"1 dataset\(s\) failed \(broken;"):
        run_split_experiment([synthetic_dataset, _broken_dataset(tmp_path / "broken")], out, modes=MODES,
                             runs_dir=runs, image_size=64, max_images=10, server_backbone="wide_resnet50_2",
                             progress=False, command="edgead test", warn=warnings.append)
    assert len(warnings) == 1 and "wide_resnet50_2 skipped" in warnings[0]

    # The finished dataset is written, the failed one reported.
    text = out.read_text()
    assert text.startswith("# Edge/server split") and "`edgead test`" in text and "## Failed" in text
    assert "| broken |" in text and "total_change_vs_image_pct" in text
    assert "--server-backbone wide_resnet50_2 skipped" in text
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {row["mode"]: row for row in data["rows"]}
    assert list(rows) == MODES and all(row["dataset"] == "parts" for row in rows.values())
    assert [f["dataset"] for f in data["failures"]] == ["broken"]
    for row in rows.values():
        assert row["n_images"] == 10 and row["n_failed"] == 0 and row["first_error"] is None
        assert row["edge_ms"] > 0 and row["server_ms"] > 0
        assert row["link_ms"] == pytest.approx(row["payload_bytes"] / 100.0)  # 100 kB/s, fixed-size payloads
        assert row["total_ms"] >= row["link_ms"]
        assert 0 <= row["image_auroc"] <= 1 and 0 <= row["pixel_auroc"] <= 1 and 0 < row["pixel_f1"] <= 1
    # Payload sizes: 64 px RGB; float16 features [152, 8, 8]; PQ at 19 one-byte codes per position.
    assert rows["image"]["payload_bytes"] == HEADER_SIZE + 64 * 64 * 3
    assert rows["pq"]["payload_bytes"] < rows["image"]["payload_bytes"] < rows["features"]["payload_bytes"]
    assert rows["image"]["total_change_vs_image_pct"] == 0 and rows["features"]["payload_change_vs_features_pct"] == 0
    assert rows["pq"]["payload_change_vs_features_pct"] == pytest.approx(
        100 * (rows["pq"]["payload_bytes"] / rows["features"]["payload_bytes"] - 1))
    assert "payload_change_vs_features_pct" not in rows["image"]

    # The image mode through the server scores exactly what the run scores locally (maps within float16).
    run_dir = runs / "patchcore_efficientnet_lite0_64_parts"
    samples = pick_samples(open_dataset(synthetic_dataset).test, 10)
    local = predict_samples(load_run(run_dir)[0], samples, progress=False)
    assert rows["image"]["image_auroc"] == pytest.approx(image_auroc(local.labels, local.scores))
    assert rows["image"]["pixel_auroc"] == pytest.approx(pixel_auroc(local.masks, local.maps), abs=2e-3)
    frames = (run_dir / FRAMES_CSV).read_text().splitlines()
    assert len(frames) == 1 + 10 * len(MODES) and (run_dir / SERVER_LOG).is_file()

    # Bandwidth curve: at the table's 100 kB/s it gives the table's total; it falls as bandwidth grows.
    curve = data["bandwidth_curves"]["parts"]
    assert curve["bandwidth_bytes_per_s"] == pytest.approx(CURVE_BANDWIDTHS.tolist())
    at_100k = int(np.argmin(np.abs(CURVE_BANDWIDTHS - 1e5)))
    for mode, totals in curve["total_ms"].items():
        assert totals[at_100k] == pytest.approx(rows[mode]["total_ms"])
        assert totals == sorted(totals, reverse=True)
    for name in ("edge_f1_vs_payload.png", "edge_total_vs_bandwidth.png"):
        assert f"]({name})" in text
        with Image.open(out.parent / name) as plot:
            assert plot.format == "PNG" and plot.width > 300

    # The server is stopped when its block ends, also on an error.
    with pytest.raises(RuntimeError, match="stop"), running_server({"edge": run_dir}, tmp_path / "s.log") as url:
        assert httpx.get(f"{url}/healthz").json()["models"] == ["edge"]
        raise RuntimeError("stop")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_options_are_checked_before_any_work(tmp_path: Path) -> None:
    missing = [tmp_path / "no_dataset"]
    runs = tmp_path / "runs"
    out = tmp_path / "r.md"
    bad = [
        (UsageError, "unknown mode", {"modes": ["image", "jpeg"]}),
        (UsageError, "each mode once", {"modes": ["pq", "pq"]}),
        (UsageError, "each mode once", {"modes": []}),
        (UsageError, "above zero", {"bandwidth": "0kB/s"}),
        (UsageError, "not a rate", {"bandwidth": "fast"}),
        (UsageError, "latency", {"latency_ms": -1}),
        (UsageError, "ratio", {"ratio": 0.0}),
        (UsageError, "quality", {"quality": 101}),
        (UsageError, "max-images", {"max_images": 0}),
        (UsageError, "workers", {"workers": 0}),
        (UsageError, "backbone", {"server_backbone": "resnet9000"}),
        (UsageError, "should end in .md", {"out_markdown": tmp_path / "r.txt"}),
    ]
    for error, message, options in bad:
        with pytest.raises(error, match=message):
            run_split_experiment(missing, **{"out_markdown": out, "runs_dir": runs, **options})
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="--runs-dir"):
        run_split_experiment(missing, out, runs_dir=tmp_path / "a_file")
    with pytest.raises(DatasetError, match="does not exist"):  # options fine: the dataset is checked next
        run_split_experiment(missing, out, runs_dir=runs, modes="image,webp")
    assert not runs.exists() and not out.exists()


def test_cli_split_parses_and_calls(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgead.cli import app

    result = CliRunner().invoke(app, ["experiment", "split", str(tmp_path), "--modes", "image,bogus",
                                      "--out", str(tmp_path / "r.md")])
    assert isinstance(result.exception, UsageError) and "bogus" in str(result.exception)


def test_server_backbone_without_weights_is_named() -> None:
    assert server_backbone_problem("efficientnet_lite0") is None
    assert "wide_resnet50_2" in server_backbone_problem("wide_resnet50_2")  # a file the user passes, never installed


def test_pick_samples_spreads_over_the_list() -> None:
    assert pick_samples(list(range(10)), None) == list(range(10))
    assert pick_samples(list(range(10)), 3) == [0, 4, 9]
    assert pick_samples(list(range(3)), 10) == [0, 1, 2]
