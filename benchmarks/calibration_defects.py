"""Does adding synthetic-defect images to the INT8 calibration set help? Measured per run and INT8 path.

    python benchmarks/calibration_defects.py runs/sensor_bank/patchcore_bank4096_bottle \
        runs/tinyglass/tinyglass_default_bottle --imx500 --out docs/results/calibration_defects.md

For each run and each INT8 path (ONNX Runtime ``export --int8``; with ``--imx500`` also Sony MCT for the
IMX500, scored on the test split in the toolchain's environment), the same export twice: calibrated on 64
normal training images alone, and on those plus 8 synthetic-defect versions of them (edgead's anomaly
synthesis; never test images). Test-split image and pixel AUROC of each, beside the float model's. The
rule was fixed before this measurement; nothing here is chosen on the test set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch  # noqa: F401  (torch before faiss: one OpenMP runtime)

from edgead.deploy.export import export_run
from edgead.deploy.imx500 import SUPPORTED_MODELS, evaluate_sensor_outputs, export_imx500
from edgead.evaluation import evaluate_run
from edgead.reporting import results_header, write_rows_page
from edgead.runs import read_config

COLUMNS = [
    "run", "model", "dataset", "path", "float_image_auroc", "normal_only_image_auroc", "with_defects_image_auroc",
    "change_image_auroc", "float_pixel_auroc", "normal_only_pixel_auroc", "with_defects_pixel_auroc",
]  # fmt: skip
DEFECTS = 8


def onnxruntime_rows(run: Path, work: Path) -> dict:
    results = {}
    for name, defects in (("normal_only", 0), ("with_defects", DEFECTS)):
        out = work / f"ort_{name}"
        shutil.rmtree(out, ignore_errors=True)
        export_run(run, "onnx", out, int8=True, progress=False, calibration_defects=defects)
        results[name] = evaluate_run(out / "model.int8.onnx", out_dir=out / "test", progress=False)
    float_metrics = evaluate_run(run, out_dir=work / "torch_test", progress=False)
    return {"path": "ONNX Runtime INT8 (head in float)", "float": float_metrics, **results}


def imx500_rows(run: Path, work: Path) -> dict:
    results = {}
    for name, defects in (("normal_only", 0), ("with_defects", DEFECTS)):
        out = work / f"imx500_{name}"
        scores = work / f"imx500_{name}_test_scores.npz"
        export_imx500(run, out, progress=False, n_defects=defects, score_test=scores, memory_report_only=True)
        metrics = evaluate_sensor_outputs(run, scores)
        results[name] = metrics["int8"]
        results["float"] = metrics["float"]
    return {"path": "Sony MCT INT8 (IMX500 sensor graph)", **results}


def as_row(run: Path, measured: dict) -> dict:
    config = read_config(run)
    row = {"run": run.name, "model": config.model, "dataset": config.extra.get("dataset_name"), "path": measured["path"]}
    for key in ("image_auroc", "pixel_auroc"):
        for name in ("float", "normal_only", "with_defects"):
            row[f"{name}_{key}"] = measured[name].get(key)
    if row["with_defects_image_auroc"] is not None and row["normal_only_image_auroc"] is not None:
        row["change_image_auroc"] = row["with_defects_image_auroc"] - row["normal_only_image_auroc"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--imx500", action="store_true", help="also the IMX500 path (needs its toolchain)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/calibration_defects"))
    parser.add_argument("--out", type=Path, default=Path("calibration_defects.md"))
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    command = "python benchmarks/calibration_defects.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [
        *results_header("INT8 calibration with synthetic defects: normal images alone vs normal + 8 defects", command),
        "- 64 normal training images (the run's train/good) in both; 'with_defects' adds 8 synthetic-defect "
        "versions of them (edgead's anomaly synthesis). change_image_auroc = with_defects - normal_only.",
        "- ONNX Runtime INT8 keeps the head (distances, scores) in float, as every edgead INT8 file does: the "
        "rule can only move the backbone's ranges there. On the IMX500 the whole graph, head included, is INT8.",
        *[f"- {note}" for note in args.note],
        "",
    ]
    rows: list[dict] = []
    for run in args.runs:
        work = args.work_dir / run.name
        work.mkdir(parents=True, exist_ok=True)
        rows.append(as_row(run, onnxruntime_rows(run, work)))
        write_rows_page(args.out, header, rows, COLUMNS)
        if args.imx500 and read_config(run).model in SUPPORTED_MODELS:
            rows.append(as_row(run, imx500_rows(run, work)))
            write_rows_page(args.out, header, rows, COLUMNS)
        print(json.dumps(rows[-1], default=str), flush=True)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
