"""The hardware view of `edgead benchmark`: what each model costs to run, next to how well it detects.

Per benchmark row (dataset x model x runtime) it adds peak memory, frames per second and an energy
estimate per device profile, and writes ``hardware_benchmark.csv`` plus an accuracy-vs-latency plot
with the Pareto front, so that the best trade-offs across models and runtimes can be read off at once.

Column meanings (also written into the markdown report, see :data:`HARDWARE_NOTES`):

- latency_p50_ms / latency_p95_ms: whole model per image at batch 1, measured on THIS machine
  (:func:`edgead.latency.measure_end_to_end`); fps = 1000 / latency_p50_ms; throughput_ips: images per
  second at batch 16.
- params_m, gmacs: :func:`edgead.profiling.model_profile` (MACs of one image, kNN search included).
- file_mb: the model file that was run (model.safetensors for torch, the .onnx or OpenVINO .xml + .bin).
- peak_rss_mb: peak resident memory (VmHWM on Linux) of a fresh Python process that only loads this row's
  model and runs it at batch 1 and batch 16; it includes the interpreter, torch and the runtime
  library. model_rss_mb: how much that peak rose above the process's peak before the model was loaded
  (model, runtime library and inference buffers).
- energy_mj_<device> (device name with "-" as "_"): an ESTIMATE, not a measurement: gmacs / the
  device's GMAC per joule from ``deploy/devices.json`` x 1000 = millijoules per image for the
  accelerator alone at its peak efficiency. It counts MACs only, so it is the same for every runtime
  of a model.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.deploy.budget import load_devices
from edgead.errors import EdgeadError
from edgead.reporting import _prepare, new_figure, write_csv

HARDWARE_CSV = "hardware_benchmark.csv"
ACCURACY_PLOT = "accuracy_vs_latency.png"
# CSV column -> key in a benchmark row, where the two names differ.
RENAMED = {"latency_p50_ms": "p50_ms", "latency_p95_ms": "p95_ms", "throughput_ips": "ips_b16"}


def energy_column(device: str) -> str:
    """``energy_mj_<device>``, with "-" as "_" so that the name is an identifier (jetson-nano)."""
    return "energy_mj_" + device.replace("-", "_")


def energy_estimates(gmacs: float | None, devices: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Millijoules per image per device profile: gmacs / (GMAC per joule) x 1000. An estimate from MACs."""
    devices = load_devices() if devices is None else devices
    return {
        energy_column(name): None if gmacs is None else gmacs / device["gmacs_per_joule"]["value"] * 1e3
        for name, device in devices.items()
    }


