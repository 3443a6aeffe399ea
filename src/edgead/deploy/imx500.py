"""The Sony IMX500 target: quantize a fitted TinyGLASS or student run for the sensor and check that it fits.

Sony's toolchain (Model Compression Toolkit for INT8 post-training quantization, ``imxconv-pt`` for
the conversion) needs another torch than edgead's, so it lives in its own environment, built once by
``bash scripts/setup_imx500.sh`` in ``$EDGEAD_IMX500_HOME`` (default ``~/.cache/edgead/imx500``).
This module only finds that environment and runs :mod:`edgead.deploy.imx500_worker` in it as a
subprocess; nothing here imports the toolchain.

    >>> summary = export_imx500("runs/bottle_tg", "exports/bottle_imx500")
    >>> summary["memory"]["memory_usage"], summary["fits"]

The output folder then holds ``edgead_<model>.onnx`` (MCT's quantized ONNX), ``packerOut.zip``
(what ``imx500-package`` turns into a firmware file on the Raspberry Pi), the converter's
``*_MemoryReport.json`` and ``dnnParams.xml``, its log ``imxconv.log`` and ``imx500_summary.json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgead.deploy.toolchain import output_tail, worker_env
from edgead.deploy.toolchain import toolchain_home as shared_home
from edgead.errors import EdgeadError
from edgead.runs import read_config

HOME_ENV = "EDGEAD_IMX500_HOME"
SETUP_COMMAND = "bash scripts/setup_imx500.sh"
STAMP_FILE = ".edgead-imx500-installed"
SUMMARY_FILE = "imx500_summary.json"
SUPPORTED_MODELS = ("tinyglass", "student")
WORKER = Path(__file__).with_name("imx500_worker.py")


class Imx500Error(EdgeadError):
    """The IMX500 export failed or the network does not fit; ``summary`` is the worker's report, if any."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary


def toolchain_home() -> Path:
    """Where ``scripts/setup_imx500.sh`` builds the toolchain: ``$EDGEAD_IMX500_HOME`` or the cache default."""
    return shared_home(HOME_ENV, "imx500")


def toolchain_python(home: str | Path | None = None) -> Path:
    """The toolchain environment's Python, or an EdgeadError that says how to build it."""
    home = Path(home) if home is not None else toolchain_home()
    venv = home / "venv"
    python = venv / "bin" / "python"
    complete = python.is_file() and (venv / "bin" / "imxconv-pt").is_file() and (venv / STAMP_FILE).is_file()
    if not complete:
        raise EdgeadError(
            f"the IMX500 toolchain is not installed in {venv}: run `{SETUP_COMMAND}` once from the edgead "
            f"repository (about 3 GB to download, 6 GB on disk; set {HOME_ENV} to build it elsewhere)"
        )
    return python


def toolchain_available(home: str | Path | None = None) -> bool:
    """True when the toolchain environment is installed (and Java is on the PATH for the converter)."""
    try:
        toolchain_python(home)
    except EdgeadError:
        return False
    return shutil.which("java") is not None


