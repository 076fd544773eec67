"""Build hook: the wheel carries the demo page's TF.js files and the bundled TF.js runner.

Everything else about the package is in pyproject.toml. Before setuptools copies package
data, `build_py` builds two folders from the npm lock files (Node 20 with npm is needed at
build time only; nothing installs packages when Pollinate runs):

- `web_client/vendor/tfjs/`: TF.js' ES module bundles, the wasm backend's .wasm binaries and
  the licences (`npm ci`, whose postinstall is `npm run vendor`: web_client/vendor.mjs,
  web_client/vendor.json); the page loads TF.js from there, installed or in a checkout;
- `export/node/dist/`: `run_tfjs.mjs` and its dependencies bundled by esbuild into one file,
  plus the .wasm binaries and the licences (`npm ci && npm run build`: export/node/build.mjs).

`npm ci` is skipped when node_modules already holds exactly what the lock file pins (a checkout
after scripts/setup.sh). Editable installs build nothing: a checkout uses node_modules directly.
If npm is missing but both folders were built before, they are used as they are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent

# (npm project, npm script that builds the output, files the output must hold)
NODE_ASSETS = (
    (ROOT / "web_client", "vendor", ("vendor/tfjs/tf.fesm.min.js", "vendor/tfjs/tf-backend-wasm.fesm.min.js",
                                     "vendor/tfjs/tfjs-backend-wasm.wasm", "vendor/tfjs/THIRD_PARTY_LICENSES.txt")),
    (ROOT / "export" / "node", "build", ("dist/run_tfjs.mjs", "dist/tfjs-backend-wasm.wasm",
                                         "dist/tfjs-backend-wasm-simd.wasm", "dist/THIRD_PARTY_LICENSES.txt")),
)


def _say(message: str) -> None:
    print(f"pollinate build: {message}", file=sys.stderr, flush=True)


def node_modules_match_lock(project: Path) -> bool:
    """node_modules holds every package of package-lock.json at its pinned version (npm's own
    record of what it installed, node_modules/.package-lock.json, says so)."""
    try:
        wanted = json.loads((project / "package-lock.json").read_text())["packages"]
        have = json.loads((project / "node_modules" / ".package-lock.json").read_text())["packages"]
    except (OSError, ValueError, KeyError):
        return False
    for key, info in wanted.items():
        if not key or info.get("optional"):
            continue  # the root, and platform-specific optional packages (esbuild's binaries)
        if have.get(key, {}).get("version") != info.get("version"):
            return False
    return True


def build_node_assets() -> None:
    npm = shutil.which("npm")
    for project, script, outputs in NODE_ASSETS:
        built = all((project / f).is_file() for f in outputs)
        if npm is None:
            if built:
                _say(f"npm not found: using the files already built in {project.relative_to(ROOT)}")
                continue
            raise SystemExit(
                f"error: building Pollinate needs Node.js 20 with npm (to build {project.relative_to(ROOT)}/"
                f"{outputs[0].split('/')[0]}/ from package-lock.json); install Node.js 20 and try again"
            )
        if not node_modules_match_lock(project):
            _say(f"npm ci in {project.relative_to(ROOT)} (from package-lock.json)")
            subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=project, check=True)
        _say(f"npm run {script} in {project.relative_to(ROOT)}")
        subprocess.run([npm, "run", script, "--silent"], cwd=project, check=True)
        missing = [f for f in outputs if not (project / f).is_file()]
        if missing:
            raise SystemExit(f"error: npm run {script} in {project.relative_to(ROOT)} did not write {', '.join(missing)}")


class BuildPyWithNodeAssets(build_py):
    """build_py that first builds the npm-made package data (see the module docstring)."""

    def run(self) -> None:
        if not getattr(self, "editable_mode", False):
            build_node_assets()
            self.__dict__.pop("data_files", None)  # list package data again, now that it exists
        super().run()


setup(cmdclass={"build_py": BuildPyWithNodeAssets})
