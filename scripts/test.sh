#!/usr/bin/env bash
# Install everything the tests need, then run every test. CI runs exactly this (.ci/run).
# Extra arguments go to pytest (e.g. -k registry, -x); the web client's node tests always run after it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TF_CPP_MIN_LOG_LEVEL=2
# stores the node tests build once and copy (web_client/test-support/server.mjs), for this run only
POLLINATE_TEST_CACHE=$(mktemp -d)
export POLLINATE_TEST_CACHE
trap 'rm -rf "$POLLINATE_TEST_CACHE"' EXIT
# Lint and both suites run even when one fails; the script fails if any does.
status=0
echo "==> lint: ruff check ."
.venv/bin/ruff check . || status=$?
# two workers, one test file each (module fixtures are built once); `-n 0` runs in one process
.venv/bin/python -m pytest -n 2 --dist loadfile "$@" || status=$((status == 0 ? $? : status))
echo "==> web client: node --test (web_client/test/)"
(cd web_client && node --test test/) || status=$((status == 0 ? 1 : status))
exit "$status"
