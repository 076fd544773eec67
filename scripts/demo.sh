#!/usr/bin/env bash
# The main job end to end on the embedded defaults: install, then `pollinate demo`.
# Extra arguments go to `pollinate demo` (e.g. --epochs 5, --home DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pollinate demo "$@"
