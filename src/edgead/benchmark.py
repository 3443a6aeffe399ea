"""`edgead benchmark`: fit and test several models on several datasets, one markdown table + JSON.

Accuracy comes from `edgead test`'s metrics; latency is measured per image at batch 1 on test images,
with the backbone and the head timed separately. With ``runtimes`` beyond torch, each fitted run is
also exported (ONNX, INT8 ONNX Runtime, OpenVINO, INT8 OpenVINO via NNCF) and every file is tested
and timed the same way: whole-model latency at batch 1 and throughput at batch 16. With ``hardware``,
every row also gets peak memory, fps and per-device energy estimates, written to
``hardware_benchmark.csv`` with an accuracy-vs-latency plot (see :mod:`edgead.hardware`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgead.data.datasets import ImageDataset, find_categories, open_dataset
from edgead.errors import DatasetError, EdgeadError, UsageError
from edgead.evaluation import evaluate_run
from edgead.hardware import (
    ACCURACY_PLOT,
    HARDWARE_CSV,
    HARDWARE_NOTES,
    hardware_columns,
    hardware_measurements,
    hardware_records,
    save_accuracy_latency_plot,
    write_hardware_csv,
)
from edgead.latency import measure_end_to_end, measure_latency
from edgead.models import create_head
from edgead.outputs import atomic_write_text, check_output_file, check_work_dir
from edgead.profiling import model_profile
from edgead.reporting import markdown_table, results_header
from edgead.runs import WEIGHTS_FILE, load_run
from edgead.training import FitSettings, fit_run

RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8", "litert", "litert-int8")
RUNTIME_COLUMNS = [
    "dataset",
    "model",
    "runtime",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_auroc_change",
    "pixel_auroc_change",
    "fit_s",
    "file_mb",
    "p50_ms",
    "p95_ms",
    "ips_b16",
    "speedup_vs_torch",
    "params_m",
    "gmacs",
]

COLUMNS = [
    "dataset",
    "model",
    "layers",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "precision",
    "recall",
    "fit_s",
    "backbone_ms",
    "head_ms",
    "postprocess_ms",
    "total_ms",
    "params_m",
    "gmacs",
    "run_mb",
]


def expand_datasets(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(label, path) per dataset; each given path is one dataset or a folder of categories (mvtec_ad/)."""
    found: list[tuple[str, Path]] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DatasetError(f"dataset folder {path} does not exist")
        if (path / "train" / "good").is_dir() or (path / "good").is_dir():
            found.append((path.name, path))
            continue
        categories = find_categories(path)
        if not categories:
            raise DatasetError(f"{path} is neither a dataset nor a folder of dataset categories")
        found.extend((f"{path.name}/{category.name}", category) for category in categories)
    return found


def folder_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 1e6


def fit_or_reuse(run_dir: Path, dataset: Path, reuse: bool, **fit_kwargs: Any):
    """Fit, or load the run already in ``run_dir`` when ``reuse`` is set (same name = same settings)."""
    if reuse and (run_dir / "config.json").is_file():
        return load_run(run_dir, expect_model=fit_kwargs["model"])
    return fit_run(dataset, run_dir, force=True, **fit_kwargs)  # the runs folder is the benchmark's own


def test_images(dataset: Path, image_size: int, count: int) -> torch.Tensor:
    samples = open_dataset(dataset).test[:count]
    return torch.stack([ImageDataset(samples, image_size)[i]["image"] for i in range(len(samples))])


