"""`edgead experiment split`: every edge/server split mode through the real scoring server, in one report.

Per dataset: fit (or reuse) a PatchCore run with its PQ codebook, export its edge part, start `edgead
serve` as a subprocess on a free loopback port, and send every test image in every mode through the
edge client's own code (:mod:`edgead.edge.client`): resize (+ backbone in feature modes, ONNX Runtime)
+ encode on the edge, decode + backbone and/or head on the server, both measured; the link is modelled
(payload bytes / bandwidth + latency), so results do not depend on the loopback's speed.

Pixel metrics need the anomaly map at full resolution: the server sends it as raw float16 values at the
input size (``map_format=float16``, 128 kB at 256 px, outside the modelled uplink and outside the
server's timings). The API's 64 x 64 PNG would not do: it is 8-bit, clipped to a band around the
threshold (ties everywhere below it) and 4x coarser than the masks.

Writes one markdown report (the paper's Tables 1-3 as one table), its JSON, and two plots beside it:
pixel F1-max against payload bytes, and total time against bandwidth (10 kB/s to 10 MB/s; the link part
recomputed from each frame's measured payload, the measured edge and server times kept). Each dataset's
frames are also kept in ``RUN/split_frames.csv`` and the server's log in ``RUN/split_server.log``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from edgead.benchmark import expand_datasets, fit_or_reuse
from edgead.data.datasets import ImageDataset, Sample, open_dataset
from edgead.data.images import load_rgb
from edgead.edge.client import (
    EdgeResult,
    Link,
    ScoringClient,
    decode_map,
    parse_bandwidth,
    prepare_codec,
    send_frame,
)
from edgead.edge.codecs import (
    CODECS,
    DEFAULT_QUALITY,
    DEFAULT_RATIO,
    FEATURE_CODECS,
    IMAGE_CODECS,
    WEBP_METHOD,
)
from edgead.errors import DatasetError, EdgeadError, UsageError, WeightsError
from edgead.metrics import image_auroc, pixel_auroc, pixel_f1_max
from edgead.models import create_head
from edgead.outputs import atomic_file, atomic_write_text, check_output_file, check_work_dir
from edgead.progress import progress as progress_bar
from edgead.reporting import markdown_table, new_figure, results_header
from edgead.training import FitSettings

MODEL = "patchcore"
EDGE_MODEL, SERVER_MODEL = "edge", "server"  # names of the two runs on the server
WEBP_MODEL = "webp"  # the image-mode run fitted on training images after the same WebP round trip
LOOPBACK = "127.0.0.1"
SERVER_START_S = 180.0
FRAMES_CSV, SERVER_LOG = "split_frames.csv", "split_server.log"
CURVE_BANDWIDTHS = np.logspace(4, 7, 31)  # bytes/s: 10 kB/s .. 10 MB/s, 10 points a decade (100 kB/s is one)
MEDIAN_KEYS = ("payload_bytes", "edge_ms", "link_ms", "server_ms", "total_ms", "http_ms")
POINT_KEYS = ("image_auroc", "pixel_auroc", "pixel_f1")  # changes in points (x 100)
PERCENT_KEYS = {"payload_bytes": "payload", "edge_ms": "edge", "link_ms": "link", "server_ms": "server",
                "total_ms": "total"}  # changes in percent
COLUMNS = [
    "dataset", "mode", "backbone", "image_auroc", "pixel_auroc", "pixel_f1", "payload_bytes",
    "edge_ms", "link_ms", "server_ms", "total_ms",
    "image_auroc_change_vs_image_pts", "pixel_f1_change_vs_image_pts", "payload_change_vs_image_pct",
    "total_change_vs_image_pct", "image_auroc_change_vs_features_pts", "pixel_f1_change_vs_features_pts",
    "payload_change_vs_features_pct", "total_change_vs_features_pct", "n_failed",
]
MARKERS = dict(zip(CODECS, "osD^v<>", strict=True))
COLOURS = {mode: f"C{i}" for i, mode in enumerate(CODECS)}


@dataclass
class SplitSettings:
    """The experiment's options, checked once before any work."""

    modes: list[str]
    link: Link
    bandwidth_text: str
    image_size: int
    backbone: str
    server_backbone: str | None  # None: the image modes use the edge run too
    ratio: float
    quality: int
    seed: int
    max_images: int | None
    workers: int
    reuse_runs: bool
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    webp_fit: bool = True  # score webp with a run fitted on WebP-round-tripped training images

    def check(self) -> None:
        """The options the constructor's arguments did not check already (modes and link are)."""
        if not 0 < self.ratio <= 1 or not 0 <= self.quality <= 100:
            raise UsageError(
                f"--ratio must be in (0, 1] and --quality in 0..100, got {self.ratio} and {self.quality}")
        if self.max_images is not None and self.max_images < 1:
            raise UsageError(f"--max-images must be at least 1, got {self.max_images}")
        if not 1 <= self.workers <= 64:
            raise UsageError(f"--workers must be 1..64, got {self.workers}")
        for name in dict.fromkeys(b for b in (self.backbone, self.server_backbone) if b is not None):
            FitSettings.check(model=MODEL, backbone=name, image_size=self.image_size, layers=None,
                              validation_fraction=0.1, threshold_quantile=0.99, seed=self.seed, batch_size=16,
                              aggregation_border=None)
        create_head(MODEL, **self.hyperparameters)

    def settle_server_backbone(self, warn: Callable[[str], None] | None) -> str:
        """Drop a server backbone whose weights are not installed (telling ``warn``); the report's note on it."""
        same = f"Image modes (image, webp) are scored by the same run as the feature modes ({self.backbone})."
        wanted, self.server_backbone = self.server_backbone, None
        if wanted is None or wanted == self.backbone:
            return same
        problem = server_backbone_problem(wanted)
        if problem is not None:
            if warn is not None:
                warn(f"--server-backbone {wanted} skipped, the image modes use {self.backbone}: {problem}")
            return f"--server-backbone {wanted} skipped: {problem} {same}"
        self.server_backbone = wanted
        return (f"Image modes (image, webp) are scored by a run on the stronger server-side backbone {wanted}; "
                f"feature modes by the edge's {self.backbone} run (its `image` row is the reference of every "
                "*_vs_image change).")

    def as_dict(self) -> dict[str, Any]:
        bandwidth = self.link.bandwidth
        return {"modes": self.modes, "bandwidth": self.bandwidth_text,
                "bandwidth_bytes_per_s": bandwidth if math.isfinite(bandwidth) else None,
                "latency_ms": self.link.latency_ms, "image_size": self.image_size, "backbone": self.backbone,
                "server_backbone": self.server_backbone, "ratio": self.ratio, "quality": self.quality,
                "seed": self.seed, "max_images": self.max_images, "workers": self.workers}


