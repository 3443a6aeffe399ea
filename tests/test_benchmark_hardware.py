"""The hardware view of `edgead benchmark`: Pareto front, energy estimates, CSV and plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from edgead.deploy.budget import load_devices
from edgead.hardware import energy_column, energy_estimates, hardware_columns, pareto_front


def test_pareto_front_keeps_only_undominated_points_by_latency():
    points = [
        (10.0, 0.90),  # 0: front
        (5.0, 0.80),  # 1: front (fastest)
        (20.0, 0.95),  # 2: front (most accurate)
        (12.0, 0.85),  # 3: dominated by 0 (slower, less accurate)
        (20.0, 0.90),  # 4: dominated by 2 (same latency, lower AUROC) and by 0
        (10.0, 0.90),  # 5: tie with 0: neither dominates, both kept
        (30.0, 0.95),  # 6: dominated by 2 (same AUROC, slower)
    ]
    assert pareto_front(points) == [1, 0, 5, 2]


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.5)]) == [0]
    # A missing or non-finite value is never on the front, and dominates nothing.
    assert pareto_front([(1.0, None), (2.0, 0.7), (math.nan, 0.99), (3.0, math.inf)]) == [1]


def test_energy_estimate_is_gmacs_over_gmac_per_joule_in_millijoules():
    devices = load_devices()
    energy = energy_estimates(2.0, devices)
    assert set(energy) == {energy_column(name) for name in devices}
    # Sony IMX500: 2485 GMAC/J -> 2 GMAC cost 2 / 2485 J = 0.805 mJ.
    assert energy["energy_mj_imx500"] == pytest.approx(2.0 / 2485 * 1e3)
    assert energy["energy_mj_coral"] == pytest.approx(2.0)  # 1000 GMAC/J
    assert energy["energy_mj_jetson_nano"] == pytest.approx(2.0 / 23.6 * 1e3)
    for name, device in devices.items():
        assert energy[energy_column(name)] == pytest.approx(2.0 / device["gmacs_per_joule"]["value"] * 1e3)
    assert all(value is None for value in energy_estimates(None, devices).values())


def test_benchmark_hardware_view_writes_csv_plot_and_report(synthetic_dataset: Path, tmp_path: Path):
    from edgead.benchmark import run_benchmark

    out = tmp_path / "report" / "bench.md"
    rows = run_benchmark(
        [synthetic_dataset],
        ["padim", "patchcore"],
        out,
        runs_dir=tmp_path / "runs",
        image_size=64,
        latency_images=2,
        progress=False,
        hardware=True,
    )
    assert len(rows) == 2
    with (out.parent / "hardware_benchmark.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == hardware_columns()
        records = list(reader)
    assert len(records) == 2
    record = records[0]
    assert (record["dataset"], record["model"], record["runtime"]) == ("parts", "padim", "torch")
    positive = ["latency_p50_ms", "latency_p95_ms", "fps", "throughput_ips", "params_m", "gmacs", "file_mb"]
    positive += ["peak_rss_mb", *[energy_column(name) for name in load_devices()]]
    for one in records:
        for column in positive:
            value = float(one[column])
            assert math.isfinite(value) and value > 0, column
        assert float(one["model_rss_mb"]) >= 0
        assert 0 <= float(one["image_auroc"]) <= 1
    assert float(record["fps"]) == pytest.approx(1000 / float(record["latency_p50_ms"]))
    # Two models: the front is what the CSV's own latency and AUROC say it is (one of them at least).
    points = [(float(r["latency_p50_ms"]), float(r["image_auroc"])) for r in records]
    expected = set(pareto_front(points))
    assert {i for i, r in enumerate(records) if r["on_pareto_front"] == "True"} == expected and expected
    assert Path(record["file"]).name == "model.safetensors"
    assert (out.parent / "accuracy_vs_latency.png").stat().st_size > 0
    report = out.read_text()
    assert "## Hardware view" in report and "ESTIMATE" in report