def runtime_rows(
    run_dir: Path,
    dataset: Path,
    base: dict[str, Any],
    runtimes: Sequence[str],
    images: torch.Tensor,
    progress: bool,
) -> list[dict[str, Any]]:
    """Export the run once per format and test + time each runtime's file against the torch row."""
    from edgead.deploy.export import export_run, file_megabytes
    from edgead.deploy.runtimes import load_inferencer

    int8 = any(r.endswith("-int8") for r in runtimes)
    files: dict[str, Path] = {}
    if any(r.startswith("onnxruntime") for r in runtimes):
        report = export_run(run_dir, "onnx", run_dir / "export", int8=int8, progress=progress)
        files.update(
            {"onnxruntime": report["files"]["onnx"], "onnxruntime-int8": report["files"].get("onnx_int8")}
        )
    if any(r.startswith("openvino") for r in runtimes):
        report = export_run(run_dir, "openvino", run_dir / "export", int8=int8, progress=progress)
        files.update(
            {"openvino": report["files"]["openvino"], "openvino-int8": report["files"].get("openvino_int8")}
        )
    if any(r.startswith("litert") for r in runtimes):
        report = export_run(run_dir, "tflite", run_dir / "export", int8=int8, progress=progress)
        files.update({"litert": report["files"]["tflite"], "litert-int8": report["files"].get("tflite_int8")})
    rows = []
    for runtime in runtimes:
        if runtime == "torch":
            continue
        path = files[runtime]
        engine = runtime.removesuffix("-int8")
        metrics = evaluate_run(path, dataset, runtime=engine, progress=progress)
        timing = measure_end_to_end(load_inferencer(path, engine), images)
        row = {
            key: base[key]
            for key in ("dataset", "model", "layers", "backbone", "image_size", "params_m", "gmacs")
        }
        row.update(runtime=runtime, file=str(path), file_mb=file_megabytes(path), **timing)
        row.update({k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")})
        for key in ("image_auroc", "pixel_auroc"):
            if row.get(key) is not None and base.get(key) is not None:
                row[f"{key}_change"] = row[key] - base[key]
        row["speedup_vs_torch"] = base["p50_ms"] / row["p50_ms"]
        rows.append(row)
    return rows


def benchmark_one(
    label: str,
    dataset: Path,
    model: str,
    layers: tuple[int, ...] | None,
    runs_dir: Path,
    image_size: int,
    backbone: str,
    hyperparameters: dict[str, Any],
    latency_images: int,
    progress: bool,
    runtimes: Sequence[str] = ("torch",),
    reuse_runs: bool = False,
    hardware: bool = False,
    aggregation_border: str | None = None,
) -> list[dict[str, Any]]:
    layer_tag = "default" if layers is None else "-".join(map(str, layers))
    run_dir = runs_dir / f"{model}_{layer_tag}_{label.replace('/', '_')}"
    pipeline, config = fit_or_reuse(
        run_dir,
        dataset,
        reuse_runs,
        model=model,
        backbone=backbone,
        image_size=image_size,
        layers=layers,
        hyperparameters=hyperparameters.get(model, {}),
        progress=progress,
        aggregation_border=aggregation_border,
    )
    metrics = evaluate_run(run_dir, dataset, pipeline=pipeline, config=config, progress=progress)
    images = test_images(dataset, image_size, latency_images)
    latency = measure_latency(pipeline, images)
    profile = model_profile(pipeline)
    row = {
        "dataset": label,
        "model": model,
        "runtime": "torch",
        "layers": ",".join(map(str, config.layers)),
        "aggregation_border": config.aggregation_border,
        "backbone": backbone,
        "image_size": image_size,
        **{
            k: metrics.get(k)
            for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "precision", "recall")
        },
        "fit_s": config.extra["fit_seconds"],
        **{k: latency[k] for k in ("backbone_ms", "head_ms", "postprocess_ms", "total_ms")},
        "params_m": profile["params"] / 1e6,
        "gmacs": profile["macs"] / 1e9,
        "head_data_mb": profile["head_data_bytes"] / 1e6,
        "run_mb": folder_megabytes(run_dir),
        "n_train": config.extra["n_train"],
        "n_validation": config.extra["n_validation"],
        "n_test": metrics.get("n_normal", 0) + metrics.get("n_anomalous", 0),
        "head": config.head,
        "run_dir": str(run_dir),
    }
    if list(runtimes) == ["torch"] and not hardware:
        return [row]
    weights = run_dir / WEIGHTS_FILE
    row.update(measure_end_to_end(pipeline, images), speedup_vs_torch=1.0)
    row.update(file=str(weights), file_mb=weights.stat().st_size / 1e6)
    rows = [row, *runtime_rows(run_dir, dataset, row, runtimes, images, progress)]
    if hardware:
        for one in rows:
            one.update(hardware_measurements(one, images))
    return rows


def run_benchmark(
    datasets: Sequence[str | Path],
    models: Sequence[str],
    out_markdown: str | Path,
    runs_dir: str | Path = "runs/benchmark",
    image_size: int = 256,
    backbone: str = "efficientnet_lite0",
    hyperparameters: dict[str, dict[str, Any]] | None = None,
    layer_sets: Sequence[tuple[int, ...] | None] = (None,),
    latency_images: int = 20,
    progress: bool = True,
    command: str | None = None,
    notes: Sequence[str] = (),
    runtimes: Sequence[str] = ("torch",),
    reuse_runs: bool = False,
    hardware: bool = False,
    aggregation_border: str | None = None,
    compare: Sequence[str | Path] = (),
) -> list[dict[str, Any]]:
    """Every dataset x layer set x model (x runtime); ``layers`` None is the backbone's default.

    ``hardware`` adds the hardware view: ``hardware_benchmark.csv`` and ``accuracy_vs_latency.png``
    in ``out_markdown``'s folder, and a table of them in the report. ``compare`` names earlier
    benchmark JSON files whose rows on the same datasets are shown beside, as they were measured.
    """
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise UsageError(f"unknown runtime(s) {', '.join(unknown)}: choose from {', '.join(RUNTIMES)}")
    if not models:
        raise UsageError("--models names no model: give e.g. --models patchcore,padim")
    runtimes = ["torch", *[r for r in runtimes if r != "torch"]]  # torch is the reference row
    out_markdown = check_output_file(out_markdown, (".md",))
    runs_dir = check_work_dir(runs_dir, "--runs-dir")
    for model, layers in ((m, ls) for m in models for ls in layer_sets):  # all checked before the first fit
        FitSettings.check(
            model=model,
            backbone=backbone,
            image_size=image_size,
            layers=tuple(layers) if layers is not None else None,
            validation_fraction=0.1,
            threshold_quantile=0.99,
            seed=0,
            batch_size=16,
            aggregation_border=aggregation_border,
        )
        create_head(model, **(hyperparameters or {}).get(model, {}))
    paths = expand_datasets(datasets)
    check_benchmark_inputs(paths, runtimes)
    earlier = earlier_rows(compare, {label for label, _ in paths})
    report = BenchmarkReport(out_markdown, models, backbone, image_size, command, notes, runtimes, hardware)
    report.earlier = earlier
    for label, path in paths:
        for layers in layer_sets:
            for model in models:
                try:
                    found = benchmark_one(
                        label,
                        path,
                        model,
                        layers,
                        runs_dir,
                        image_size,
                        backbone,
                        hyperparameters or {},
                        latency_images,
                        progress,
                        runtimes,
                        reuse_runs,
                        hardware,
                        aggregation_border,
                    )
                except Exception as exc:  # noqa: BLE001 - one failed category must not lose the others
                    report.failures.append({"dataset": label, "model": model, "error": f"{exc}"})
                else:
                    report.rows.extend(found)
                report.write()  # after every row: finished work is on disk whatever comes next
    if report.failures:
        failed = ", ".join(f"{f['dataset']}/{f['model']}" for f in report.failures)
        raise EdgeadError(
            f"{len(report.failures)} benchmark run(s) failed ({failed}; reasons in {out_markdown}); "
            f"the {len(report.rows)} rows that finished are written"
        )
    return report.rows


def check_benchmark_inputs(paths: Sequence[tuple[str, Path]], runtimes: Sequence[str]) -> None:
    """Before the first fit: every dataset has training and test images, every runtime's converter is here."""
    for label, path in paths:
        dataset = open_dataset(path)
        if not dataset.train or not dataset.test:
            missing = "train/good" if not dataset.train else "test"
            raise DatasetError(f"dataset {label} ({path}) has no {missing} images: a benchmark fits and tests on both")
    from edgead.deploy.export import check_converter

    for fmt in ("litert", "openvino"):
        if any(r.startswith(fmt) for r in runtimes):
            check_converter("tflite" if fmt == "litert" else fmt, int8=f"{fmt}-int8" in runtimes)


def earlier_rows(paths: Sequence[str | Path], datasets: set[str]) -> list[dict[str, Any]]:
    """The rows of earlier benchmark JSON files on ``datasets``, each with the file it came from."""
    rows: list[dict[str, Any]] = []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"--compare {path}: not a readable benchmark JSON file ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) and {"dataset", "model"} <= set(r) for r in data):
            raise UsageError(f"--compare {path}: not a benchmark JSON file (a list of rows with dataset and model)")
        rows += [{**r, "source": path.name} for r in data if r["dataset"] in datasets]
    return rows


class BenchmarkReport:
    """The markdown table + JSON of a benchmark, rewritten atomically as rows finish."""

    def __init__(
        self,
        out_markdown: Path,
        models: Sequence[str],
        backbone: str,
        image_size: int,
        command: str | None,
        notes: Sequence[str],
        runtimes: Sequence[str],
        hardware: bool,
    ) -> None:
        self.out_markdown, self.runtimes, self.hardware = out_markdown, list(runtimes), hardware
        self.rows: list[dict[str, Any]] = []
        self.earlier: list[dict[str, Any]] = []
        self.failures: list[dict[str, str]] = []
        self.header = [
            *results_header(f"Benchmark: {', '.join(models)} with {backbone} at {image_size}x{image_size}", command),
            f"- Images resized to {image_size}x{image_size}; masks resized with nearest neighbour. Thresholds "
            "(precision/recall columns) come from normal validation images carved from train/good, never from test.",
            "- Latency: median ms per image at batch 1 over test images (backbone = preprocess + backbone; "
            "head = patch scores + image score, i.e. the kNN search for PatchCore; postprocess = upsample + "
            "blur). fit_s = feature extraction + head fit (coreset selection, TinyGLASS training included). "
            "params_m = learned weights used at inference (a memory bank or Gaussians are data, not "
            "parameters); gmacs = multiply-accumulates per image at batch 1, kNN search included.",
            "- layers: backbone stage indices (2 = stride 8, 3 = stride 16, 4 = stride 32).",
            *runtime_notes(self.runtimes),
            *[f"- {note}" for note in notes],
            "",
        ]

    def write(self) -> None:
        lines = list(self.header)
        if self.rows:
            lines += [markdown_table(self.rows, COLUMNS if len(self.runtimes) == 1 else RUNTIME_COLUMNS), ""]
        # Earlier rows with the layer sets measured here (all of them before the first row is in).
        layers = {r.get("layers") for r in self.rows}
        earlier = [r for r in self.earlier if not self.rows or r.get("layers") in layers]
        if earlier:
            columns = [c for c in COLUMNS if c != "fit_s"] + ["fit_s", "source"]
            if any(r.get("runtime", "torch") != "torch" for r in earlier):
                columns.insert(2, "runtime")
            lines += [
                "## Beside: earlier measurements (not re-run here)",
                "",
                "Rows of the pages named in `source`, on the same datasets, as measured there (their command, "
                "machine and date are on those pages).",
                "",
                markdown_table(earlier, columns),
                "",
            ]
        if self.failures:
            lines += ["## Failed", "", markdown_table(self.failures, ["dataset", "model", "error"]), ""]
        if self.hardware and self.rows:
            records = hardware_records(self.rows)
            write_hardware_csv(self.out_markdown.parent / HARDWARE_CSV, records)
            save_accuracy_latency_plot(self.out_markdown.parent / ACCURACY_PLOT, records)
            lines += hardware_section(records)
        atomic_write_text(self.out_markdown, "\n".join(lines))
        atomic_write_text(
            self.out_markdown.with_suffix(".json"), json.dumps(self.rows, indent=2, default=str) + "\n"
        )


def runtime_notes(runtimes: Sequence[str]) -> list[str]:
    if len(runtimes) == 1:
        return []
    return [
        "- Runtimes: torch = the run folder in PyTorch eager (fp32); onnxruntime / openvino = the exported "
        "fp32 ONNX file (uint8 input, whole pipeline in one graph); litert = that graph as a .tflite file (LiteRT, "
        "XNNPACK); -int8 = post-training static INT8 "
        "(ONNX Runtime QDQ u8/s8 per-channel, OpenVINO NNCF, or AI Edge Quantizer s8/s8 for LiteRT) calibrated on 64 train/good images, conv biases "
        "corrected for weight rounding; the backbone from stage 1 on in INT8 where the normal validation scores "
        "stay within 10% of their spread of fp32's (else fewer stages), the head and the postprocess in float. "
        "*_change = AUROC minus the torch fp32 row's.",
        "- p50_ms / p95_ms: whole model per image at batch 1 (test images, after warm-up); ips_b16: images "
        "per second at batch 16; speedup_vs_torch: torch p50 / this p50; file_mb: the file(s) a device needs.",
    ]


def hardware_section(records: list[dict[str, Any]]) -> list[str]:
    """The report's hardware view: column notes, the table and the plot (files beside the report)."""
    columns = [c for c in hardware_columns() if c not in ("backbone", "image_size", "threads", "file")]
    return [
        "## Hardware view",
        "",
        f"Also in `{HARDWARE_CSV}`; image AUROC against latency, with the Pareto front: `{ACCURACY_PLOT}`.",
        "",
        *[f"- {note}" for note in HARDWARE_NOTES],
        "",
        markdown_table(records, columns),
        "",
        f"![accuracy vs latency]({ACCURACY_PLOT})",
        "",
    ]
