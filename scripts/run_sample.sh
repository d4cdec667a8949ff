#!/usr/bin/env bash
# Fresh machine -> the spine of the bundled sample CT: mask, STL and QC picture in out/.
# Installs the library WITHOUT PyTorch into .venv: ONNX Runtime, plus OpenVINO (the fast CPU
# engine) wherever it has wheels (pyproject.toml's markers; `.[openvino]` would insist on it).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q .
.venv/bin/spinecontextseg info
.venv/bin/spinecontextseg segment --sample -o out/ "$@"
echo "Wrote: $(ls out/)"
