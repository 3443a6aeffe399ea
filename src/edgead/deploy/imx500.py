"""The Sony IMX500 target: quantize a fitted TinyGLASS, student or PatchCore run for the sensor, check that it fits.

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
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgead.deploy.toolchain import output_tail, worker_env
from edgead.deploy.toolchain import toolchain_home as shared_home
from edgead.errors import EdgeadError
from edgead.integrity import seal
from edgead.outputs import atomic_write_text
from edgead.runs import read_config

HOME_ENV = "EDGEAD_IMX500_HOME"
SETUP_COMMAND = "bash scripts/setup_imx500.sh"
STAMP_FILE = ".edgead-imx500-installed"
SUMMARY_FILE = "imx500_summary.json"
SUMMARY_SEAL_KEY = "summary_sha256"  # the seal over the summary (its postprocess holds the host's threshold)
FAILED_SUMMARY_FILE = "imx500_failed.json"  # a failed export's report; the previous export stays as it was
SUPPORTED_MODELS = ("tinyglass", "student", "patchcore")
# PatchCore bank entries refused before any work. Converter's report at 256 px: 2.35 MB runtime + 0.88 MB
# backbone + 0.16 MB per 1024 entries (4096: 3.87 MB, 16384: 5.83 MB), so about 30,000 entries would fill 8 MB;
# the converter decides below this limit.
SENSOR_BANK_LIMIT = 24576
SENSOR_BANK_HINT = "fit a sensor-sized bank with `edgead fit DATASET --model patchcore -p bank_size=4096`"
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
    n_defects: int | None = None,
    chunk_size: int = 1024,
    score_test: str | Path | None = None,
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
        n_defects: synthetic-defect versions of calibration images added to the calibration set; None:
            ``n_calibration // 8`` for PatchCore (its distance layers would otherwise be calibrated to
            normal distances only and clip every anomaly to one ceiling), 0 for the trained models.
        chunk_size: PatchCore bank entries per 1x1 convolution of the sensor graph.
        score_test: also score the run's test split with the float and the MCT-quantized sensor graph
            and save the patch scores there (.npz), for :func:`edgead.deploy.sensor_bank.score_sensor_outputs`.

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
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config, python = check_imx500_ready(run_dir, n_calibration, chunk_size, n_defects)
    if n_defects is None:
        n_defects = n_calibration // 8 if config.model == "patchcore" else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    # The worker writes into a temporary folder beside the outputs; its files replace the previous export's
    # only once it succeeded, so a failed or interrupted export leaves that export as it was.
    staging = Path(tempfile.mkdtemp(prefix=".edgead-imx500.", suffix=".partial", dir=out_dir))
    try:
        summary = _run_worker(
            python, run_dir, staging, out_dir, n_calibration, n_defects, chunk_size, score_test,
            memory_report_only, progress, timeout,
        )
        if summary.get("fakequant_onnx"):
            label_sensor_graph(staging / summary["fakequant_onnx"], run_dir, config, summary)
        summary["out_dir"] = str(out_dir.resolve())  # where its files are once published
        summary = seal(summary, SUMMARY_SEAL_KEY)  # the host decides with its threshold: sealed like a run
        atomic_write_text(staging / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
        publish(staging, out_dir, last=SUMMARY_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def check_imx500_ready(
    run_dir: Path, n_calibration: int = 64, chunk_size: int = 1024, n_defects: int | None = None
):  # noqa: ANN201 - (RunConfig, the toolchain's Python)
    """Every precondition of an IMX500 export, checked before any work (``--qat`` fine-tunes only after it):
    the options, a supported run, the toolchain and Java."""
    if n_calibration < 1:
        raise EdgeadError(f"n_calibration must be at least 1, got {n_calibration}")
    if not 1 <= chunk_size <= SENSOR_BANK_LIMIT:
        raise EdgeadError(f"chunk_size must be between 1 and {SENSOR_BANK_LIMIT}, got {chunk_size}")
    config = read_config(run_dir)
    if config.model not in SUPPORTED_MODELS:
        raise EdgeadError(
            f"{run_dir} holds a '{config.model}' model: the IMX500 target supports {', '.join(SUPPORTED_MODELS)} "
            "only (their whole inference is convolutions and channel reductions; PaDiM is not a sensor graph). "
            "Fit one with `edgead fit DATASET --model patchcore`"
        )
    if config.model == "patchcore" and (config.head.get("bank_size") or 0) > SENSOR_BANK_LIMIT:
        raise EdgeadError(
            f"{run_dir} holds a PatchCore bank of up to {config.head['bank_size']} entries: too many for the "
            f"sensor (at most {SENSOR_BANK_LIMIT}); {SENSOR_BANK_HINT}"
        )
    if n_defects is not None and n_defects < 0:
        raise EdgeadError(f"n_defects must be non-negative, got {n_defects}")
    python = toolchain_python()
    if shutil.which("java") is None:
        raise EdgeadError(
            "the IMX500 converter needs Java 17 or newer and 'java' is not on the PATH: install it, e.g. "
            "`sudo apt-get install -y --no-install-recommends openjdk-17-jre-headless`"
        )
    return config, python


def publish(staging: Path, out_dir: Path, last: str) -> None:
    """Move every entry of ``staging`` into ``out_dir`` by rename, replacing entries of the same name, ``last``
    at the end (the marker a reader checks: the summary names the files beside it)."""
    entries = sorted(staging.iterdir(), key=lambda p: p.name == last)
    for entry in entries:
        target = out_dir / entry.name
        if entry.is_dir() and target.is_dir():
            trash = Path(tempfile.mkdtemp(prefix=".edgead-old.", dir=out_dir))
            os.rename(target, trash / entry.name)
            os.rename(entry, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(entry, target)


def _run_worker(
    python: Path, run_dir: Path, staging: Path, out_dir: Path, n_calibration: int, n_defects: int,
    chunk_size: int, score_test: str | Path | None, memory_report_only: bool, progress: bool, timeout: float | None,
) -> dict[str, Any]:
    """Run the worker into ``staging``; its summary, or an Imx500Error (the failed report kept in ``out_dir``)."""
    import edgead

    summary_path = staging / SUMMARY_FILE
    package_dir = Path(edgead.__file__).resolve().parent
    command = [
        str(python),
        str(WORKER),
        str(run_dir.resolve()),
        str(staging.resolve()),
        "--n-calibration",
        str(n_calibration),
        "--n-defects",
        str(n_defects),
        "--chunk-size",
        str(chunk_size),
        "--max-bank-entries",
        str(SENSOR_BANK_LIMIT),
    ]
    if score_test is not None:
        command += ["--score-test", str(Path(score_test).resolve())]
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
        failed = atomic_write_text(out_dir / FAILED_SUMMARY_FILE, summary_path.read_text())
        error = summary.get("error") or {}
        detail = output_tail(error.get("detail") or "", 6)
        raise Imx500Error(
            f"IMX500 export failed at stage '{error.get('stage')}': {error.get('message')}"
            + (f"\n{detail}" if detail else "")
            + f"\n(full report: {failed}; the previous export in {out_dir}, if any, is unchanged)",
            summary,
        )
    return summary


def label_sensor_graph(path: Path, run_dir: Path, config, summary: dict[str, Any]) -> None:
    """Give MCT's fake-quantized sensor graph edgead's metadata (threshold, config, hashes), so that
    ``edgead test`` and ``predict`` run it with ONNX Runtime and the host decoder: the sensor's model on a CPU."""
    from edgead.deploy.onnx_export import metadata_for, write_metadata

    metadata = metadata_for(config, "float32", run_dir)
    metadata["sensor_graph"] = "patch_scores"
    metadata["quantization"] = (
        f"Sony MCT {summary['tool_versions'].get('model-compression-toolkit')} INT8 for the IMX500 (TPC "
        f"{summary['target_platform']['mct_tpc_version']}), {summary['calibration']}; fake-quantized ONNX "
        "run without graph optimisation (the sensor's quantized values)"
    )
    write_metadata(path, metadata)


