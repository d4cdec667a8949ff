#!/usr/bin/env bash
# Fresh machine -> the full test suite. Installs PyTorch's CPU wheel explicitly (torch==2.13.0:
# any other spec would pull CUDA builds), the library with its test extras, and Slicer's
# MRML/segmentation logic from PyPI (slicer-core, Python >= 3.10) for the Slicer-module tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SCS_TEST_VENV:-.venv-test}
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test,openvino,train]"
if "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  "$PY" -m pip install -q slicer-core
fi
# torch must still be the CPU wheel we pinned: nothing may have replaced it
"$PY" -c 'import torch; v = torch.__version__; assert v.startswith("2.13.0"), v; print("torch", v)'
set +e
"$PY" -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$status"
