"""Run exported TF.js models in Node with pure `@tensorflow/tfjs`: outputs, latency, training.

`export/node/run_tfjs.mjs` does the work (its header documents the protocol). One Node
process serves every request of this Python process (`run_tfjs.mjs serve`: one JSON line in,
one out): starting Node and importing TF.js costs more than checking a small model, and an
export checks each model twice (cpu and wasm), a federation every round. The process starts
on the first request, is reused (across federated rounds too), is started again if it died,
and is closed at exit; inputs and outputs travel as temporary `.npy` files. A failure in Node
becomes a `PollinateError` carrying Node's own message.

Nothing is installed at run time. The runner is found, in this order:
- `$POLLINATE_TFJS_RUNNER_DIR` (Flower runs our ServerApp from a copy of the app that holds
  only .py/.toml/.md files, so the deployment passes the real folder this way), else the
  `node/` folder beside this file;
- in that folder, `run_tfjs.mjs` with its `node_modules/` (a checkout after scripts/setup.sh),
  else `dist/run_tfjs.mjs`, the self-contained bundle an installed package ships
  (`npm run build` in export/node, done when the wheel is built).
`check_runner()` says at once, naming the fix, when Node or the runner is missing.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.errors import PollinateError

ENV_RUNNER_DIR = "POLLINATE_TFJS_RUNNER_DIR"
DEFAULT_DIR = Path(__file__).resolve().parent / "node"
NODE_DIR = Path(os.environ.get(ENV_RUNNER_DIR) or DEFAULT_DIR)  # kept for callers; runner_dir() reads the env each time
SCRIPT = NODE_DIR / "run_tfjs.mjs"
BUNDLE = Path("dist") / "run_tfjs.mjs"
BUNDLE_WASM = ("tfjs-backend-wasm.wasm", "tfjs-backend-wasm-simd.wasm")
MIN_NODE_MAJOR = 18  # global fetch (loading over HTTP) and WebAssembly SIMD
BACKENDS = ("cpu", "wasm")
START_TIMEOUT_S = 60
INSTALL_NODE = "install Node.js 20 (https://nodejs.org, or your system's package manager) and put `node` on PATH"


@dataclass(frozen=True)
class TfjsRun:
    outputs: np.ndarray  # the model's (first) output for every input row, float32
    latency_ms: dict  # single-sample predict: warmup, repeats, median, p90, mean, min, max
    backend: str  # the backend TF.js actually ran on
    all_outputs: tuple[np.ndarray, ...] = ()  # every output, for multi-output models
    report: dict | None = None  # Node's whole report (load_ms, tfjs_version, ...)


@dataclass(frozen=True)
class Runner:
    """A runnable `run_tfjs.mjs`: the checkout's source (with node_modules) or the packaged bundle."""

    script: Path
    kind: str  # "source" | "bundle"


# ---------------------------------------------------------------- finding Node and the runner


def _node() -> str | None:
    return shutil.which("node")


