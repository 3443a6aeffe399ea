"""Files that ``edgead test`` writes into its output folder: scores, metrics, plots, heat maps.

Plots use matplotlib's object-oriented API with the Agg canvas (never pyplot), so they work on
headless machines and never touch a global backend. matplotlib is imported only when a plot is
made: :func:`overlay_heatmap` is reused by the video runtime, which should not pay for it.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .metrics import image_auroc, pixel_roc_curve, roc_curve_points

SCORE_COLUMNS = ["path", "label", "defect_type", "score", "normalized_score", "decision"]


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------- tables


def write_scores_csv(path: str | Path, rows: list[dict]) -> Path:
    """One line per test image: path, label, defect_type, score, normalized_score, decision.

    Keys outside these columns are appended as extra columns; missing values are left empty.
    """
    columns = list(SCORE_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    return write_csv(path, rows, columns)


def write_csv(path: str | Path, rows: list[dict], columns: list[str]) -> Path:
    """Rows as CSV with these columns (others ignored, missing ones empty); numpy values made plain."""
    path = _prepare(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _plain(v) for k, v in row.items()})
    return path


def _plain(value):
    """Numpy scalars, arrays and paths to JSON/CSV-friendly Python values; NaN and inf to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics_json(path: str | Path, metrics: dict) -> Path:
    """Pretty JSON; NaN/inf become null (JSON has no NaN) and numpy values become plain numbers."""
    path = _prepare(path)
    path.write_text(json.dumps(_plain(metrics), indent=2, allow_nan=False) + "\n")
    return path


def markdown_table(rows: list[dict], columns: list[str], floatfmt: str = ".3f") -> str:
    """A GitHub-flavoured markdown table; floats use ``floatfmt``, None/NaN show as "-".

    Columns holding only numbers are right-aligned.
    """

    def cell(value) -> str:
        value = value.item() if isinstance(value, np.generic) else value
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return format(value, floatfmt)
        return str(value).replace("|", "\\|").replace("\n", " ")

    def numeric(column: str) -> bool:
        values = [row.get(column) for row in rows if row.get(column) is not None]
        return bool(values) and all(
            isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in values
        )

    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---:" if numeric(c) else "---" for c in columns) + " |",
    ]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots


def _save_roc(path: Path, fpr: np.ndarray, tpr: np.ndarray, auc: float, title: str, what: str) -> Path:
    fig = new_figure(5, 5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color="tab:red", linewidth=2, label=f"{what} AUROC = {auc:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _save_message(path: Path, title: str, message: str) -> Path:
    fig = new_figure(5, 5)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    fig.savefig(path)
    return path


def save_roc_plot(path: str | Path, labels: np.ndarray, scores: np.ndarray, title: str = "Image ROC") -> Path:
    """Image-level ROC curve as a PNG. With a single class, a PNG saying why there is no curve."""
    path = _prepare(path)
    try:
        fpr, tpr, _ = roc_curve_points(labels, scores)
    except ValueError:
        return _save_message(path, title, "no ROC curve:\nthe test set holds only one class")
    return _save_roc(path, fpr, tpr, image_auroc(labels, scores), title, "image")


def save_pixel_roc_plot(
    path: str | Path, masks: np.ndarray, maps: np.ndarray, title: str = "Pixel ROC", max_points: int = 2000
) -> Path:
    """Pixel-level ROC curve as a PNG.

    The curve is computed exactly over all pixels, then thinned to at most ``max_points`` points
    for drawing (millions of points would make a slow, heavy file and look the same).
    """
    path = _prepare(path)
    try:
        fpr, tpr, _ = pixel_roc_curve(masks, maps)
    except ValueError:
        return _save_message(path, title, "no pixel ROC curve:\nthe masks hold only one class")
    auc = float(np.trapezoid(tpr, fpr))
    if fpr.size > max_points:
        # Even steps along the curve's length (fpr + tpr), so the steep start keeps its detail.
        keep = np.searchsorted(fpr + tpr, np.linspace(0.0, 2.0, max_points))
        keep = np.unique(np.r_[0, np.minimum(keep, fpr.size - 1), fpr.size - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return _save_roc(path, fpr, tpr, auc, title, "pixel")


# -------------------------------------------------------------------------------------- heat maps


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """H x W, H x W x 1 or H x W x 3 image (uint8, or float in 0..1) to H x W x 3 uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def overlay_heatmap(
    image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.6
) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an RGB uint8 image; returns H x W x 3 uint8 (RGB).

    The map is scaled from [vmin, vmax] to [0, 1] and resized to the image if needed. The colour's
    opacity grows with the value (up to ``alpha``), so normal areas stay readable and anomalous
    areas turn red. Pure OpenCV/numpy, a few milliseconds per frame: fit for video overlays.
    """
    image = _to_rgb_uint8(image)
    h, w = image.shape[:2]
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    scale = float(vmax - vmin) if vmax > vmin else 1.0
    level = np.clip((amap - vmin) / scale, 0.0, 1.0)
    colour = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    weight = (alpha * level)[:, :, None]
    blended = image * (1.0 - weight) + colour * weight
    return (blended + 0.5).astype(np.uint8)


def _pick_examples(scores: np.ndarray, labels: np.ndarray, threshold: float | None, n: int) -> list[tuple]:
    """Up to n (index, kind) pairs, taken in turn from four queues: missed defects (lowest score
    first), false alarms, detected defects and passed normal images (each highest score first)."""
    order = np.argsort(-scores, kind="stable")
    if threshold is None:
        queues = {"anomalous": [i for i in order if labels[i]], "normal": [i for i in order if not labels[i]]}
    else:
        pred = scores >= threshold
        queues = {
            "missed": [i for i in order[::-1] if labels[i] and not pred[i]],
            "false_alarm": [i for i in order if not labels[i] and pred[i]],
            "detected": [i for i in order if labels[i] and pred[i]],
            "normal": [i for i in order if not labels[i] and not pred[i]],
        }
    picked: list[tuple] = []
    while len(picked) < n and any(queues.values()):
        for kind, queue in queues.items():
            if queue and len(picked) < n:
                picked.append((int(queue.pop(0)), kind))
    return picked


def save_heatmap_examples(
    out_dir: str | Path,
    images: Sequence[np.ndarray] | np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None,
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
    max_examples: int = 6,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """One PNG per chosen example: input | ground truth | heat-map overlay (score and decision).

    Examples mix missed defects, false alarms, the best-detected defects and normal images, so a
    reader sees both successes and failures. All overlays share one colour scale (the range of all
    maps) so heat maps are comparable across files. Returns the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    maps = np.asarray(maps)
    if not len(images) == len(maps) == scores.size == labels.size:
        raise ValueError("images, maps, scores and labels must have the same length")
    vmin, vmax = float(np.min(maps)), float(np.max(maps))

    paths = []
    for rank, (i, kind) in enumerate(_pick_examples(scores, labels, threshold, max_examples)):
        image = _to_rgb_uint8(images[i])
        fig = new_figure(12, 4.4)
        axes = fig.subplots(1, 3)
        name = f" ({names[i]})" if names is not None else ""
        axes[0].imshow(image)
        axes[0].set_title(f"input #{i}{name}", fontsize=9)

        axes[1].imshow(image)
        mask = None if masks is None else np.asarray(masks[i]).astype(np.uint8)
        if mask is not None and mask.shape != image.shape[:2]:
            mask = cv2.resize(mask, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        if mask is not None and mask.any():
            axes[1].contour(mask, levels=[0.5], colors="lime", linewidths=1.5)
            axes[1].set_title("ground truth (defect outline)", fontsize=9)
        else:
            note = "anomalous, no mask" if labels[i] else "normal"
            axes[1].set_title(f"ground truth: {note}", fontsize=9)

        axes[2].imshow(overlay_heatmap(image, maps[i], vmin, vmax))
        truth = "anomalous" if labels[i] else "normal"
        if threshold is None:
            verdict = f"score {scores[i]:.3g} (truth: {truth})"
        else:
            decision = "ANOMALOUS" if scores[i] >= threshold else "normal"
            verdict = f"score {scores[i]:.3g} vs thr {threshold:.3g} -> {decision}\n(truth: {truth})"
        wrong = kind in ("missed", "false_alarm")
        axes[2].set_title(verdict, fontsize=9, color="tab:red" if wrong else "black")
        for ax in axes:
            ax.set_axis_off()
        fig.suptitle(kind.replace("_", " "), fontsize=11)
        fig.tight_layout()
        path = out_dir / f"{rank:02d}_{kind}_{i:04d}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def machine_description() -> str:
    """Cores, CPU model, torch version and threads: what a reader needs to compare timings."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def results_header(title: str, command: str | None = None) -> list[str]:
    """The first lines of every docs/results file: what made it, on which machine, when."""
    command = command or "edgead " + " ".join(sys.argv[1:])
    return [
        f"# {title}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine_description()}",
        f"- Date: {dt.date.today().isoformat()}",
    ]


def write_rows_page(out: str | Path, header: Sequence[str], rows: list[dict], columns: list[str]) -> None:
    """A one-table docs/results page and its rows as JSON beside it, both written atomically (after every
    row, so a long measurement that stops keeps what it measured)."""
    from edgead.outputs import atomic_write_text

    atomic_write_text(out, "\n".join([*header, markdown_table(rows, columns), ""]))
    atomic_write_text(Path(out).with_suffix(".json"), json.dumps(rows, indent=2) + "\n")


def results_page(
    title: str,
    command: str | None,
    notes: Sequence[str],
    sections: Sequence[tuple[str | None, list[dict], list[str]]],
) -> str:
    """A whole docs/results page: the header, one bullet per note, then (heading, rows, columns) tables."""
    lines = [*results_header(title, command), *[f"- {note}" for note in notes], ""]
    for heading, rows, columns in sections:
        if heading:
            lines += [f"## {heading}", ""]
        lines += [markdown_table(rows, columns), ""]
    return "\n".join(lines)

