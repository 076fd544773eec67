#!/usr/bin/env bash
# Install everything the tests need, then run every test. CI runs exactly this (.ci/run).
# Extra arguments go to pytest (e.g. -k registry, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest "$@"
