#!/usr/bin/env bash
# Prepares a Raspberry Pi (or any Linux board) for `edgekd bench`: a venv with NumPy and a
# TFLite runtime. Run it ON THE BOARD:   bash setup_pi.sh [VENV_DIR]   (default ~/edgekd-venv)
# then bench with:   edgekd bench RUN/export --device rpi4 --host pi@BOARD --python VENV_DIR/bin/python
#
#  64-bit OS (aarch64) or x86_64: ai-edge-litert (LiteRT) from PyPI, with NumPy 2.
#  32-bit Pi OS (armv7l/armv6l): LiteRT ships no wheel; tflite-runtime 2.14 (Python <= 3.11) is the
#    only choice, and it needs NumPy 1.x, taken from Debian (python3-numpy) because PyPI has no
#    armv7 NumPy wheels.
set -euo pipefail
VENV="${1:-$HOME/edgekd-venv}"
PY="${PYTHON:-python3}"
ARCH="$(uname -m)"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv
fi
case "$ARCH" in
  aarch64|x86_64)
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q ai-edge-litert numpy
    ;;
  armv7l|armv6l)
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] > (3, 11))'; then
      echo "error: tflite-runtime 2.14 needs Python <= 3.11 on $ARCH; use 64-bit Raspberry Pi OS (LiteRT) or Bookworm's Python 3.11" >&2
      exit 2
    fi
    $SUDO apt-get install -y -qq python3-numpy
    "$PY" -m venv --system-site-packages "$VENV"  # Debian's NumPy 1.x
    "$VENV/bin/pip" install -q "tflite-runtime==2.14.0" "numpy<2"
    ;;
  *)
    echo "error: no TFLite runtime wheel for $ARCH; install one by hand into a venv" >&2
    exit 2
    ;;
esac
"$VENV/bin/python" - <<'PY'
import numpy
try:
    from ai_edge_litert.interpreter import Interpreter
    name = "ai-edge-litert"
except ImportError:
    from tflite_runtime.interpreter import Interpreter
    name = "tflite-runtime"
print(f"ok: {name} with NumPy {numpy.__version__}")
PY
model="$(tr -d '\0' 2>/dev/null < /proc/device-tree/model || true)"
echo "board: ${model:-unknown} ($ARCH, $(nproc) cores)"
echo "bench with: --python $VENV/bin/python"
