#!/usr/bin/env bash
# Builds the isolated Sony IMX500 toolchain used by `edgead export RUN --format imx500`.
#
# Only needed for the IMX500 target: it is never part of the default install, CI or scripts/setup.sh.
# The toolchain cannot live in edgead's own .venv (MCT imports torchvision, whose registry builds want
# another torch than edgead's pinned CPU wheel), so it gets its own venv in a cache folder:
#
#   ${EDGEAD_IMX500_HOME:-$HOME/.cache/edgead/imx500}/venv
#
# holding torch 2.6.0 + torchvision 0.21.0, Sony's Model Compression Toolkit 2.5.1 (post-training
# quantization for the IMX500 target platform), imx500-converter[pt] 3.19.2 (`imxconv-pt`), ONNX
# (MCT exports through it) and the few libraries that importing edgead's model code needs. edgead itself
# is NOT installed there: the export puts the calling edgead's own package on the worker's path.
#
# About 3 GB is downloaded (torch's CUDA libraries included: they run fine on a CPU-only machine) and
# 6 GB used on disk. Safe to run again: it does nothing once the stamp file matches this recipe.
# Needs Python 3.10-3.12 (PYTHON=..., default python3) and Java 17+ (the converter is jars).
set -euo pipefail

HOME_DIR=${EDGEAD_IMX500_HOME:-$HOME/.cache/edgead/imx500}
VENV="$HOME_DIR/venv"
STAMP="$VENV/.edgead-imx500-installed"
PYTHON=${PYTHON:-python3}

# The recipe (verified on 2 CPU cores, no GPU). MCT 2.5.1 pins mct-quantizers 1.6.0, which the
# converter also wants; MCT 2.6.x would conflict with it in one venv.
TOOLCHAIN=(
  "torch==2.6.0"
  "torchvision==0.21.0"
  "model-compression-toolkit==2.5.1"
  "imx500-converter[pt]==3.19.2"
  "onnx==1.17.0"
  "onnxruntime==1.21.1"
  "onnxruntime-extensions==0.13.0"
)
# What `import edgead.runs` pulls in (edgead.data imports cv2, edgead.metrics scipy/sklearn), unpinned
# so that pip picks versions that agree with the toolchain above.
EDGEAD_RUNTIME=(numpy scipy scikit-learn pillow opencv-python-headless safetensors tqdm)

want=$(printf '%s\n' "${TOOLCHAIN[@]}" "${EDGEAD_RUNTIME[@]}" | sha256sum | cut -d' ' -f1)

check_java() {
  if ! command -v java >/dev/null 2>&1; then
    echo "error: Java 17 or newer is needed by the IMX500 converter and 'java' is not on the PATH." >&2
    echo "       Install it, e.g.: sudo apt-get install -y --no-install-recommends openjdk-17-jre-headless" >&2
    return 1
  fi
  local version major
  version=$(java -version 2>&1 | head -n1 | sed -E 's/.*version "([^"]+)".*/\1/')
  major=${version%%.*}
  if [ "$major" = "1" ]; then  # 1.8.0_xxx style
    major=$(echo "$version" | cut -d. -f2)
  fi
  if ! [[ "$major" =~ ^[0-9]+$ ]] || [ "$major" -lt 17 ]; then
    echo "error: the IMX500 converter needs Java 17 or newer; 'java -version' says $version." >&2
    echo "       Install it, e.g.: sudo apt-get install -y --no-install-recommends openjdk-17-jre-headless" >&2
    return 1
  fi
  echo "java $version: ok"
}

check_python() {
  local version
  if ! version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "error: '$PYTHON' is not a working Python; set PYTHON=/path/to/python3.11" >&2
    return 1
  fi
  case "$version" in
    3.10|3.11|3.12) echo "python $version: ok" ;;
    *) echo "error: the IMX500 converter needs Python 3.10-3.12, '$PYTHON' is $version; set PYTHON=..." >&2
       return 1 ;;
  esac
}

check_java
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/imxconv-pt" ]; then
  echo "IMX500 toolchain already installed in $VENV"
  exit 0
fi
check_python

mkdir -p "$HOME_DIR"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "installing the IMX500 toolchain into $VENV (about 3 GB to download, a few minutes)"
# (pip's "Location ... is ignored" lines come from extra package indexes a machine may configure: noise.)
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install "${TOOLCHAIN[@]}" "${EDGEAD_RUNTIME[@]}"

# Check that everything the worker needs imports, and that the converter's entry point is there.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import cv2, model_compression_toolkit, onnx, safetensors, scipy, sklearn, torch, torchvision  # noqa: F401

for name in ("torch", "torchvision", "model-compression-toolkit", "mct-quantizers", "imx500-converter", "onnx"):
    print(f"{name} {md.version(name)}")
PY
if [ ! -x "$VENV/bin/imxconv-pt" ]; then
  echo "error: imx500-converter installed but $VENV/bin/imxconv-pt is missing" >&2
  exit 1
fi
echo "$want" > "$STAMP"
echo "IMX500 toolchain ready: $VENV"
