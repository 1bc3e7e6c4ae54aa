#!/usr/bin/env bash
# Create .venv and install everything: the pinned CPU torch first (so pip never pulls a CUDA
# build), then the project's requirements and test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
.venv/bin/python -c "import torch, diffusers, transformers; print('environment ready: torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
