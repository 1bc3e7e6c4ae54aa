#!/usr/bin/env bash
# The test suite, offline. Run scripts/setup_env.sh (or the quickstart) first.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q tests "$@"
