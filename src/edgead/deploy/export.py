"""`edgead export`: a run folder -> deployable files, one format at a time.

- ``onnx``: ``model.onnx`` (fp32, parity-checked), and with ``int8`` also ``model.int8.onnx``
  (ONNX Runtime QDQ);
- ``openvino``: ``model.onnx`` plus the IR ``model.xml``, and with ``int8`` ``model.int8.xml`` (NNCF);
- ``tflite``: ``model.tflite`` (fp32) and with ``int8`` ``model.int8.tflite`` for LiteRT, converted in their own
  environment (see deploy/tflite.py);
- ``imx500``: Sony MCT INT8 + imx500-converter in their own environment (see deploy/imx500.py);
- ``edge``: the preprocess + backbone alone (``RUN/edge/features.onnx``), what an edge device runs in
  the split deployment's feature modes (see :mod:`edgead.edge`).

Every file carries the run's threshold and config, so `edgead test`/`predict` run it without the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgead.deploy.onnx_export import (
    calibration_set,
    config_from_metadata,
    export_onnx,
    read_metadata,
    validation_images,
)
from edgead.errors import EdgeadError, OutputError, UsageError
from edgead.outputs import atomic_write_text, check_work_dir
from edgead.runs import RunConfig, read_config

FORMATS = ("onnx", "openvino", "tflite", "imx500", "edge")
EXPORT_MARKER = "edgead_export.json"  # names the run an export folder belongs to
EXPORT_FORMAT = "edgead-export"
MIN_VALIDATION_IMAGES = 3  # below this, the INT8-vs-fp32 score check on validation images means nothing


def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    out_dir: str | Path | None = None,
    int8: bool = False,
    calibration: int = 64,
    calibration_dir: str | Path | None = None,
    input_dtype: str = "uint8",
    progress: bool = True,
    qat: bool = False,
    calibration_defects: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export ``run_dir`` to ``out_dir`` (default RUN/export); returns the files written and checks.

    ``qat``: fine-tune the run with fake quantization first (:mod:`edgead.deploy.qat`, saved as
    ``out_dir/qat_run``) and export that; the INT8 file is then post-training quantized from QAT weights.
    ``calibration_defects``: synthetic-defect images added to the calibration images (every INT8 path, the
    IMX500 included); None: one in eight for PatchCore on the IMX500 and for a PatchCore run with
    ``-p bank_size``, none otherwise.
    ``force``: write into ``out_dir`` although it holds files that are not this run's export."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    if not 1 <= calibration <= 10000:
        raise UsageError(f"--calibration must be between 1 and 10000 images, got {calibration}")
    if calibration_defects is not None and not 0 <= calibration_defects <= 10000:
        raise UsageError(f"--calibration-defects must be between 0 and 10000 images, got {calibration_defects}")
    if calibration_dir is not None and not Path(calibration_dir).is_dir():
        raise EdgeadError(f"--calibration-dir {calibration_dir} is not a folder of images")
    if fmt == "tflite" and input_dtype != "uint8":
        raise UsageError("--float-input is for onnx and openvino: .tflite files take the uint8 pixels")
    run_dir = Path(run_dir)
    config = read_config(run_dir)  # a missing or invalid run folder fails before anything is written
    if qat:
        from edgead.deploy.qat import check_qat_model

        if fmt == "edge":
            raise UsageError(
                "--qat prepares a model for INT8 (onnx, openvino, tflite, imx500), not the edge backbone"
            )
        if fmt != "imx500" and not int8:
            raise UsageError("--qat fine-tunes the model for its INT8 file: add --int8")
        check_qat_model(config.model)
    default_dir = run_dir / ("edge" if fmt == "edge" else "export")
    out_dir = check_export_dir(out_dir if out_dir is not None else default_dir, run_dir, config, force)
    check_toolchain(fmt, run_dir, calibration, calibration_defects, int8)  # before any work, --qat's included
    if fmt == "edge":  # the backbone alone, for an edge device of a split deployment (RUN/edge)
        from edgead.edge.backbone import export_edge

        path = export_edge(run_dir, out_dir)
        mark_export_dir(out_dir, run_dir, config)
        return {"files": {"edge": path}, "sizes_mb": {"edge": file_megabytes(path)}}
    mark_export_dir(out_dir, run_dir, config)  # before the first file: an interrupted export is still ours
    qat_report: dict[str, Any] = {}
    if qat:
        from edgead.deploy.qat import quantization_aware_run

        run_dir = quantization_aware_run(run_dir, out_dir, progress=progress)
        qat_report = {"qat_run": run_dir, "qat_schedule": read_config(run_dir).extra["qat"]}
    if fmt == "imx500":
        from edgead.deploy.imx500 import export_imx500

        summary = export_imx500(run_dir, out_dir, calibration, progress=progress, n_defects=calibration_defects)
        memory = summary["memory"]
        return {
            "files": {name: out_dir / name for name in summary["files"]},
            "sizes_mb": {name: size / 1e6 for name, size in summary["files"].items()},
            "imx500_memory": f"model {memory['model_memory']} + runtime {memory['runtime_memory']} = "
            f"{memory['memory_usage']} of {memory['memory_available']} ({memory['utilization']})",
            "fits_imx500": summary["fits"],
            "summary": out_dir / "imx500_summary.json",
            **qat_report,
        }
    if fmt == "tflite":
        from edgead.deploy.tflite import export_tflite

        report = {
            **export_tflite(run_dir, out_dir, int8, calibration, calibration_dir, progress, defects=calibration_defects),
            **qat_report,
        }
        report["sizes_mb"] = {key: file_megabytes(path) for key, path in report["files"].items()}
        add_int8_checks(report, report.pop("validation_images", None))
        return report
    onnx_path = out_dir / "model.onnx"
    result = export_onnx(run_dir, onnx_path, input_dtype=input_dtype)
    report: dict[str, Any] = {
        "files": {"onnx": onnx_path},
        "parity_max_abs_diff_map": result.max_abs_diff_map,
        "parity_max_abs_diff_score": result.max_abs_diff_score,
        "parity_images": result.parity_images,
        **qat_report,
    }
    images = validation = None
    if int8:
        config = config_from_metadata(read_metadata(onnx_path), onnx_path)
        images = calibration_set(config, calibration, calibration_dir, calibration_defects)
        report["calibration_images"] = len(images)
        validation = validation_images(config)
        report["int8_threshold"] = (
            f"from the INT8 model's scores on {len(validation)} normal validation images"
            if validation is not None
            else "the fp32 run's (its dataset is not on this machine)"
        )
    if fmt == "onnx" and images is not None:
        from edgead.deploy.quantize import quantize_onnxruntime

        report["files"]["onnx_int8"] = quantize_onnxruntime(
            onnx_path, out_dir / "model.int8.onnx", images, validation=validation
        )
    if fmt == "openvino":
        from edgead.deploy.quantize import convert_openvino, quantize_openvino

        report["files"]["openvino"] = convert_openvino(onnx_path, out_dir / "model.xml")
        if images is not None:
            report["files"]["openvino_int8"] = quantize_openvino(
                onnx_path, out_dir / "model.int8.xml", images, validation=validation
            )
    report["sizes_mb"] = {key: file_megabytes(path) for key, path in report["files"].items()}
    add_int8_checks(report, len(validation) if validation is not None else None)
    return report


def check_export_dir(out_dir: str | Path, run_dir: Path, config: RunConfig, force: bool) -> Path:
    """The export folder, refused (unless ``force``) when it holds anything but this run's export: a user's
    files, or another run's export (its marker names another run identity); checked before any work."""
    out_dir = check_work_dir(out_dir, "--out")
    if force or not out_dir.is_dir() or out_dir.resolve().parent == run_dir.resolve():
        return out_dir  # new, forced, or the run's own export/ or edge/ folder
    try:
        entries = [p.name for p in out_dir.iterdir() if not p.name.startswith(".edgead-")]
    except OSError as exc:
        raise OutputError(f"--out {out_dir} cannot be read ({exc.strerror or exc})") from None
    if not entries:
        return out_dir
    marker = out_dir / EXPORT_MARKER
    try:
        recorded = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or recorded.get("format") != EXPORT_FORMAT:
        raise OutputError(
            f"--out {out_dir} already holds files that are not an edgead export ({', '.join(sorted(entries)[:3])}"
            f"{' ...' if len(entries) > 3 else ''}): choose a new or empty folder, or pass --force to write "
            "beside them (files of the same name are replaced)"
        )
    if recorded.get("source_run_sha256") != config.identity():
        raise OutputError(
            f"--out {out_dir} holds the export of another run ({recorded.get('source_run')}): choose another "
            "folder, or pass --force to replace its files with this run's"
        )
    return out_dir