@dataclass
class ModeFrames:
    """One mode's frames on one dataset: the client's rows and the server's maps (float16)."""

    mode: str
    model: str  # the server model that scored them
    results: list[EdgeResult] = field(default_factory=list)
    maps: list[np.ndarray | None] = field(default_factory=list)

    def scored(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if r.error is None]


def check_modes(modes: Sequence[str] | str) -> list[str]:
    """The modes, each known and named once ('image,webp' or a list)."""
    modes = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    unknown = [m for m in modes if m not in CODECS]
    if unknown:
        raise UsageError(f"unknown mode(s) {', '.join(unknown)}: choose from {', '.join(CODECS)}")
    if not modes or len(set(modes)) != len(modes):
        raise UsageError(f"--modes must name each mode once, at least one, from {', '.join(CODECS)}")
    return modes


def server_backbone_problem(name: str) -> str | None:
    """Why ``name``'s pretrained weights cannot be used here, or None when they are installed."""
    from edgead.backbones.weights import resolve_weights_file

    try:
        resolve_weights_file(name)
    except WeightsError as exc:
        return str(exc)
    return None


def pick_samples(samples: Sequence[Sample], count: int | None) -> list[Sample]:
    """``count`` samples spread evenly over the list (which is sorted good first, then defects), or all."""
    if count is None or count >= len(samples):
        return list(samples)
    keep = np.unique(np.linspace(0, len(samples) - 1, count).round().astype(int))
    return [samples[i] for i in keep]


def load_masks(samples: Sequence[Sample], image_size: int) -> np.ndarray | None:
    """Masks [N, S, S] at the input size, or None when an anomalous image has none (no pixel metrics)."""
    if not any(s.label for s in samples) or any(s.label and s.mask_path is None for s in samples):
        return None
    items = ImageDataset(list(samples), image_size)
    return np.stack([items[i]["mask"][0].numpy() > 0.5 for i in range(len(items))])


