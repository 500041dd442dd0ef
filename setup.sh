#!/usr/bin/env bash
# Create .venv (Python 3.11) with everything the project needs, offline-safe. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q -r requirements.txt
    touch .venv/.installed
fi
# The "speech" audio feature source reads two ONNX models that only the openwakeword 0.5.1 wheel
# ships; its own dependencies (tflite-runtime) are not needed for them, hence --no-deps.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('openwakeword') is None)"; then
    .venv/bin/python -m pip install -q --no-deps openwakeword==0.5.1
fi
mkdir -p "${NUMBA_CACHE_DIR:-/tmp/numba-cache}"
