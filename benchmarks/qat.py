"""PTQ against QAT: the INT8 ONNX Runtime file of a trained run, post-training quantized as it is, and after
`edgead export --int8 --qat` (a short fine-tune with fake INT8 quantization, then the same PTQ).

    python benchmarks/qat.py runs/student/student_default_bottle runs/tinyglass/tinyglass_default_bottle \
        --work-dir runs/qat --out docs/results/qat.md

Per run: the fp32 run (torch), its PTQ file, the QAT run in fp32 (torch: what the fine-tune alone did) and its
INT8 file, all on the test split of the run's own dataset. int8_error: the INT8 file's mean score error on the
normal validation images, in units of the normal score spread (the label-free check `export` prints), against
its own fp32 model. Nothing is selected on the test set: the QAT schedule is fixed (edgead.deploy.qat).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (torch before faiss: one OpenMP runtime)

from edgead.deploy.export import export_run
from edgead.deploy.runtimes import load_inferencer
from edgead.evaluation import evaluate_run
from edgead.reporting import results_header, write_rows_page
from edgead.runs import read_config

COLUMNS = [
    "model", "dataset", "fp32_image_auroc", "ptq_image_auroc", "qat_fp32_image_auroc", "qat_image_auroc",
    "fp32_pixel_auroc", "ptq_pixel_auroc", "qat_pixel_auroc", "ptq_int8_error", "qat_int8_error", "qat_s",
]  # fmt: skip


def int8_error(path: Path) -> float:
    return float(load_inferencer(path).config.extra["int8_score_error"])


def measure(run: Path, work: Path) -> dict:
    config = read_config(run)
    dataset = config.extra["dataset"]

    def metrics(path: Path, runtime: str | None = None) -> dict:
        return evaluate_run(path, dataset, out_dir=work / "tests" / f"{path.parent.name}_{path.stem}", progress=False, runtime=runtime)

    fp32 = metrics(run)
    ptq = export_run(run, "onnx", work / "ptq", int8=True, progress=False)
    start = time.perf_counter()
    qat = export_run(run, "onnx", work / "qat", int8=True, qat=True, progress=False)
    qat_s = time.perf_counter() - start
    ptq_int8 = metrics(ptq["files"]["onnx_int8"], "onnxruntime")
    qat_fp32 = metrics(qat["qat_run"])
    qat_int8 = metrics(qat["files"]["onnx_int8"], "onnxruntime")
    return {
        "model": config.model, "dataset": config.extra.get("dataset_name"),
        "fp32_image_auroc": fp32["image_auroc"], "ptq_image_auroc": ptq_int8["image_auroc"],
        "qat_fp32_image_auroc": qat_fp32["image_auroc"], "qat_image_auroc": qat_int8["image_auroc"],
        "fp32_pixel_auroc": fp32.get("pixel_auroc"), "ptq_pixel_auroc": ptq_int8.get("pixel_auroc"),
        "qat_pixel_auroc": qat_int8.get("pixel_auroc"),
        "ptq_int8_error": int8_error(ptq["files"]["onnx_int8"]), "qat_int8_error": int8_error(qat["files"]["onnx_int8"]),
        "qat_s": qat_s, "qat_schedule": json.dumps(qat["qat_schedule"]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/qat"))
    parser.add_argument("--out", default="docs/results/qat.md")
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    for run in args.runs:
        read_config(run)  # every run folder checked before the first export
    header = [
        *results_header("INT8: post-training quantization (PTQ) against quantization-aware training (QAT)",
                        "python " + " ".join(sys.argv)),
        "- " + __doc__.split("\n\n")[2].replace("\n", " "),
        "- INT8 = ONNX Runtime static QDQ (u8 activations, s8 per-channel weights, rounding bias corrected; which "
        "backbone stages run in INT8 is chosen on normal validation images, as `edgead export --int8` does).",
        *[f"- {note}" for note in args.note],
        "",
    ]  # fmt: skip
    rows = []
    for run in args.runs:
        rows.append(measure(run, args.work_dir / run.name))
        print(json.dumps(rows[-1]), flush=True)
        write_rows_page(args.out, header, rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
