"""Run exported TF.js models in Node with pure `@tensorflow/tfjs`: outputs, latency, training.

`export/node/run_tfjs.mjs` does the work (its header documents the protocol); this module
installs its pinned npm dependencies when missing, writes inputs to temporary `.npy` files,
starts Node once per call and reads the results back. A failure in Node becomes a
`PollinateError` carrying Node's own message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import PollinateError

# Beside this file, unless POLLINATE_TFJS_RUNNER_DIR says otherwise: Flower runs our ServerApp
# from a copy of the app (a FAB) that holds only .py/.toml/.md files, so the runner's
# package.json and node_modules must be found where the project is installed.
NODE_DIR = Path(os.environ.get("POLLINATE_TFJS_RUNNER_DIR") or Path(__file__).resolve().parent / "node")
SCRIPT = NODE_DIR / "run_tfjs.mjs"
MIN_NODE_MAJOR = 18  # global fetch (loading over HTTP) and WebAssembly SIMD
BACKENDS = ("cpu", "wasm")


@dataclass(frozen=True)
class TfjsRun:
    outputs: np.ndarray  # the model's (first) output for every input row, float32
    latency_ms: dict  # single-sample predict: warmup, repeats, median, p90, mean, min, max
    backend: str  # the backend TF.js actually ran on
    all_outputs: tuple[np.ndarray, ...] = ()  # every output, for multi-output models
    report: dict | None = None  # Node's whole report (load_ms, tfjs_version, ...)


def _node() -> str | None:
    return shutil.which("node")


def node_available() -> bool:
    """True when a Node.js >= 18 is on PATH (npm dependencies are checked separately)."""
    node = _node()
    if node is None:
        return False
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        return int(out.lstrip("v").split(".")[0]) >= MIN_NODE_MAJOR
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False


def _modules_fresh() -> bool:
    installed = NODE_DIR / "node_modules" / ".package-lock.json"  # npm writes it on every install
    lock = NODE_DIR / "package-lock.json"
    wasm = NODE_DIR / "node_modules" / "@tensorflow" / "tfjs-backend-wasm" / "package.json"
    return installed.exists() and wasm.exists() and installed.stat().st_mtime >= lock.stat().st_mtime


@contextlib.contextmanager
def _install_lock():
    """Serialise `npm ci` between processes (it deletes node_modules/ before installing)."""
    import fcntl

    key = hashlib.sha256(str(NODE_DIR).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"pollinate-npm-{key}.lock"
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_node_modules() -> None:
    """Install export/node's pinned packages (`npm ci`) when missing or older than the lock file."""
    if _modules_fresh():
        return
    if not node_available():
        raise PollinateError(f"Node.js >= {MIN_NODE_MAJOR} is required to run TF.js models; install it (node not found on PATH)")
    npm = shutil.which("npm")
    if npm is None:
        raise PollinateError("npm is required to install @tensorflow/tfjs for export/node; install npm (it ships with Node.js)")
    with _install_lock():
        if _modules_fresh():
            return
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR,
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or not _modules_fresh():
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise PollinateError(f"npm ci in {NODE_DIR} failed: {' '.join(detail) or 'no output'}")


def _save_arrays(arrays, folder: Path, stem: str) -> list[Path]:
    if isinstance(arrays, np.ndarray):
        arrays = [arrays]
    paths = []
    for i, array in enumerate(arrays):
        path = folder / f"{stem}_{i}.npy"
        np.save(path, np.ascontiguousarray(np.asarray(array, dtype=np.float32)))
        paths.append(path)
    return paths


def _model_args(model) -> list[str]:
    text = str(model)
    if text.startswith(("http://", "https://")):
        return ["--url", text]
    folder = Path(model)
    if not (folder / "model.json").is_file():
        raise PollinateError(f"{folder} has no model.json")
    return ["--model", str(folder.resolve())]


def _run_node(mode: str, args: list[str], out_dir: Path, timeout: float) -> dict:
    ensure_node_modules()
    command = [_node() or "node", str(SCRIPT), mode, *args, "--out", str(out_dir)]
    try:
        result = subprocess.run(command, cwd=NODE_DIR, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "NODE_NO_WARNINGS": "1"})
    except subprocess.TimeoutExpired:
        raise PollinateError(f"TF.js {mode} in Node took longer than {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        message = next((ln[len("error: "):] for ln in reversed(lines) if ln.startswith("error: ")), None)
        raise PollinateError(f"TF.js {mode} in Node failed: {message or (lines[-1] if lines else f'exit status {result.returncode}')}")
    return json.loads((out_dir / "report.json").read_text())


def run_tfjs(model_dir, inputs, *, backend: str = "cpu", latency_repeats: int = 50, warmup: int = 5,
             batch_size: int = 256, timeout: float = 600) -> TfjsRun:
    """Predict `inputs` (an array, or a list of arrays for a multi-input model) with TF.js in Node.

    `model_dir` is a folder with model.json (read from disk via tf.io.fromMemory) or an
    http(s) URL of a model.json (tf.loadLayersModel, the browser's way). One Node process
    loads the model, predicts every row in batches, then times `latency_repeats` single-sample
    predicts after `warmup` untimed ones.
    """
    if backend not in BACKENDS:
        raise PollinateError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    with tempfile.TemporaryDirectory(prefix="pollinate-tfjs-") as tmp:
        folder = Path(tmp)
        args = _model_args(model_dir) + ["--backend", backend, "--batch-size", str(batch_size),
                                         "--latency-repeats", str(latency_repeats), "--warmup", str(warmup)]
        for path in _save_arrays(inputs, folder, "input"):
            args += ["--input", str(path)]
        report = _run_node("predict", args, folder / "out", timeout)
        outputs = tuple(np.load(folder / "out" / o["file"]) for o in report["outputs"])
    return TfjsRun(outputs=outputs[0], latency_ms=report["latency_ms"], backend=report["backend"],
                   all_outputs=outputs, report=report)


def tfjs_fit(model_dir, x, y, *, loss: str, optimizer: str = "adam", learning_rate: float, steps: int,
             batch_size: int = 32, backend: str = "cpu", timeout: float = 600) -> list[float]:
    """Compile the TF.js model in Node and run `steps` trainOnBatch steps on (x, y); return the losses.

    `loss` is a Keras or TF.js loss name (`sparse_categorical_crossentropy`, `mse`,
    `categoricalCrossentropy`, ...); `optimizer` one of sgd, adam, adamax, rmsprop, adagrad,
    adadelta. Batches are consecutive slices of x/y, wrapping around.
    """
    if backend not in BACKENDS:
        raise PollinateError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    with tempfile.TemporaryDirectory(prefix="pollinate-tfjs-") as tmp:
        folder = Path(tmp)
        args = _model_args(model_dir) + ["--backend", backend, "--loss", loss, "--optimizer", optimizer,
                                         "--learning-rate", repr(float(learning_rate)), "--steps", str(int(steps)),
                                         "--batch-size", str(int(batch_size))]
        for path in _save_arrays(x, folder, "x"):
            args += ["--x", str(path)]
        args += ["--y", str(_save_arrays(y, folder, "y")[0])]
        report = _run_node("fit", args, folder / "out", timeout)
    return [float(v) for v in report["losses"]]
