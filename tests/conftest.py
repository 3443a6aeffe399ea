"""Shared fixtures: a small synthetic dataset made once per session, and the real datasets' location."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgead.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "parts"
    return make_synthetic_dataset(root, n_train=30, n_test_good=8, n_test_defect=8, size=128, seed=1)


@pytest.fixture(scope="session")
def fitted_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PatchCore run fitted on the synthetic dataset with the pretrained default backbone."""
    from edgead.training import fit_run

    run_dir = tmp_path_factory.mktemp("runs") / "patchcore"
    fit_run(synthetic_dataset, run_dir, model="patchcore", image_size=128, progress=False)
    return run_dir


def fit_small_tinyglass(
    dataset: Path, run_dir: Path, image_size: int = 128, pretrained: bool = True, **head
) -> Path:
    """A short TinyGLASS fit for tests (default 4 epochs, 2 views); ``head`` overrides hyperparameters."""
    from edgead.training import fit_run

    fit_run(
        dataset,
        run_dir,
        model="tinyglass",
        image_size=image_size,
        pretrained=pretrained,
        progress=False,
        hyperparameters={"epochs": 4, "views": 2, **head},
    )
    return run_dir


@pytest.fixture(scope="session")
def tinyglass_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TinyGLASS run on the synthetic dataset, short but with the pretrained backbone."""
    return fit_small_tinyglass(synthetic_dataset, tmp_path_factory.mktemp("runs") / "tinyglass")


def require_shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"{SHARED_DATASETS} is absent")
    return SHARED_DATASETS


def write_sealed_config(run_dir: Path, config: dict) -> None:
    """Write ``config`` as the run's config.json with a valid seal: what edgead itself would write, for tests
    that need a run whose settings differ (another model's head, a moved dataset) past the seal check."""
    from edgead.integrity import seal
    from edgead.runs import CONFIG_FILE, SEAL_KEY

    (run_dir / CONFIG_FILE).write_text(json.dumps(seal(config, SEAL_KEY)))


# --- the `edgead` command as a user runs it (shared by the bad-input tests) ---------------------------------


def edgead(*args: str | os.PathLike | bytes, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgead", *(a if isinstance(a, bytes) else str(a) for a in args)],
        capture_output=True,
        text=True,
        errors="replace",
        cwd=cwd,
        timeout=600,
    )


def edgead_inprocess(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike) -> subprocess.CompletedProcess:
    """The same command through ``edgead.cli.main`` in this process: for the many option cases that must
    fail before any work (one subprocess per class checks the real process too)."""
    from edgead.cli import main

    capsys.readouterr()
    argv, sys.argv = sys.argv, ["edgead", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exactly one `error:` line on stderr, no traceback, the expected exit code; returns the line."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def padim_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, fast PaDiM run (64 px) that tests may copy and damage."""
    run = tmp_path_factory.mktemp("reliability") / "padim"
    result = edgead("fit", synthetic_dataset, "--model", "padim", "--image-size", "64", "--out", run)
    assert result.returncode == 0, result.stderr
    return run


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


@contextmanager
def running_server(command: list[str], port: int, log_path: Path) -> Iterator[str]:
    """A scoring server subprocess on loopback (one thread per library): its URL once /healthz answers (120 s
    at most); stopped with SIGTERM, then SIGKILL of the session it started, and only it."""
    from edgead.edge.client import EdgeClientError, wait_until_healthy

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            try:
                wait_until_healthy(url, lambda: process.poll() is None)
            except EdgeClientError as exc:
                pytest.fail(f"{exc}: {log_path.read_text()[-2000:]}")
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