def hardware_columns(devices: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The CSV's columns, one energy column per device profile."""
    devices = load_devices() if devices is None else devices
    return [
        "dataset",
        "model",
        "runtime",
        "image_auroc",
        "pixel_auroc",
        "latency_p50_ms",
        "latency_p95_ms",
        "fps",
        "throughput_ips",
        "params_m",
        "gmacs",
        "file_mb",
        "peak_rss_mb",
        "model_rss_mb",
        *[energy_column(name) for name in devices],
        "on_pareto_front",
        "backbone",
        "image_size",
        "threads",
        "file",
    ]


HARDWARE_NOTES = [
    "latency_p50_ms / latency_p95_ms: whole model per image at batch 1, measured on the machine above "
    "(not on the devices); fps = 1000 / latency_p50_ms; throughput_ips: images per second at batch 16.",
    "file_mb: the model file that was run (model.safetensors for torch, the .onnx file, or the OpenVINO .xml + .bin).",
    "peak_rss_mb: peak resident memory (VmHWM) of a fresh process that loads only this row's model and "
    "runs it at batch 1 and 16; it includes Python, torch and the runtime library. model_rss_mb: the rise of "
    "that peak over the process's peak before the model was loaded.",
    "energy_mj_<device>: ESTIMATE, not a measurement: gmacs / the device's GMAC per joule "
    "(src/edgead/deploy/devices.json, peak efficiency of the accelerator alone) x 1000, in millijoules per "
    "image; from MACs only, so equal across the runtimes of a model.",
    "on_pareto_front: no other model/runtime of the same dataset has both a lower-or-equal latency_p50_ms "
    "and a higher-or-equal image AUROC (see accuracy_vs_latency.png).",
]


# ------------------------------------------------------------------------------------- peak memory


def _max_rss_mb() -> float:
    """This process's peak resident set so far, in MB.

    On Linux this is VmHWM from /proc/self/status: the high-water mark of this process's own
    address space, which starts afresh at exec. ru_maxrss is not used there because exec carries
    over the parent's peak: a child started by a large benchmark process would report the parent's.
    Elsewhere ru_maxrss is the fallback (macOS reports it in bytes).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def _run_model(path: str, runtime: str, images_file: str) -> dict[str, float]:
    """In the child process: load the model, run it at batch 1 and 16, report latency and the peaks."""
    from edgead.deploy.runtimes import load_inferencer
    from edgead.latency import measure_end_to_end

    images = torch.from_numpy(np.load(images_file))
    before = _max_rss_mb()
    model = load_inferencer(path, runtime)
    # A first full pass (batch 1 and 16) warms allocator and kernel caches: PyTorch eager's first 40
    # single images in a fresh process ran at twice its steady-state latency.
    measure_end_to_end(model, images, repeats=1)
    timing = measure_end_to_end(model, images, repeats=1)
    peak = _max_rss_mb()
    return {"p50_ms": timing["p50_ms"], "peak_rss_mb": peak, "model_rss_mb": peak - before}


def measure_in_fresh_process(path: str | Path, runtime: str, images: torch.Tensor) -> dict[str, float]:
    """Median latency at batch 1 and peak memory of one model, alone in a fresh process.

    A process's peak only ever grows, and allocators keep freed memory, so in-process numbers would
    mix rows; a child process per row gives each model its own peak. It also keeps other runtimes'
    worker threads (which spin for a while after each call) from competing for the cores while this
    one is timed. See the module docstring.
    """
    with tempfile.TemporaryDirectory() as tmp:
        images_file = Path(tmp) / "images.npy"
        np.save(images_file, images.numpy())
        code = [sys.executable, "-m", "edgead.hardware", str(path), runtime, str(images_file)]
        result = subprocess.run(code, capture_output=True, text=True)
    if result.returncode != 0:
        raise EdgeadError(f"measuring the memory of {path} on {runtime} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def hardware_measurements(row: dict[str, Any], images: torch.Tensor) -> dict[str, Any]:
    """The hardware view's additions to one benchmark row that already has p50_ms and gmacs."""
    path = row["run_dir"] if row["runtime"] == "torch" else row["file"]
    return {
        "fps": 1000.0 / row["p50_ms"],
        **{
            key: value
            for key, value in measure_in_fresh_process(
                path, row["runtime"].removesuffix("-int8"), images
            ).items()
            if key != "p50_ms"
        },
        **energy_estimates(row.get("gmacs")),
    }


# ----------------------------------------------------------------------------------- Pareto front


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point beats, by increasing latency.

    A point is dominated when another has lower-or-equal latency and higher-or-equal accuracy and
    differs from it; identical points are therefore all kept. Points with a missing or non-finite
    value are never on the front.
    """

    def usable(p: tuple[float, float]) -> bool:
        return all(v is not None and math.isfinite(v) for v in p)

    candidates = [i for i, p in enumerate(points) if usable(p)]

    def dominated(i: int) -> bool:
        x, y = points[i]
        return any(points[j][0] <= x and points[j][1] >= y and tuple(points[j]) != (x, y) for j in candidates)

    front = [i for i in candidates if not dominated(i)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _by_dataset(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["dataset"], []).append(record)
    return groups


def _points(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(r.get("latency_p50_ms"), r.get("image_auroc")) for r in records]


# -------------------------------------------------------------------------------------- outputs


def hardware_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Benchmark rows in the CSV's columns, with ``on_pareto_front`` set within each dataset."""
    columns = hardware_columns()
    records = [{c: row.get(RENAMED.get(c, c)) for c in columns} for row in rows]
    for group in _by_dataset(records).values():
        front = set(pareto_front(_points(group)))
        for i, record in enumerate(group):
            record["on_pareto_front"] = i in front
    return records


def write_hardware_csv(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """One line per (dataset, model, runtime); empty cells where a value is missing."""
    return write_csv(path, records, hardware_columns())


def save_accuracy_latency_plot(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Image AUROC against p50 latency (log scale), one panel per dataset, Pareto front as a step line.

    Markers tell models apart, colours runtimes; the front's points are labelled model/runtime.
    """
    from matplotlib.lines import Line2D

    path = _prepare(path)
    groups = _by_dataset(records)
    models = list(dict.fromkeys(r["model"] for r in records))
    runtimes = list(dict.fromkeys(r["runtime"] for r in records))
    markers = dict(zip(models, "osD^vPX*<>", strict=False))
    colours = {runtime: f"C{i % 10}" for i, runtime in enumerate(runtimes)}
    columns = min(len(groups), 3) or 1
    panel_rows = max(1, math.ceil(len(groups) / columns))
    legend_columns = 3 * columns
    legend_height = 0.3 + 0.25 * math.ceil((len(models) + len(runtimes) + 1) / legend_columns)  # inches
    height = 4 * panel_rows + legend_height
    fig = new_figure(5 * columns, height)
    for k, (dataset, group) in enumerate(groups.items()):
        ax = fig.add_subplot(panel_rows, columns, k + 1)
        points = _points(group)
        for record, (x, y) in zip(group, points, strict=True):
            if x is None or y is None:
                continue
            ax.scatter(x, y, marker=markers.get(record["model"], "o"), color=colours[record["runtime"]], s=40)
        front = pareto_front(points)
        if front:
            xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
            ax.step(xs, ys, where="post", color="0.3", linestyle="--", linewidth=1)
            for i in front:
                label = f"{group[i]['model']}/{group[i]['runtime']}"
                ax.annotate(label, points[i], textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set(xlabel="latency p50 (ms per image, batch 1, log scale)", ylabel="image AUROC", title=dataset)
        ax.grid(alpha=0.3, which="both")
    handles = [
        *[Line2D([], [], linestyle="", marker=markers.get(m, "o"), color="0.4", label=m) for m in models],
        *[Line2D([], [], linestyle="", marker="s", color=colours[r], label=r) for r in runtimes],
        Line2D([], [], color="0.3", linestyle="--", label="Pareto front"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=legend_columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    fig.savefig(path)
    return path


if __name__ == "__main__":  # the child process of measure_in_fresh_process
    print(json.dumps(_run_model(*sys.argv[1:4])))