def mark_export_dir(out_dir: Path, run_dir: Path, config: RunConfig) -> None:
    """Record which run an export folder belongs to (so another run's export is never overwritten silently)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"format": EXPORT_FORMAT, "source_run": str(run_dir.resolve()), "source_run_sha256": config.identity()}
    atomic_write_text(out_dir / EXPORT_MARKER, json.dumps(marker, indent=2) + "\n")


def check_toolchain(fmt: str, run_dir: Path, calibration: int, defects: int | None, int8: bool) -> None:
    """A format's converter and its inputs are here, before any work (``--qat`` fine-tunes for minutes)."""
    if fmt == "imx500":
        from edgead.deploy.imx500 import check_imx500_ready

        check_imx500_ready(run_dir, calibration, n_defects=defects)
    else:
        check_converter(fmt, int8)


def check_converter(fmt: str, int8: bool) -> None:
    """The converter of ``tflite`` (its own environment) or ``openvino`` (OpenVINO, NNCF for INT8) is installed."""
    if fmt == "tflite":
        from edgead.deploy.tflite import converter_python

        converter_python()
    elif fmt == "openvino":
        for module in ("openvino", "nncf") if int8 else ("openvino",):
            try:
                __import__(module)
            except ImportError:
                raise EdgeadError(f"OpenVINO export needs the '{module}' package: pip install {module}") from None