def export_imx500(
    run_dir: str | Path,
    out_dir: str | Path,
    n_calibration: int = 64,
    progress: bool = True,
    *,
    memory_report_only: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Quantize a fitted TinyGLASS or student run for the IMX500, convert it and return the summary.

    Args:
        run_dir: a run folder made by ``edgead fit --model tinyglass`` (or ``--model student``).
        out_dir: created if needed; receives the quantized ONNX, ``packerOut.zip``, the converter's
            memory report and ``imx500_summary.json``.
        n_calibration: images from the run's training split of train/good used by MCT to calibrate
            activation ranges (the dataset the run names must still be at its path).
        progress: stream the worker's and the tools' output; otherwise it is captured and only shown
            on failure.
        memory_report_only: ask the converter for the memory report alone (about half the time, no
            ``packerOut.zip``).
        timeout: seconds before the worker is stopped; None waits as long as it takes.

    Returns:
        The parsed ``imx500_summary.json``: ``fits``, ``memory`` (the converter's Model Memory,
        Runtime Memory, Memory Usage, Utilization and Fit In Chip, also in bytes), ``params``,
        ``input``/``output`` contracts, ``postprocess`` (what the host does with the patch scores),
        ``quantization_fidelity``, ``tool_versions``, ``timings_s`` and ``files`` (sizes in bytes).

    Raises:
        EdgeadError: the toolchain is not installed (run ``bash scripts/setup_imx500.sh``), Java is
            missing, or the run folder is not a TinyGLASS or student run.
        Imx500Error: a stage refused the network (the tool's message is in it) or the network does
            not fit in the sensor's memory; ``.summary`` holds the report.
    """
    if n_calibration < 1:
        raise EdgeadError(f"n_calibration must be at least 1, got {n_calibration}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = read_config(run_dir)
    if config.model not in SUPPORTED_MODELS:
        raise EdgeadError(
            f"{run_dir} holds a '{config.model}' model: the IMX500 target supports {', '.join(SUPPORTED_MODELS)} "
            "only (their whole inference is convolutions; PatchCore and PaDiM are not sensor graphs). "
            "Fit one with `edgead fit DATASET --model student`"
        )
    python = toolchain_python()
    if shutil.which("java") is None:
        raise EdgeadError(
            "the IMX500 converter needs Java 17 or newer and 'java' is not on the PATH: install it, e.g. "
            "`sudo apt-get install -y --no-install-recommends openjdk-17-jre-headless`"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)

    import edgead

    package_dir = Path(edgead.__file__).resolve().parent
    command = [
        str(python),
        str(WORKER),
        str(run_dir.resolve()),
        str(out_dir.resolve()),
        "--n-calibration",
        str(n_calibration),
    ]
    if memory_report_only:
        command.append("--memory-report-only")
    with tempfile.TemporaryDirectory(prefix="edgead-imx500-path-") as scratch:
        # A folder with just a link to this edgead package: the worker sees the same code, and none of
        # the packages installed next to it (torch 2.13 must not shadow the toolchain's torch).
        package_root = Path(scratch)
        try:
            (package_root / "edgead").symlink_to(package_dir, target_is_directory=True)
        except OSError:  # no symlinks here: fall back to the folder that holds the package
            package_root = package_dir.parent
        try:
            proc = subprocess.run(
                command,
                env=worker_env(package_root),
                stdout=None if progress else subprocess.PIPE,
                stderr=None if progress else subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Imx500Error(f"the IMX500 export did not finish in {timeout} s and was stopped") from None
    output = proc.stdout or ""

    if not summary_path.is_file():
        shown = f":\n{output_tail(output)}" if output else " (its output is above)"
        raise Imx500Error(
            f"the IMX500 worker stopped (exit status {proc.returncode}) without writing {summary_path}; "
            f"if the toolchain is broken, delete {python.parents[1]} and run `{SETUP_COMMAND}` again{shown}"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    if not summary.get("ok"):
        error = summary.get("error") or {}
        detail = output_tail(error.get("detail") or "", 6)
        raise Imx500Error(
            f"IMX500 export failed at stage '{error.get('stage')}': {error.get('message')}"
            + (f"\n{detail}" if detail else "")
            + f"\n(full report: {summary_path})",
            summary,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m edgead.deploy.imx500 RUN OUT [N]``: a thin entry point until the CLI has the target."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        print("usage: python -m edgead.deploy.imx500 RUN_DIR OUT_DIR [N_CALIBRATION]", file=sys.stderr)
        return 2
    try:
        summary = export_imx500(args[0], args[1], int(args[2]) if len(args) == 3 else 64)
    except EdgeadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    memory = summary["memory"]
    print(
        f"IMX500: model {memory['model_memory']}, runtime {memory['runtime_memory']}, "
        f"total {memory['memory_usage']} ({memory['utilization']}), fits: {summary['fits']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
