#!/usr/bin/env bash
# Builds the isolated LiteRT (TFLite) converter used by `edgead export RUN --format tflite [--int8]`.
#
# Only needed for the TFLite target: never part of the default install, CI or scripts/setup.sh. onnx2tf pins
# every one of its dependencies exactly (numpy 2.2.6, onnx 1.20.1, onnxruntime 1.26.0, protobuf 7.35.1, ...),
# which edgead's own .venv must not be bent to, so it gets its own venv in a cache folder:
#
#   ${EDGEAD_TFLITE_HOME:-$HOME/.cache/edgead/tflite}/venv
#
# holding onnx2tf 2.6.9 (ONNX -> .tflite with its flatbuffer_direct backend: no TensorFlow needed;
# TensorFlow is only its optional extra for the legacy tf_converter backend and is not installed),
# ai-edge-litert 2.3.0 (the LiteRT runtime; the same version edgead itself runs .tflite files with) and
# ai-edge-quantizer 0.10.0 (selective INT8: the backbone in INT8, head and postprocess in float).
# edgead itself is NOT installed there: the worker only reads an ONNX file and a calibration .npy.
#
# About 250 MB downloaded (onnxruntime, opencv-python and numpy are most of it), ~700 MB on disk.
# Safe to run again: it does nothing once the stamp file matches this recipe.
# Needs Python 3.11-3.13 (PYTHON=..., default python3). onnx2tf 2.x declares Python >= 3.12; on 3.11 it is
# installed with --ignore-requires-python (every dependency it pins has cp311 wheels and its sources
# compile on 3.11); the smoke test at the end converts, quantizes and runs a tiny model either way.
set -euo pipefail

HOME_DIR=${EDGEAD_TFLITE_HOME:-$HOME/.cache/edgead/tflite}
VENV="$HOME_DIR/venv"
STAMP="$VENV/.edgead-tflite-installed"
PYTHON=${PYTHON:-python3}

# Step 1: the converter and its exact pins (from its wheel's metadata).
CONVERTER=("onnx2tf==2.6.9")
# Step 2: the quantizer, which pins ai-edge-litert==2.3.0 where onnx2tf 2.6.9 pins ==2.1.2 (one resolve
# cannot satisfy both). Installed second, pip replaces LiteRT 2.1.2 by 2.3.0 and warns that onnx2tf's pin is
# not met: onnx2tf only uses LiteRT's Interpreter (calibration ranges, accuracy checks), which 2.3.0 has.
# HOLD keeps onnx2tf's numpy/protobuf pins while step 2 resolves (scipy, absl-py, ... come with it).
QUANTIZER=("ai-edge-quantizer==0.10.0" "ai-edge-litert==2.3.0")
HOLD=("numpy==2.2.6" "protobuf==7.35.1")

check_python() {
  local version
  if ! version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "error: '$PYTHON' is not a working Python; set PYTHON=/path/to/python3.12" >&2
    return 1
  fi
  case "$version" in
    3.11) echo "python $version: ok (onnx2tf installed with --ignore-requires-python)"; IGNORE_RP=(--ignore-requires-python) ;;
    3.12|3.13) echo "python $version: ok"; IGNORE_RP=() ;;
    *) echo "error: the TFLite converter needs Python 3.11-3.13, '$PYTHON' is $version; set PYTHON=..." >&2
       return 1 ;;
  esac
  PY_VERSION=$version
}

check_python
want=$(printf '%s\n' "$PY_VERSION" "${CONVERTER[@]}" "${QUANTIZER[@]}" "${HOLD[@]}" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "TFLite converter already installed in $VENV"
  exit 0
fi

mkdir -p "$HOME_DIR"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "installing the TFLite converter into $VENV (about 250 MB to download)"
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install "${IGNORE_RP[@]}" "${CONVERTER[@]}"
pip_install "${QUANTIZER[@]}" "${HOLD[@]}"

# Smoke test: a tiny float-input NCHW graph (Conv, Relu, ReduceMax) -> fp32 .tflite with onnx2tf, a static
# INT8 copy with AI Edge Quantizer, both run with LiteRT. Seconds; fails loudly if any piece is missing.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

for name in ("onnx2tf", "ai-edge-litert", "ai-edge-quantizer", "onnx", "onnxruntime", "numpy", "protobuf"):
    print(f"{name} {md.version(name)}")

rng = np.random.default_rng(0)
w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
graph = helper.make_graph(
    [
        helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1], name="/backbone/stages.0/Conv"),
        helper.make_node("Relu", ["c"], ["r"], name="/backbone/stages.0/Relu"),
        helper.make_node("ReduceMax", ["r"], ["score"], keepdims=0, name="/head/ReduceMax"),
    ],
    "smoke",
    [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
    [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
    [w],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    onnx.save(model, tmp / "smoke.onnx")
    import onnx2tf

    onnx2tf.convert(input_onnx_file_path=str(tmp / "smoke.onnx"), output_folder_path=str(tmp / "out"),
                    batch_size=1, verbosity="error")
    fp32 = next((tmp / "out").glob("*_float32.tflite"))

    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import qtyping, quantizer

    qt = quantizer.Quantizer(str(fp32))
    qt.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                         activation_num_bits=8, weight_num_bits=8)
    sig = Interpreter(model_path=str(fp32)).get_signature_list()
    key = next(iter(sig))
    (inp,) = sig[key]["inputs"]
    data = {key: [{inp: rng.random((1, 16, 16, 3), dtype=np.float32)} for _ in range(4)]}
    qt.quantize(qt.calibrate(data, num_threads=1)).export_model(str(tmp / "int8.tflite"), overwrite=True)
    for path in (fp32, tmp / "int8.tflite"):
        itp = Interpreter(model_path=str(path), num_threads=1)
        itp.allocate_tensors()
        d = itp.get_input_details()[0]
        itp.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
        itp.invoke()
        print(f"smoke: {path.name} ran, input {list(d['shape'])} {np.dtype(d['dtype']).name}")
PY
echo "$want" > "$STAMP"
echo "TFLite converter ready: $VENV"
