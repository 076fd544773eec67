#!/usr/bin/env bash
# Install everything the tests need, then run every test. CI runs exactly this (.ci/run).
# Extra arguments go to pytest (e.g. -k registry, -x); the web client's node tests always run after it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TF_CPP_MIN_LOG_LEVEL=2
# Both suites run even when the first fails; the script fails if either does.
status=0
.venv/bin/python -m pytest "$@" || status=$?
echo "==> web client: node --test (web_client/test/)"
(cd web_client && node --test test/) || status=$((status == 0 ? 1 : status))
exit "$status"
