"""Converter environments that live apart from edgead's own (IMX500, TensorFlow Lite).

Their tools pin other versions of torch, numpy or onnx than edgead's, so each is installed once by a
script in ``scripts/`` into its own venv under a cache folder, and edgead runs a worker script with that
venv's Python as a subprocess. This module holds what those targets share.
"""

from __future__ import annotations

import os
from pathlib import Path


def toolchain_home(env_var: str, name: str) -> Path:
    """``$env_var`` if set, else ``~/.cache/edgead/<name>``: where the setup script builds the venv."""
    configured = os.environ.get(env_var)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "edgead" / name


def worker_env(package_root: Path | None = None) -> dict[str, str]:
    """The worker's environment: nothing of edgead's venv; ``package_root`` alone on PYTHONPATH if given."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    if package_root is not None:
        env["PYTHONPATH"] = str(package_root)
    return env


def output_tail(text: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a tool's output, for an error message."""
    return "\n".join(text.strip().splitlines()[-lines:])
