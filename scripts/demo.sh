#!/usr/bin/env bash
# Set up (first run only) and run the demo on a built-in synthetic dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgead demo "$@"