def add_int8_checks(report: dict[str, Any], validation: int | None) -> None:
    """Each INT8 file's agreement with fp32 on the normal validation images, or why it cannot be checked."""
    if validation is None:
        return
    if validation < MIN_VALIDATION_IMAGES:
        report["int8_check"] = (
            f"WARNING: the run holds only {validation} normal validation image(s), too few to check the "
            "INT8 scores against fp32; fit on more good images, then compare with `edgead test`"
        )
        return
    for key in ("onnx_int8", "openvino_int8", "tflite_int8"):
        if key in report["files"]:
            report[f"{key}_vs_fp32"] = int8_agreement(report["files"][key])


def int8_agreement(path: Path) -> str:
    """One line on how closely an INT8 file's scores follow fp32 on the normal validation images."""
    from edgead.deploy.quantize import FLOAT_STAGES_KEY, INT8_ERROR_BUDGET
    from edgead.deploy.runtimes import load_inferencer

    model = load_inferencer(path)
    extra = model.config.extra
    error, correlation = extra["int8_score_error"], extra["int8_rank_correlation"]
    line = f"normal validation scores off by {error:.1%} of their spread, rank correlation {correlation:.3f}"
    if FLOAT_STAGES_KEY in model.metadata:
        line += f" ({model.metadata[FLOAT_STAGES_KEY]})"
    if error > INT8_ERROR_BUDGET:  # even with every stage but the deepest in float
        line += " (WARNING: INT8 changes the scores noticeably; compare with `edgead test` before deploying)"
    return line


def file_megabytes(path: str | Path) -> float:
    """Size on disk; an OpenVINO IR counts its .bin weights too."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        size += path.with_suffix(".bin").stat().st_size
    return size / 1e6
