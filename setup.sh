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
mkdir -p "${NUMBA_CACHE_DIR:-/tmp/numba-cache}"
