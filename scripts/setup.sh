#!/usr/bin/env bash
# Creates .venv and installs edgead into it. Safe to run again: it reinstalls only when pyproject.toml changed.
# torch is installed first, pinned to 2.13.0 (the local CPU wheel), so nothing re-resolves it to a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.edgead-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -qq --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -qq --disable-pip-version-check -e ".[dev]"
  .venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was re-resolved to {torch.__version__}"
assert not torch.version.cuda, "a CUDA build of torch was installed; expected the CPU wheel"
PY
  echo "$want" > "$stamp"
fi