@lru_cache(maxsize=8)
def _node_major(node: str) -> int | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        return int(out.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def node_available() -> bool:
    """True when a Node.js >= 18 is on PATH (the runner itself is checked by `check_runner`)."""
    node = _node()
    return node is not None and (_node_major(node) or 0) >= MIN_NODE_MAJOR


def runner_dir() -> Path:
    return Path(os.environ.get(ENV_RUNNER_DIR) or DEFAULT_DIR)


def _source_ready(folder: Path) -> bool:
    """run_tfjs.mjs and node_modules holding the versions package.json pins (npm ci was run)."""
    try:
        wanted = json.loads((folder / "package.json").read_text())["dependencies"]
        for name, version in wanted.items():
            installed = json.loads((folder / "node_modules" / name / "package.json").read_text())["version"]
            if installed != version:
                return False
    except (OSError, ValueError, KeyError):
        return False
    return (folder / "run_tfjs.mjs").is_file()


def locate_runner(folder: Path | None = None) -> Runner:
    """The runner in `folder` (default: `runner_dir()`), or a PollinateError naming the fix."""
    folder = Path(folder) if folder is not None else runner_dir()
    if _source_ready(folder):
        return Runner(folder / "run_tfjs.mjs", "source")
    bundle = folder / BUNDLE
    if bundle.is_file() and all((bundle.parent / w).is_file() for w in BUNDLE_WASM):
        return Runner(bundle, "bundle")
    if (folder / "package-lock.json").is_file():  # a checkout
        fix = "run scripts/setup.sh (it runs `npm ci` in export/node)"
    else:
        fix = ("reinstall Pollinate from a wheel that carries it (pip install --force-reinstall pollinate-*.whl, "
               "or pip install . from a checkout with Node 20 and npm)")
    hint = f" ({ENV_RUNNER_DIR}={os.environ[ENV_RUNNER_DIR]})" if os.environ.get(ENV_RUNNER_DIR) else ""
    raise PollinateError(f"the TF.js runner is missing: no {folder / BUNDLE} and no npm packages in {folder / 'node_modules'}"
                         f"{hint}: {fix}")


def check_runner() -> Runner:
    """Fail fast, before any work, when TF.js exports cannot be verified here: Node missing or
    too old, or the runner missing. Returns the runner that will be used."""
    node = _node()
    if node is None:
        raise PollinateError(f"Node.js >= {MIN_NODE_MAJOR} is needed to verify TF.js exports and `node` is not on PATH: {INSTALL_NODE}")
    major = _node_major(node)
    if major is None or major < MIN_NODE_MAJOR:
        raise PollinateError(f"Node.js >= {MIN_NODE_MAJOR} is needed to verify TF.js exports; {node} is "
                             f"{'unusable' if major is None else f'version {major}'}: {INSTALL_NODE}")
    return locate_runner()


def ensure_node_modules() -> None:
    """Kept for callers: nothing is installed at run time any more; this only checks (see `check_runner`)."""
    check_runner()


# ---------------------------------------------------------------- the long-lived Node process


class NodeVerifier:
    """One `node run_tfjs.mjs serve` process and the pipes to it; requests are serialised."""

    def __init__(self, runner: Runner, node: str):
        self.runner = runner
        self.owner = os.getpid()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            [node, str(runner.script), "serve"], cwd=runner.script.parent, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines.put, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr.append, False), daemon=True).start()

    @staticmethod
    def _pump(stream, sink, mark_end: bool) -> None:
        try:
            for line in stream:
                sink(line.rstrip("\n"))
        except (OSError, ValueError):
            pass
        if mark_end:
            sink(None)  # end of stdout: the process is gone

    def alive(self) -> bool:
        return self.proc.poll() is None and self.owner == os.getpid()

    def request(self, mode: str, args: dict, timeout: float) -> dict:
        """Send one request and wait for its answer; Node's error becomes a PollinateError."""
        with self._lock:
            request_id = next(self._ids)
            try:
                self.proc.stdin.write(json.dumps({"id": request_id, "mode": mode, "args": args}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                raise PollinateError(f"TF.js {mode} in Node failed: {self._died()}") from None
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise PollinateError(f"TF.js {mode} in Node took longer than {timeout:.0f} s") from None
            if line is None:
                raise PollinateError(f"TF.js {mode} in Node failed: {self._died()}")
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:
                self.close()
                raise PollinateError(f"TF.js {mode} in Node failed: the runner answered {line[:200]!r}") from None
        if answer.get("id") != request_id:
            self.close()
            raise PollinateError(f"TF.js {mode} in Node failed: answer {answer.get('id')} to request {request_id}")
        if not answer.get("ok"):
            if answer.get("recycle"):  # the failed request left tensors behind: the next one gets a fresh Node
                self.close()
            raise PollinateError(f"TF.js {mode} in Node failed: {answer.get('error') or 'no message'}")
        return answer["report"]

    def _died(self) -> str:
        try:
            status = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.close()
            status = self.proc.returncode
        lines = [ln for ln in self._stderr if ln.strip()]
        message = next((ln[len("error: "):] for ln in reversed(lines) if ln.startswith("error: ")), None)
        return f"the Node process exited (status {status}): {message or (lines[-1] if lines else 'no message')}"

    def close(self) -> None:
        if self.owner != os.getpid():
            return  # a forked child: the process belongs to the parent
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the runner exits when stdin closes
                self.proc.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)


_verifier: NodeVerifier | None = None
_verifier_lock = threading.Lock()


def verifier() -> NodeVerifier:
    """The process-wide Node verifier: started on first use, started again if it died (or after
    a fork), checked with a hello so a broken runner fails here with Node's message."""
    global _verifier
    with _verifier_lock:
        if _verifier is not None and _verifier.alive():
            return _verifier
        if _verifier is not None and _verifier.owner == os.getpid():
            _verifier.close()
        runner = check_runner()
        started = NodeVerifier(runner, _node() or "node")
        started.request("hello", {}, START_TIMEOUT_S)
        _verifier = started
        return started


def shutdown() -> None:
    """Close the Node verifier (at exit; tests may call it to force a fresh process)."""
    global _verifier
    with _verifier_lock:
        if _verifier is not None:
            _verifier.close()
            _verifier = None


atexit.register(shutdown)


def _run_node(mode: str, args: dict, out_dir: Path, timeout: float) -> dict:
    return verifier().request(mode, {**args, "out": str(out_dir)}, timeout)


# ---------------------------------------------------------------- the public calls


def _save_arrays(arrays, folder: Path, stem: str) -> list[str]:
    if isinstance(arrays, np.ndarray):
        arrays = [arrays]
    paths = []
    for i, array in enumerate(arrays):
        path = folder / f"{stem}_{i}.npy"
        np.save(path, np.ascontiguousarray(np.asarray(array, dtype=np.float32)))
        paths.append(str(path))
    return paths


def _model_args(model) -> dict:
    text = str(model)
    if text.startswith(("http://", "https://")):
        return {"url": text}
    folder = Path(model)
    if not (folder / "model.json").is_file():
        raise PollinateError(f"{folder} has no model.json")
    return {"model": str(folder.resolve())}


def run_tfjs(model_dir, inputs, *, backend: str = "cpu", latency_repeats: int = 50, warmup: int = 5,
             batch_size: int = 256, timeout: float = 600) -> TfjsRun:
    """Predict `inputs` (an array, or a list of arrays for a multi-input model) with TF.js in Node.

    `model_dir` is a folder with model.json (read from disk via tf.io.fromMemory) or an
    http(s) URL of a model.json (tf.loadLayersModel, the browser's way). The Node verifier
    loads the model on `backend`, predicts every row in batches, then times `latency_repeats`
    single-sample predicts after `warmup` untimed ones.
    """
    if backend not in BACKENDS:
        raise PollinateError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    with tempfile.TemporaryDirectory(prefix="pollinate-tfjs-") as tmp:
        folder = Path(tmp)
        args = {**_model_args(model_dir), "backend": backend, "batch-size": int(batch_size),
                "latency-repeats": int(latency_repeats), "warmup": int(warmup),
                "input": _save_arrays(inputs, folder, "input")}
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
        args = {**_model_args(model_dir), "backend": backend, "loss": loss, "optimizer": optimizer,
                "learning-rate": repr(float(learning_rate)), "steps": int(steps), "batch-size": int(batch_size),
                "x": _save_arrays(x, folder, "x"), "y": _save_arrays(y, folder, "y")[0]}
        report = _run_node("fit", args, folder / "out", timeout)
    return [float(v) for v in report["losses"]]