# --------------------------------------------------------------------------------------------- server


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(runs: dict[str, Path], log_path: Path, workers: int = 1,
                   start_timeout_s: float = SERVER_START_S) -> Iterator[str]:
    """`edgead serve NAME=RUN...` as a subprocess on a free loopback port; yields its URL once /healthz answers.

    The server is stopped when the block ends, also on an error or Ctrl-C: SIGTERM (uvicorn's graceful
    shutdown), then SIGKILL to its own process group after 20 s. Its output goes to ``log_path``.
    """
    port = free_loopback_port()
    named = [f"{name}={Path(run).resolve()}" for name, run in runs.items()]
    command = [sys.executable, "-m", "edgead", "serve", *named, "--host", LOOPBACK, "--port", str(port),
               "--workers", str(workers)]
    url = f"http://{LOOPBACK}:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # Ctrl-C reaches us only; we stop it below
        try:
            _wait_until_ready(process, url, log_path, start_timeout_s)
            yield url
        finally:
            _stop(process)


def _wait_until_ready(process: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as http:
        while True:
            if process.poll() is not None:
                tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
                raise EdgeadError(
                    f"the scoring server exited (code {process.returncode}) before it was ready: {tail}")
            try:
                if http.get(f"{url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise EdgeadError(f"the scoring server did not answer {url}/healthz within {timeout_s:g} s; "
                                  f"its log: {log_path}")
            time.sleep(0.2)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the server and its workers, nothing else
        process.wait()


# ---------------------------------------------------------------------------------------- measuring


def prepare_runs(label: str, dataset: Path, settings: SplitSettings, runs_dir: Path,
                 progress: bool) -> dict[str, Path]:
    """The edge run (with its PQ codebook and exported edge part) and, if asked, the server-backbone run."""
    from edgead.edge.backbone import export_edge
    from edgead.edge.pq import load_run_codebook, train_codebook

    runs: dict[str, Path] = {}
    for name, backbone in ((EDGE_MODEL, settings.backbone), (SERVER_MODEL, settings.server_backbone)):
        if backbone is None:
            continue
        run_dir = runs_dir / f"{MODEL}_{backbone}_{settings.image_size}_{label.replace('/', '_')}"
        fit_or_reuse(run_dir, dataset, settings.reuse_runs, model=MODEL, backbone=backbone,
                     image_size=settings.image_size, seed=settings.seed, progress=progress,
                     hyperparameters=settings.hyperparameters, pq_codebook=name == EDGE_MODEL)
        runs[name] = run_dir
    if "webp" in settings.modes and settings.webp_fit:
        backbone = settings.server_backbone or settings.backbone
        webp_label = (f"{MODEL}_{backbone}_{settings.image_size}_{label.replace('/', '_')}"
                      f"_webp{settings.quality}m{WEBP_METHOD}")
        train = webp_training_set(dataset, runs_dir / f"{webp_label}_data", settings.image_size, settings.quality)
        fit_or_reuse(runs_dir / webp_label, train, settings.reuse_runs, model=MODEL, backbone=backbone,
                     image_size=settings.image_size, seed=settings.seed, progress=progress,
                     hyperparameters=settings.hyperparameters)
        runs[WEBP_MODEL] = runs_dir / webp_label
    edge_run = runs[EDGE_MODEL]
    if load_run_codebook(edge_run) is None:  # a reused run fitted without --pq-codebook
        train_codebook(edge_run, dataset=dataset, seed=settings.seed, progress=progress)
    export_edge(edge_run)
    return runs


def webp_training_set(dataset: Path, folder: Path, image_size: int, quality: int) -> Path:
    """``dataset``'s train/good as the server receives them from a WebP edge (encoded and decoded at
    ``quality``), as an MVTec-layout folder under the runs folder (never the repository).

    A run fitted on the original images takes WebP's ringing and blocking for defects on fine textures
    (docs/results/edge_server_webp_original_fit.md); fitted on what the codec delivers, it learns them as
    normal, as the demo's model learns the video codec's artefacts.
    """
    from PIL import Image

    from edgead.edge.codecs import WebpCodec

    train = open_dataset(dataset).train
    good = folder / "train" / "good"
    if good.is_dir() and len(list(good.glob("*.png"))) == len(train):
        return folder
    good.mkdir(parents=True, exist_ok=True)
    codec = WebpCodec(image_size, quality)
    for index, sample in enumerate(train):
        decoded = codec.decode(codec.encode(load_rgb(sample.path)))[0]
        rgb = decoded.permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
        Image.fromarray(rgb).save(good / f"{index:05d}_{sample.path.stem}.png")
    return folder


def measure_modes(url: str, samples: Sequence[Sample], settings: SplitSettings, models: dict[str, str],
                  edge_dir: Path, progress: bool) -> dict[str, ModeFrames]:
    """Send every sample in every mode (image by image, so the modes share any drift of the machine)."""
    from edgead.edge.backbone import load_edge

    backbone = load_edge(edge_dir) if any(m in FEATURE_CODECS for m in settings.modes) else None
    client = ScoringClient(url)
    try:
        coders = {mode: prepare_codec(client, models[mode], mode, backbone if mode in FEATURE_CODECS else None,
                                      settings.ratio, settings.quality, settings.seed) for mode in settings.modes}

        def send(rgb: np.ndarray, result: EdgeResult) -> dict | None:
            codec, size = coders[result.mode]
            edge_backbone = backbone if result.mode in FEATURE_CODECS else None
            return send_frame(rgb, result, codec, edge_backbone, size, client, models[result.mode], settings.link,
                              map_format="float16")

        first = load_rgb(samples[0].path)
        for mode in settings.modes:  # warm-up, not counted: the first requests pay for lazy initialisation
            send(first, EdgeResult(-1, "warm-up", mode))
        frames = {mode: ModeFrames(mode, models[mode]) for mode in settings.modes}
        for index, sample in enumerate(progress_bar(samples, "split", progress)):
            rgb = load_rgb(sample.path)
            for mode, kept in frames.items():
                result = EdgeResult(index, sample.path.name, mode)
                answer = send(rgb, result)
                kept.results.append(result)
                kept.maps.append(_answer_map(answer, result))
    finally:
        client.close()
    return frames


def _answer_map(answer: dict | None, result: EdgeResult) -> np.ndarray | None:
    if answer is None:
        return None
    try:
        return decode_map(answer)
    except (KeyError, TypeError, ValueError) as exc:
        result.error = f"no usable anomaly map in the answer: {type(exc).__name__}: {exc}"
        return None


# ------------------------------------------------------------------------------------------- results


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def mode_row(label: str, frames: ModeFrames, backbone: str, samples: Sequence[Sample],
             masks: np.ndarray | None) -> dict[str, Any]:
    """One table row: accuracy over the frames the server scored, medians of the per-frame costs."""
    scored = frames.scored()
    results = [frames.results[i] for i in scored]
    row: dict[str, Any] = {
        "dataset": label, "mode": frames.mode, "backbone": backbone, "server_model": frames.model,
        "n_images": len(frames.results), "n_failed": len(frames.results) - len(scored),
    }
    labels = np.array([samples[i].label for i in scored])
    row["image_auroc"] = _finite(image_auroc(labels, np.array([r.score for r in results]))) if scored else None
    row["pixel_auroc"] = row["pixel_f1"] = None
    if masks is not None and scored:
        maps = np.stack([frames.maps[i] for i in scored]).astype(np.float32)
        row["pixel_auroc"] = _finite(pixel_auroc(masks[scored], maps))
        row["pixel_f1"] = _finite(pixel_f1_max(masks[scored], maps)[0])
    for key in MEDIAN_KEYS:
        row[key] = _median([getattr(r, key) for r in results])
    if row["payload_bytes"] is not None:
        row["payload_bytes"] = int(round(row["payload_bytes"]))
    row["first_error"] = next((r.error for r in frames.results if r.error), None)
    return row


def add_changes(rows: list[dict[str, Any]]) -> None:
    """Each row against its dataset's ``image`` row, and feature modes against its ``features`` row too."""
    by_mode = {row["mode"]: row for row in rows}
    for row in rows:
        for reference in ("image", "features"):
            base = by_mode.get(reference)
            if base is None or (reference == "features" and row["mode"] not in FEATURE_CODECS):
                continue
            for key in POINT_KEYS:
                if row[key] is not None and base[key] is not None:
                    row[f"{key}_change_vs_{reference}_pts"] = 100.0 * (row[key] - base[key])
            for key, stem in PERCENT_KEYS.items():
                if row[key] is not None and base[key]:
                    row[f"{stem}_change_vs_{reference}_pct"] = 100.0 * (row[key] / base[key] - 1.0)


def bandwidth_curves(frames: dict[str, ModeFrames], latency_ms: float) -> dict[str, Any]:
    """Median total ms per mode at each bandwidth: the link recomputed from each frame's measured payload."""
    totals: dict[str, list[float | None]] = {}
    for mode, kept in frames.items():
        results = [kept.results[i] for i in kept.scored()]
        fixed = np.array([r.edge_ms + r.server_ms for r in results])
        payload = np.array([r.payload_bytes for r in results], dtype=float)
        totals[mode] = [_median(list(fixed + Link(bw, latency_ms).transfer_ms(payload)))
                        for bw in CURVE_BANDWIDTHS]
    return {"bandwidth_bytes_per_s": CURVE_BANDWIDTHS.tolist(), "total_ms": totals}


def server_model(mode: str, runs: dict[str, Path]) -> str:
    """Which run on the server scores ``mode``: webp its WebP-fitted run, image the server-backbone run."""
    if mode == "webp" and WEBP_MODEL in runs:
        return WEBP_MODEL
    if mode in IMAGE_CODECS and SERVER_MODEL in runs:
        return SERVER_MODEL
    return EDGE_MODEL


def split_one(label: str, dataset: Path, settings: SplitSettings, runs_dir: Path,
              progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One dataset: fit, serve, send every mode; its table rows and bandwidth curves."""
    from edgead.edge.backbone import EDGE_DIR
    from edgead.edge.client import write_edge_csv

    samples = pick_samples(open_dataset(dataset).test, settings.max_images)
    if not samples:
        raise DatasetError(f"{dataset} has no test images: the split experiment sends test images")
    masks = load_masks(samples, settings.image_size)  # before any fit: a broken mask fails fast
    runs = prepare_runs(label, dataset, settings, runs_dir, progress)
    models = {mode: server_model(mode, runs) for mode in settings.modes}
    edge_run = runs[EDGE_MODEL]
    with running_server(runs, edge_run / SERVER_LOG, settings.workers) as url:
        frames = measure_modes(url, samples, settings, models, edge_run / EDGE_DIR, progress)
    write_edge_csv(edge_run / FRAMES_CSV, [r for kept in frames.values() for r in kept.results])
    backbones = {EDGE_MODEL: settings.backbone, SERVER_MODEL: settings.server_backbone,
                 WEBP_MODEL: settings.server_backbone or settings.backbone}
    rows = [mode_row(label, kept, backbones[kept.model], samples, masks) for kept in frames.values()]
    add_changes(rows)
    return rows, bandwidth_curves(frames, settings.link.latency_ms)


# --------------------------------------------------------------------------------------------- report


def _grid(count: int):  # noqa: ANN202
    columns = min(count, 2)
    rows = math.ceil(count / columns)
    fig = new_figure(5.5 * columns, 4.2 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_axis_off()
    return fig, axes


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    fig.tight_layout()
    with atomic_file(path) as staging:
        fig.savefig(staging, format="png")
    return path


def save_f1_payload_plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Pixel F1-max against median payload bytes (log x), one marker per mode, one panel per dataset.

    A dataset without pixel masks shows image AUROC instead, so its panel still says what each mode costs.
    """
    labels = list(dict.fromkeys(row["dataset"] for row in rows))
    fig, axes = _grid(len(labels))
    for ax, label in zip(axes, labels, strict=False):
        own = [r for r in rows if r["dataset"] == label and r["payload_bytes"]]
        key, name = ("pixel_f1", "pixel F1-max") if any(r["pixel_f1"] is not None for r in own) else (
            "image_auroc", "image AUROC (no pixel masks)")
        for row in (r for r in own if r[key] is not None):
            ax.scatter(row["payload_bytes"], row[key], marker=MARKERS[row["mode"]], color=COLOURS[row["mode"]],
                       s=60, label=row["mode"])
        ax.set(xscale="log", xlabel="payload per frame (bytes, median)", ylabel=name, title=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def save_bandwidth_plot(path: Path, curves: dict[str, dict[str, Any]], bandwidth: float) -> Path:
    """Median total time per frame against the uplink bandwidth (log-log): a line per mode, a panel per dataset."""
    fig, axes = _grid(len(curves))
    for ax, (label, curve) in zip(axes, curves.items(), strict=False):
        kbps = np.asarray(curve["bandwidth_bytes_per_s"]) / 1e3
        for mode, totals in curve["total_ms"].items():
            values = np.array([np.nan if v is None else v for v in totals], dtype=float)
            ax.plot(kbps, values, color=COLOURS[mode], marker=MARKERS[mode], markevery=5, markersize=4, label=mode)
        if math.isfinite(bandwidth):
            ax.axvline(bandwidth / 1e3, color="0.5", linestyle="--", linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel="uplink bandwidth (kB/s)", ylabel="total ms per frame (median)",
               title=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


class SplitReport:
    """The markdown table, its JSON and the two plots, rewritten atomically after every dataset."""

    def __init__(self, out_markdown: Path, notes: list[str], settings: dict[str, Any], bandwidth: float) -> None:
        self.out_markdown, self.notes, self.settings, self.bandwidth = out_markdown, notes, settings, bandwidth
        self.rows: list[dict[str, Any]] = []
        self.curves: dict[str, dict[str, Any]] = {}
        self.failures: list[dict[str, str]] = []
        stem = out_markdown.stem
        self.f1_plot = out_markdown.with_name(f"{stem}_f1_vs_payload.png")
        self.bandwidth_plot = out_markdown.with_name(f"{stem}_total_vs_bandwidth.png")

    def write(self) -> None:
        lines = list(self.notes)
        if self.rows:
            save_f1_payload_plot(self.f1_plot, self.rows)
            save_bandwidth_plot(self.bandwidth_plot, self.curves, self.bandwidth)
            lines += [markdown_table(self.rows, COLUMNS), "",
                      f"![pixel F1-max against payload]({self.f1_plot.name})", "",
                      f"![total time against bandwidth]({self.bandwidth_plot.name})", ""]
        if self.failures:
            lines += ["## Failed", "", markdown_table(self.failures, ["dataset", "error"]), ""]
        atomic_write_text(self.out_markdown, "\n".join(lines))
        data = {"settings": self.settings, "rows": self.rows, "bandwidth_curves": self.curves,
                "failures": self.failures}
        atomic_write_text(self.out_markdown.with_suffix(".json"), json.dumps(data, indent=2, default=str) + "\n")


def report_notes(settings: SplitSettings, title: str, command: str | None, server_note: str) -> list[str]:
    s = settings
    return [
        *results_header(title, command),
        f"- Every mode goes through the real scoring server (`edgead serve`, {s.workers} uvicorn worker(s), a "
        "subprocess on a free loopback port) and the edge client's code (`edgead.edge.client`). Edge and server "
        "run on this same machine, one after the other: edge_ms is this machine's time for the edge part, not "
        "an edge device's. One warm-up frame per mode is sent first and not counted.",
        f"- Link modelled: link_ms = payload bytes / {s.bandwidth_text} + {s.link.latency_ms:g} ms latency "
        "(uplink only); total_ms = edge_ms + link_ms + server_ms per frame. Every time column is the median over "
        "the test images of that per-frame value (so total_ms is not the sum of the medians); payload_bytes too.",
        f"- edge_ms: resize to {s.image_size} px (+ the backbone, ONNX Runtime fp32 edge part, in feature modes) "
        "+ encode. server_ms: the server's own measured decode + backbone + head (no HTTP, no map encoding).",
        f"- Codecs: webp and rs+webp at quality {s.quality} (libwebp method {WEBP_METHOD}); rs modes send a seeded share {s.ratio:g} of the "
        f"feature positions (seed {s.seed}) and the server fills the others from the nearest sent one; pq uses "
        "the run's codebook (`fit --pq-codebook` defaults: sub-vectors of about 8 dimensions, 8 bits each). "
        "Payload format and codecs: docs/edge_payload.md.",
        f"- {server_note}",
        (f"- The webp mode is scored by a run fitted like the others but on the training images after the same "
         f"WebP round trip (quality {s.quality}, `webp_training_set`): the model learns the codec's artefacts as "
         "normal (`--no-webp-fit` scores it with the run fitted on the original images: "
         "docs/results/edge_server_webp_original_fit.md)." if s.webp_fit else
         "- --no-webp-fit: the webp mode is scored by the run fitted on the original training images."),
        f"- Pixel metrics from the server's anomaly map at the full {s.image_size} px input size (float16 in the "
        f"JSON answer), against the masks resized to {s.image_size} px (nearest); pixel_f1 = the best F1 over all "
        "thresholds over all pixels (an oracle, as image F1-max); '-' where the dataset has no masks (its "
        "plot panel shows image AUROC instead). image_auroc from the server's image scores.",
        "- Changes: *_pts = difference in points (x 100) against the `image` row of the same dataset, or its "
        "`features` row (feature modes only); *_pct = relative difference in percent. n_failed = frames the "
        "server did not score (left out of the metrics). Every change, the HTTP round trip and per-bandwidth "
        "totals are in the JSON beside this file; every frame in RUN/split_frames.csv.",
        "- Plots: pixel F1-max against payload; total time against bandwidth, recomputed for each bandwidth "
        "from each frame's measured payload, edge and server times (dashed line: the table's bandwidth).",
        "",
    ]


def run_split_experiment(
    datasets: Sequence[str | Path],
    out_markdown: str | Path = "docs/results/edge_server.md",
    modes: Sequence[str] = CODECS,
    bandwidth: str | float = "100kB/s",
    latency_ms: float = 0.0,
    runs_dir: str | Path = "runs/split",
    image_size: int = 256,
    backbone: str = "efficientnet_lite0",
    server_backbone: str | None = None,
    ratio: float = DEFAULT_RATIO,
    quality: int = DEFAULT_QUALITY,
    seed: int = 0,
    max_images: int | None = None,
    workers: int = 1,
    reuse_runs: bool = False,
    hyperparameters: dict[str, Any] | None = None,
    webp_fit: bool = True,
    progress: bool = True,
    command: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Every dataset x mode through the real server; writes ``out_markdown``, its JSON and two plots beside it.

    ``server_backbone`` scores the image modes with a run on that backbone (the edge's run otherwise); when
    its weights are not installed, ``warn`` is told and the report says so. Options and outputs are checked
    before any work; a failed dataset is reported and the others go on (the error is raised at the end).
    """
    settings = SplitSettings(
        modes=check_modes(modes), link=Link(parse_bandwidth(bandwidth), float(latency_ms)),
        bandwidth_text=str(bandwidth), image_size=image_size, backbone=backbone, server_backbone=server_backbone,
        ratio=ratio, quality=quality, seed=seed, max_images=max_images, workers=workers, reuse_runs=reuse_runs,
        hyperparameters=dict(hyperparameters or {}), webp_fit=webp_fit)
    settings.check()
    out_markdown = check_output_file(out_markdown, (".md",))
    runs_dir = check_work_dir(runs_dir, "--runs-dir")
    server_note = settings.settle_server_backbone(warn)
    paths = expand_datasets(datasets)

    title = f"Edge/server split: {MODEL} with {backbone} at {image_size}x{image_size}, uplink {bandwidth}"
    notes = report_notes(settings, title, command, server_note)
    report = SplitReport(out_markdown, notes, settings.as_dict(), settings.link.bandwidth)
    for label, path in paths:
        try:
            rows, curves = split_one(label, path, settings, runs_dir, progress)
        except Exception as exc:  # noqa: BLE001 - one failed dataset must not lose the others
            error = str(exc) if isinstance(exc, EdgeadError) else f"{type(exc).__name__}: {exc}"
            report.failures.append({"dataset": label, "error": error})
        else:
            report.rows.extend(rows)
            report.curves[label] = curves
        report.write()  # after every dataset: finished work is on disk whatever comes next
    if report.failures:
        failed = ", ".join(f["dataset"] for f in report.failures)
        raise EdgeadError(f"{len(report.failures)} dataset(s) failed ({failed}; reasons in {out_markdown}); "
                          f"the {len(report.rows)} rows that finished are written")
    return report.rows
