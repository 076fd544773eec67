#!/usr/bin/env bash
# Install Pollinate into ./.venv with the frozen dependency set (constraints.txt).
#   scripts/setup.sh          the Python package and its dependencies
#   scripts/setup.sh --test   plus what the test suite needs
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate
      break
    fi
  done
fi
[ -n "$python" ] || { echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $python"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
extras="converter"
[ "$want_tests" = 1 ] && extras="converter,test"
echo "==> installing pollinate[$extras] and its pinned dependencies (first run: a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$extras]"
# The stock TF.js converter, without its stale `packaging~=23.1` pin (it would cap Flower at 1.26);
# everything else it needs came with the `converter` extra. See pyproject.toml.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt tensorflowjs==4.22.0
# The server tests put Debian's nginx in front of `pollinate serve --offload nginx`.
# The web client's browser tests drive Debian's chromium (Playwright cannot download its own browser here).
if [ "$want_tests" = 1 ]; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }
  [ -x /usr/bin/chromium ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
fi
# npm: pinned by each folder's package-lock.json; needed in a checkout only (an installed wheel
# carries the built files). `npm ci` runs when node_modules is missing or older than the lock.
#   export/node: the TF.js runner's packages (export verifies every model.json in Node, cpu and wasm)
#   web_client:  TF.js for the demo page; npm ci copies it into web_client/vendor/tfjs/ (npm run vendor)
npm_ci() {  # folder, what it is for
  if command -v npm >/dev/null 2>&1; then
    echo "==> installing npm packages in $1 (pinned by package-lock.json): $2"
    (cd "$1" && npm ci --no-audit --no-fund --silent)
  else
    echo "warning: npm not found: install Node.js 20 with npm for $2" >&2
    return 1
  fi
}
if [ ! -d export/node/node_modules ] || [ export/node/package-lock.json -nt export/node/node_modules ]; then
  npm_ci export/node "exporting and verifying TF.js models" || true
fi
if [ ! -d web_client/node_modules ] || [ web_client/package-lock.json -nt web_client/node_modules ]; then
  npm_ci web_client "the demo page and the web client's tests" || true
elif [ ! -f web_client/vendor/tfjs/tf.fesm.min.js ] && command -v npm >/dev/null 2>&1; then
  (cd web_client && npm run vendor --silent)
fi
echo "==> ready: .venv/bin/pollinate"
