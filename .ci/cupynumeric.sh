#!/usr/bin/env bash
# Runs the cuPyNumeric (Legate) backend's tests in a process of their own.
#   PY=.venv/bin/python bash .ci/cupynumeric.sh
# Installs nvidia-cupynumeric into $PY's environment when missing. On a machine without an NVIDIA
# driver, Legate (a CUDA build) still needs a libcuda.so.1 to load: a no-device stand-in is built
# from .ci/libcuda_stub.c into .ci/stub/ and Legate is told to use CPUs only. Where a real driver
# loads, neither is done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cupynumeric') is None)"; then
  echo "installing nvidia-cupynumeric (the [cupynumeric] extra) ..."
  "$PY" -m pip install -q --disable-pip-version-check nvidia-cupynumeric
fi

if "$PY" -c "import ctypes; ctypes.CDLL('libcuda.so.1')" 2>/dev/null; then
  echo "cuPyNumeric tests: using the installed NVIDIA driver"
else
  stub=.ci/stub/libcuda.so.1
  if [ ! -e "$stub" ] || [ .ci/libcuda_stub.c -nt "$stub" ]; then
    mkdir -p .ci/stub
    "${CC:-gcc}" -shared -fPIC -O2 -o "$stub" .ci/libcuda_stub.c
  fi
  export LD_LIBRARY_PATH="$PWD/.ci/stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LEGATE_CONFIG="${LEGATE_CONFIG:---cpus 2 --gpus 0 --sysmem 2000}"
  echo "cuPyNumeric tests: no NVIDIA driver; Legate on CPUs ($LEGATE_CONFIG)"
fi

exec "$PY" -m pytest -q -p no:cacheprovider -m cupynumeric tests/test_solvers_cupynumeric.py \
  tests/test_levenberg_marquardt.py tests/test_cupynumeric_rowchunk.py tests/test_lsq_edges.py
