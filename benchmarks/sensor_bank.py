"""PatchCore inside the sensor: the memory bank as chunked 1x1 convolutions of the IMX500 graph.

    python benchmarks/sensor_bank.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/mvtec_ad/transistor \
        ../shared/datasets/mvtec_ad/screw ../shared/datasets/kolektorsdd --work-dir runs/sensor_bank \
        --curve-dataset ../shared/datasets/mvtec_ad/screw --out docs/results/sensor_bank.md

Per dataset, on its test split: the full PatchCore (the server's, default bank), the sensor-sized bank
(`-p bank_size=4096`) in torch, the sensor graph in float (what `export --format imx500` builds, scored by
the host decoder), the same graph quantized by Sony's MCT (scored in the IMX500 toolchain's environment,
then by the host decoder), and the ONNX Runtime INT8 file of the sensor-bank run (`export --int8`). The
converter's memory report, fit and export seconds. The student's and TinyGLASS's rows come from their
own pages (student.json, tinyglass.json). Then a curve of bank size against accuracy and sensor memory.
Needs the IMX500 toolchain (`bash scripts/setup_imx500.sh`). Nothing is selected on the test set: the bank
size, the chunking and the calibration rule are fixed before any test image is scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (torch before faiss: one OpenMP runtime)

from edgead.deploy.export import export_run
from edgead.deploy.imx500 import Imx500Error, evaluate_sensor_outputs, export_imx500
from edgead.evaluation import evaluate_run
from edgead.reporting import results_page
from edgead.runs import load_run, read_config
from edgead.training import fit_run

METRICS = ("image_auroc", "pixel_auroc", "aupro")
COLUMNS = [
    "dataset", "model", "graph", "bank", "image_auroc", "pixel_auroc", "aupro", "image_auroc_change",
    "fit_s", "export_s", "sensor_model_mb", "sensor_runtime_mb", "sensor_total_mb", "utilization", "fits",
]  # fmt: skip
CURVE_COLUMNS = [
    "dataset", "bank", "float_image_auroc", "int8_image_auroc", "float_pixel_auroc", "int8_pixel_auroc",
    "sensor_model_mb", "sensor_runtime_mb", "sensor_total_mb", "utilization", "fits", "fit_s", "export_s",
]  # fmt: skip
COMPARED_PAGES = ("student.json", "tinyglass.json")


def fitted(dataset: Path, run: Path, reuse: bool, **hyperparameters) -> Path:
    """A PatchCore run of ``dataset`` in ``run`` (refitted unless ``reuse`` and it is there)."""
    if not (reuse and (run / "config.json").is_file()):
        fit_run(dataset, run, model="patchcore", hyperparameters=hyperparameters, progress=False, force=True)
    return run


def metrics_of(result: dict) -> dict:
    return {key: result.get(key) for key in METRICS}


def sensor_export(run: Path, memory_report_only: bool = False) -> tuple[dict, dict | None]:
    """The IMX500 export of a sensor-bank run with its test-split scores: (summary, host metrics or None)."""
    out = run / "export"  # where `edgead export RUN --format imx500` puts it (and `budget` looks)
    scores = run / "imx500_test_scores.npz"
    try:
        summary = export_imx500(run, out, progress=False, score_test=scores, memory_report_only=memory_report_only)
    except Imx500Error as exc:  # e.g. does not fit: the converter's report is still in the summary
        if not exc.summary or "memory" not in exc.summary:
            raise
        summary = exc.summary
    metrics = evaluate_sensor_outputs(run, scores) if scores.is_file() else None
    return summary, metrics


def memory_columns(summary: dict) -> dict:
    memory = summary.get("memory") or {}
    mb = {k: (memory.get(f"{k}_bytes") or 0) / 2**20 for k in ("model_memory", "runtime_memory", "memory_usage")}
    timings = summary.get("timings_s", {})
    return {
        "sensor_model_mb": mb["model_memory"],
        "sensor_runtime_mb": mb["runtime_memory"],
        "sensor_total_mb": mb["memory_usage"],
        "utilization": memory.get("utilization"),
        "fits": memory.get("fits"),
        # quantization + conversion, without the (evaluation-only) test scoring
        "export_s": timings.get("total", 0) - timings.get("score_test", 0) - timings.get("fidelity", 0),
    }


def sensor_rows(run: Path, bank: str, common: dict, with_ort_int8: bool) -> list[dict]:
    """The sensor graph of ``run`` in float, MCT INT8, MCT INT8 as QDQ ONNX (and edgead's ORT INT8 file)."""
    summary, host = sensor_export(run)
    fakequant = evaluate_run(run / "export" / summary["fakequant_onnx"], progress=False)
    rows = [
        {**common, "graph": "sensor graph, float (host decoder)", "bank": bank, **metrics_of(host["float"])},
        {**common, "graph": "sensor graph, MCT INT8 (IMX500)", "bank": bank, **metrics_of(host["int8"]),
         "image_auroc_change": host["int8"]["image_auroc"] - host["float"]["image_auroc"],
         **memory_columns(summary)},
        {**common, "graph": "sensor graph, MCT INT8 as QDQ ONNX (ONNX Runtime)", "bank": bank,
         **metrics_of(fakequant)},
    ]  # fmt: skip
    if with_ort_int8:
        export_run(run, "onnx", int8=True, progress=False)
        ort_int8 = evaluate_run(run / "export" / "model.int8.onnx", progress=False)
        rows.append({**common, "graph": "edgead ONNX Runtime INT8 file (head float)", "bank": bank,
                     **metrics_of(ort_int8)})  # fmt: skip
    return rows


def measure_dataset(dataset: Path, work: Path, banks: list[str], reuse: bool) -> list[dict]:
    """``banks``: sensor bank sizes; "full" puts the default run's whole bank (<= 20000 entries) on the sensor."""
    name = dataset.name
    common = {"dataset": name, "model": "patchcore"}
    full = fitted(dataset, work / f"patchcore_default_{name}", reuse)
    full_bank = f"default ({len(load_run(full)[0].head.memory_bank_)})"
    rows = [
        {**common, "graph": "server: full bank (torch, HNSW + exact max)", "bank": full_bank,
         **metrics_of(evaluate_run(full, progress=False)), "fit_s": read_config(full).extra.get("fit_seconds")},
    ]  # fmt: skip
    for bank in banks:
        if bank == "full":
            rows += sensor_rows(full, full_bank, common, with_ort_int8=False)
            continue
        sensor = fitted(dataset, work / f"patchcore_bank{bank}_{name}", reuse, bank_size=int(bank))
        rows.append(
            {**common, "graph": "sensor-sized bank (torch)", "bank": bank,
             **metrics_of(evaluate_run(sensor, progress=False)), "fit_s": read_config(sensor).extra.get("fit_seconds")}
        )  # fmt: skip
        rows += sensor_rows(sensor, bank, common, with_ort_int8=True)
    return rows


def compared_rows(datasets: list[str], pages: Path) -> list[dict]:
    """The trained in-sensor models' torch rows from their own pages (not re-measured here)."""
    rows = []
    for page in COMPARED_PAGES:
        path = pages / page
        if not path.is_file():
            continue
        for row in json.loads(path.read_text()):
            if row.get("runtime") == "torch" and row.get("dataset") in datasets:
                rows.append(
                    {"dataset": row["dataset"], "model": row["model"], "graph": f"torch (from {page[:-5]}.md)",
                     **{k: row.get(k) for k in METRICS}, "fit_s": row.get("fit_s")}  # fmt: skip
                )
    return rows


def measure_curve(dataset: Path, work: Path, sizes: list[int], reuse: bool) -> list[dict]:
    rows = []
    for size in sizes:
        run = fitted(dataset, work / f"patchcore_bank{size}_{dataset.name}", reuse, bank_size=size)
        summary, host = sensor_export(run, memory_report_only=True)
        row = {"dataset": dataset.name, "bank": size, "fit_s": read_config(run).extra.get("fit_seconds"),
               **memory_columns(summary)}  # fmt: skip
        for graph in ("float", "int8"):
            for key in ("image_auroc", "pixel_auroc"):
                row[f"{graph}_{key}"] = host[graph].get(key) if host else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def plot_curve(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    banks = [r["bank"] for r in rows]
    fig, left = plt.subplots(figsize=(6.4, 4))
    left.plot(banks, [r["float_image_auroc"] for r in rows], "o-", label="image AUROC, float graph")
    left.plot(banks, [r["int8_image_auroc"] for r in rows], "s--", label="image AUROC, MCT INT8")
    left.set_xlabel("memory-bank entries in the sensor graph")
    left.set_ylabel("image AUROC")
    right = left.twinx()
    right.bar(banks, [r["sensor_total_mb"] for r in rows], width=300, alpha=0.25, color="grey", label="sensor memory")
    right.axhline(8.0, color="red", lw=1, ls=":")
    right.set_ylabel("converter's memory report, MB (8 MB = the chip)")
    left.set_title(f"{rows[0]['dataset']}: bank size vs accuracy and IMX500 memory")
    left.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--banks", default="4096,full", help="sensor banks: sizes, or 'full' (the default run's bank)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/sensor_bank"))
    parser.add_argument("--curve-dataset", type=Path, default=None)
    parser.add_argument("--curve-sizes", default="1024,2048,4096,8192,12288,16384")
    parser.add_argument(
        "--keep-curve", action="store_true", help="take the curve rows from the --out page's JSON (measured before)"
    )
    parser.add_argument("--reuse-runs", action="store_true", help="reuse run folders already in --work-dir")
    parser.add_argument("--out", type=Path, default=Path("sensor_bank.md"))
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/sensor_bank.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: list[dict] = []
    start = time.perf_counter()
    for dataset in args.datasets:
        rows += measure_dataset(dataset, args.work_dir, args.banks.split(","), args.reuse_runs)
        print(json.dumps([r for r in rows if r["dataset"] == dataset.name], default=str), flush=True)
    names = [d.name for d in args.datasets]
    means = []
    kind = lambda r: (r["graph"], "default" if str(r.get("bank")).startswith("default") else r.get("bank"))  # noqa: E731
    for graph, bank in dict.fromkeys(kind(r) for r in rows):
        values = [r["image_auroc"] for r in rows if kind(r) == (graph, bank) and r.get("image_auroc") is not None]
        if len(values) == len(names):
            means.append({"dataset": "mean", "model": "patchcore", "graph": graph, "bank": bank,
                          "image_auroc": sum(values) / len(values)})  # fmt: skip
    compared = compared_rows(names, args.out.parent)
    for model in dict.fromkeys(r["model"] for r in compared):
        values = [r["image_auroc"] for r in compared if r["model"] == model]
        if len(values) == len(names):
            means.append({"dataset": "mean", "model": model, "graph": "torch", "image_auroc": sum(values) / len(values)})
    curve = []
    if args.keep_curve:
        curve = json.loads(args.out.with_suffix(".json").read_text())["curve"]
    elif args.curve_dataset is not None:
        sizes = [int(s) for s in args.curve_sizes.split(",")]
        curve = measure_curve(args.curve_dataset, args.work_dir, sizes, args.reuse_runs)
        plot_curve(curve, args.out.with_suffix(".png"))
    notes = [
        f"{time.perf_counter() - start:.0f} s in all, alone on the machine unless a note says otherwise.",
        "Sensor graph: EfficientNet-Lite0 stride 8 + 16 features with the 3x3 aggregation (152 channels at 32x32 "
        "for 256 px), the bank (N entries: -p bank_size=N chooses them from the default bank by the same greedy "
        "k-center rule once more; 'default (n)' is the default run's whole bank) as 1x1 convolutions of 1024 entries (weights 2m, bias -|m|^2, centred on the bank's mean), "
        "ReduceMax per chunk, element-wise Max, |x - c|^2 minus it, ReLU, Sqrt: patch distances [1, 1, 32, 32]. "
        "The host decoder (numpy) upsamples, blurs, takes the maximum and applies the run's threshold.",
        "Calibration (MCT): 64 images of the run's training split of train/good + 8 synthetic-defect versions "
        "of them (edgead's anomaly synthesis); never validation or test images. 'MCT INT8 as QDQ ONNX': the same "
        "quantized graph exported as standard ONNX (edgead_patchcore.fakequant.onnx), run by ONNX Runtime without "
        "graph optimisations and decoded on the host: the sensor's model on any CPU (`edgead test FILE`). "
        "'edgead ONNX Runtime INT8': `edgead export RUN --int8` (backbone stages in INT8, the head, i.e. the "
        "distances, in float), calibrated by the same rule (64 normal + 8 synthetic-defect images).",
        "image_auroc_change: the MCT INT8 graph minus the float sensor graph. sensor_*_mb: the converter's own "
        "memory report (imxconv-pt 3.19.2), MB = 2^20 bytes; 8 MB is the chip. export_s: MCT quantization + "
        "ONNX export + conversion (packerOut.zip), without the evaluation-only test scoring.",
        "fit_s: the whole fit (features + coreset; the sensor bank's second coreset included) as the run records it.",
        "mean rows: the mean over the datasets of each row kind (the 4096 and the default-bank sensor rows apart).",
        *args.note,
    ]
    sections = [("Accuracy, memory and time", rows + compared + means, COLUMNS)]
    if curve:
        sections.append((f"Bank size against accuracy and sensor memory ({curve[0]['dataset']})", curve, CURVE_COLUMNS))
    page = results_page("PatchCore inside the IMX500: the sensor-sized memory bank", command, notes, sections)
    if curve:
        page += f"\n![bank size curve]({args.out.with_suffix('.png').name})\n"
    args.out.write_text(page)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows + compared + means, "curve": curve}, indent=2, default=str) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