class _SensorOutputs:
    """A predictor that answers with saved sensor outputs, decoded on the host, in the order they were saved
    (the test split's); lets :func:`edgead.inference.predict_samples` gather labels and masks as for any model."""

    def __init__(self, patch_scores, decoder) -> None:  # noqa: ANN001
        self.image_size = decoder.image_size
        self._decoder = decoder
        self._patch_scores = patch_scores
        self._next = 0

    def eval(self) -> _SensorOutputs:
        return self

    def predict(self, images):  # noqa: ANN001, ANN201
        import numpy as np
        import torch

        part = self._patch_scores[self._next : self._next + len(images)]
        self._next += len(images)
        decoded = [self._decoder.decode(p) for p in part]
        maps = np.stack([d.anomaly_map for d in decoded])[:, None]
        return torch.from_numpy(maps), torch.tensor([d.score for d in decoded])


def evaluate_sensor_outputs(run_dir: str | Path, scores_file: str | Path) -> dict[str, dict[str, Any]]:
    """Metrics of the sensor graph's test-split outputs that ``export_imx500(score_test=...)`` saved.

    Each saved set of patch scores (``float``: the sensor graph in float; ``int8``: MCT's quantized
    graph) goes through the host decoder (:class:`~edgead.deploy.imx500_host.SensorDecoder`, with the
    run's threshold), then the same metrics as ``edgead test``. Returns one metrics dict per set.
    """
    import numpy as np

    from edgead.data import open_dataset
    from edgead.deploy.imx500_host import SensorDecoder
    from edgead.evaluation import check_finite_scores, score_predictions
    from edgead.inference import predict_samples

    config = read_config(run_dir)
    try:
        saved = np.load(scores_file, allow_pickle=False)
        arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError) as exc:
        raise EdgeadError(f"{scores_file} is not a sensor scores file: {exc}") from None
    data = open_dataset(config.extra["dataset"])
    if [str(s.path) for s in data.test] != arrays.pop("paths").tolist():
        raise EdgeadError(f"{scores_file} does not hold this dataset's test images in order: re-export to score")
    decoder = SensorDecoder(config.image_size, config.blur_sigma, config.threshold, config.score_min, config.score_max)
    results = {}
    for name, patch_scores in arrays.items():
        predictions = predict_samples(_SensorOutputs(patch_scores, decoder), data.test, progress=False)
        check_finite_scores(predictions.scores, predictions.maps, f"the {name} sensor graph on {data.name}")
        results[name] = score_predictions(predictions, config)
    return results


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
