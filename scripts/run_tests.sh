#!/usr/bin/env bash
# The test suite, offline. Run scripts/setup_env.sh (or the quickstart) first.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# --durations: the slowest tests are named in every run (CI keeps the suite under an hour)
exec .venv/bin/python -m pytest -q --durations=25 tests "$@"
