"""Edge update ingestion: `pollinate serve`'s update route against a bare endpoint.

    .venv/bin/python benchmarks/edge_ingest.py [--seconds 10] [--devices 200] [--tasks 5] \
        [--repeats 3] [--concurrency 8,64] [--durability process,power] [--models digits-cnn,mlp-1m] \
        [--reference DIR]

For two model sizes — the digits CNN and a 1M-parameter model — enrols ``--devices`` devices
in a scratch store and, for each run, opens ``--tasks`` tasks (as that many gateways of one
federation would); every device fetches its task, then posts one float32 update to every
task over ``--concurrency`` keep-alive connections (after one warm-up post per connection):

- ``ours``: ``pollinate serve`` (one uvicorn worker): authenticate, read the body under the
  limit, validate (length, finite, L2 norm), append the update durably, commit it in SQLite,
  202 — the real route with every check and its durability, once per durability mode
  (``POLLINATE_EDGE_DURABILITY``: ``process``, the default, survives a kill -9; ``power`` a
  power cut too, at two disk waits per batch), each against bare in the same repeat;
- ``bare``: a FastAPI route on uvicorn (one worker) that only reads the body and answers
  202 (the reference: what HTTP, uvicorn and FastAPI alone cost for these bytes).

- ``ref`` (with ``--reference DIR``): ``pollinate serve`` from another checkout of Pollinate
  (e.g. ``git worktree add /tmp/ref daf1709``, the code before issue 19's request hygiene:
  read timeouts, upload cap, JSON bounds, CORS split), on a store of its own built by that
  checkout's code, in the default durability mode: what the same hot path cost before. Target:
  ours >= 0.9x ref (ingestion within 10% of the reference's).

They alternate (bare, then each mode; reversed every other repeat), ``--repeats`` times per
model and concurrency, in one run; the ratio reported is the median of the repeats'
ours/bare (target >= 0.5), per mode. Both servers and the
client share the machine's cores: compare the ratio, not the absolute numbers. With few
connections a durable server waits on its disk between answers (latency-bound); with many,
both are bound by their CPU (the capacity a gateway operator asks about): both are reported.
Each run also reports the server's CPU time per update, split into the event loop's and the
other threads' (so a gap can be told apart as work or waiting), and ours' wall time per
update in each phase of its acceptance (from the server's own
``pollinate_edge_update_seconds_total`` in ``/metrics``), and what the request hygiene checks
cost on the event loop: the JSON bounds of a telemetry and a feedback body against parsing
them. Writes benchmarks/results/edge_ingest.json and edge_ingest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
TARGET_RATIO = 0.5
REFERENCE_TARGET = 0.9  # ours against the reference checkout: ingestion within 10%
TICKS = os.sysconf("SC_CLK_TCK")

from serve import free_port, stop, wait_http  # noqa: E402  (the serve benchmark's process helpers)

import registry  # noqa: E402, F401  (the package first: its store imports registry.edge)
from registry.edge import DEFAULT_DURABILITY, DURABILITY_MODES, ENV_DURABILITY  # noqa: E402


def ours_key(mode: str) -> str:
    """A run's key for ours in durability `mode`: `ours` for the default (the shape
    benchmarks/edge.py reads), `ours_<mode>` for the others; their ratios `ratio`, `ratio_<mode>`."""
    return "ours" if mode == DEFAULT_DURABILITY else f"ours_{mode}"


def ratio_key(mode: str) -> str:
    return "ratio" if mode == DEFAULT_DURABILITY else f"ratio_{mode}"

BARE_APP = textwrap.dedent('''
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/federations/{model}/tasks/{task_id}/updates")
    async def updates(model: str, task_id: str, request: Request):
        body = await request.body()
        return JSONResponse({"bytes": len(body)}, status_code=202)

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}
''')


SPECS = textwrap.dedent('''
    import json
    import numpy as np
    from core.tensorflow import import_tensorflow  # quiet TensorFlow start
    from registry.edge import weights_spec
    from training.datasets import load_dataset
    from training.zoo import build_model

    cnn = build_model("cnn", load_dataset("digits"))
    mlp = [np.zeros((1000, 1000), np.float32), np.zeros(1000, np.float32)]  # 1,001,000 parameters
    print(json.dumps({"digits-cnn": weights_spec(cnn.get_weights()), "mlp-1m": weights_spec(mlp)}))
''')


REFERENCE_SETUP = textwrap.dedent('''
    # Run with the reference checkout as the working directory: its registry builds its store.
    import json, sys, time
    import numpy as np
    import registry  # noqa: F401  (the package first: its store imports registry.edge)
    from registry import Lineage, Store
    from registry.edge import EdgeStore

    job = json.loads(sys.stdin.read())
    store = Store(job["home"])
    edge = EdgeStore(store)
    out = {}
    for name, model in job["models"].items():
        store.publish(name, lineage=Lineage("central"), artifacts={"keras": {"model.keras": b"placeholder"}})
        base = np.load(model["base"])
        tokens = [edge.enrol(name, "simulated")[1] for _ in range(model["devices"])]
        tasks = {gateway: edge.open_task(
            name, federation=f"bench-{name}", round=1, gateway=gateway, base_version=1,
            config={"epochs": 1, "batch_size": 32, "learning_rate": 0.01}, weights=model["spec"], base=base,
            deadline=time.time() + 86400, min_updates=10**6, norm_bound=float(np.linalg.norm(base))).task_id
            for gateway in model["gateways"]}
        out[name] = {"tokens": tokens, "tasks": tasks}
    print(json.dumps(out))
''')


def model_specs() -> dict[str, list[dict]]:
    """The weight lists of the two models: the zoo's digits CNN and a ~1M-parameter MLP. Read
    in a child process, so that the one posting the updates never loads TensorFlow (its
    threads and its garbage-collected heap would slow the client, not the servers)."""
    out = subprocess.run([sys.executable, "-c", SPECS], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_store(home: Path, specs: dict[str, list[dict]], devices: int) -> dict[str, dict]:
    """Per model: a version and `devices` enrolled devices (tokens); tasks are opened per run."""
    from registry import Lineage, Store
    from registry.edge import EdgeStore, flat_size

    store = Store(home)
    edge = EdgeStore(store)
    setups = {}
    for name, spec in specs.items():
        store.publish(name, lineage=Lineage("central"), artifacts={"keras": {"model.keras": b"placeholder"}})
        size = flat_size(spec)
        rng = np.random.default_rng(0)
        setups[name] = {"edge": edge, "spec": spec, "size": size,
                        "base": rng.normal(0, 0.05, size).astype(np.float32),
                        "tokens": [edge.enrol(name, "simulated")[1] for _ in range(devices)],
                        "body": (rng.normal(0, 0.01 / np.sqrt(size), size)).astype("<f4").tobytes()}
    return setups


def reference_gateways(args, concurrencies: list[int]) -> list[str]:
    """The gateways (one task each) the reference server's runs post to, opened up front."""
    return [f"c{c}-r{r}-ref-{k}" for c in concurrencies for r in range(args.repeats)
            for k in [*range(args.tasks), "warmup"]]


def build_reference(reference: Path, home: Path, setups: dict[str, dict], gateways: list[str],
                    devices: int) -> dict[str, dict]:
    """The reference checkout's store, built by its own code (a store's schema is its code's): per
    model the same version, `devices` devices and a task per gateway, on the same base weights."""
    models = {}
    for name, setup in setups.items():
        np.save(home.parent / f"ref-base-{name}.npy", setup["base"])
        models[name] = {"base": str(home.parent / f"ref-base-{name}.npy"), "devices": devices,
                        "spec": setup["spec"], "gateways": gateways}
    job = json.dumps({"home": str(home), "models": models})
    out = subprocess.run([sys.executable, "-c", REFERENCE_SETUP], cwd=reference, input=job, capture_output=True,
                         text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def open_tasks(model: str, setup: dict, gateways: list[str]) -> list[str]:
    """One open task per gateway name, in one round of one federation (as several gateways
    serving a federation open theirs)."""
    return [setup["edge"].open_task(
        model, federation=f"bench-{model}", round=1, gateway=gateway, base_version=1,
        config={"epochs": 1, "batch_size": 32, "learning_rate": 0.01}, weights=setup["spec"], base=setup["base"],
        deadline=time.time() + 3600, min_updates=10**6, norm_bound=float(np.linalg.norm(setup["base"]))).task_id
        for gateway in gateways]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU seconds so far of a process's main thread (uvicorn's event loop) and
    of all its other threads together (ours: the store's committer, the thread pool). The
    other threads' share is the process's total less the main thread's: the process's total
    keeps the time of threads that have ended (the committer stops when idle)."""

    def seconds(stat: Path) -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    main = seconds(Path(f"/proc/{pid}/task/{pid}/stat"))
    return main, max(seconds(Path(f"/proc/{pid}/stat")) - main, 0.0)


def phase_seconds(port: int) -> dict[str, float]:
    """ours' /metrics: seconds accepted updates spent per phase (summed) and the updates counted."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    out = {"updates": 0.0}
    for line in text.splitlines():
        if line.startswith("pollinate_edge_update_seconds_total{"):
            out[line.split('phase="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("pollinate_edge_updates_total{"):
            out["updates"] += float(line.rsplit(" ", 1)[1])
    return out


class Connection:
    """One keep-alive HTTP/1.1 connection of the load client (asyncio on uvloop, raw bytes: the
    client should cost the shared cores as little as possible, whichever server it measures)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 20))

    async def request(self, method: str, path: str, token: str, body: bytes = b"") -> int:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode())
        if body:
            self.writer.write(body)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0)
        await self.reader.readexactly(length)
        return int(lines[0].split()[1])

    def close(self) -> None:
        self.writer.close()


def post_all(port: int, model: str, jobs: list[tuple[str, str]], warmup: list[tuple[str, str]], body: bytes,
             concurrency: int, deadline_s: float, pid: int, phases: bool) -> dict:
    """Each connection posts one warm-up update and each device fetches its task (as a device
    does before it trains), untimed; then the connections share `jobs` ((task, token) pairs)."""
    return uvloop.run(_post_all(port, model, jobs, warmup, body, concurrency, deadline_s, pid, phases))


async def _post_all(port: int, model: str, jobs: list[tuple[str, str]], warmup: list[tuple[str, str]], body: bytes,
                    concurrency: int, deadline_s: float, pid: int, phases: bool) -> dict:
    def path(task: str) -> str:
        return f"/v1/federations/{model}/tasks/{task}/updates?examples=32"

    queue = list(reversed(jobs))
    statuses: dict[int, int] = {}
    connections = [await Connection.open(port) for _ in range(concurrency)]
    await asyncio.gather(*(c.request("POST", path(task), token, body) for c, (task, token) in zip(connections, warmup)))
    tokens = sorted({token for _, token in jobs})

    async def fetch(connection: Connection, share: list[str]) -> None:
        for token in share:
            await connection.request("GET", f"/v1/federations/{model}/task", token)

    # every device fetches its task first (bare: any answer), over every connection (one kept
    # idle longer than the server's keep-alive timeout would be closed under the client)
    await asyncio.gather(*(fetch(c, tokens[i::len(connections)]) for i, c in enumerate(connections)))
    loop = asyncio.get_running_loop()
    before = await loop.run_in_executor(None, phase_seconds, port) if phases else None
    cpu = cpu_seconds(pid)
    started = time.perf_counter()
    stop_at = started + deadline_s

    async def worker(connection: Connection) -> None:
        while queue and time.perf_counter() < stop_at:
            task, token = queue.pop()
            status = await connection.request("POST", path(task), token, body)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker(c) for c in connections))
    seconds = time.perf_counter() - started
    loop_cpu, other_cpu = (after - before for after, before in zip(cpu_seconds(pid), cpu))
    for connection in connections:
        connection.close()
    cpu = loop_cpu + other_cpu
    n = sum(statuses.values())
    split = {}
    if before is not None:
        after = await loop.run_in_executor(None, phase_seconds, port)
        counted = after.pop("updates") - before.pop("updates")
        split = {phase: (after[phase] - before.get(phase, 0.0)) / max(counted, 1) * 1e3 for phase in after}
    return {"phases_ms": split, "updates": n, "seconds": seconds, "updates_per_s": n / seconds,
            "mb_per_s": n * len(body) / seconds / 1e6, "bytes_per_update": len(body),
            "server_cpu_ms_per_update": cpu / max(n, 1) * 1e3, "server_cpu_cores": cpu / seconds,
            "loop_cpu_ms_per_update": loop_cpu / max(n, 1) * 1e3,
            "other_threads_cpu_ms_per_update": other_cpu / max(n, 1) * 1e3,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def start(server: str, scratch: Path, durability: str | None = None,
          reference: Path | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    # the same settings for ours and the reference (neither serves the demo page here)
    env = {**os.environ, "POLLINATE_MAX_UPDATE_BYTES": str(64 << 20), "POLLINATE_WEB_CLIENT": "off"}
    if durability is not None:
        env[ENV_DURABILITY] = durability
    if server == "ours":
        command = [sys.executable, "-m", "pollinate", "serve", "--home", str(scratch / "store"), "--port", str(port)]
        cwd = ROOT
    elif server == "ref":  # python -m from the reference checkout imports its code
        command = [sys.executable, "-m", "pollinate", "serve", "--home", str(scratch / "ref-store"), "--port", str(port)]
        cwd = reference
    else:
        command = [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port),
                   "--log-level", "warning", "--no-access-log"]
        cwd = scratch
    with open(scratch / f"{server}-{durability or 'none'}.log", "ab") as log:
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except BaseException:
        stop(proc)
        raise
    return proc, port


LOOP_SPLIT = ("app", "router", "route", "bare")


def loop_split(home: Path, model: str, spec: list[dict], updates: int = 2000, concurrency: int = 8) -> dict:
    """Event-loop CPU per accepted update with no sockets (the ASGI app called in-process, the
    real store and committer behind it), through: the whole app (its middleware and FastAPI's
    routing), the app's router only, the update route alone, and the bare FastAPI app. The
    differences say what each layer costs ours' event loop."""
    import tempfile as _tempfile

    from registry import Lineage, Store
    from registry.edge import flat_size
    from server.app import create_app
    from server.config import ServerConfig
    from server.routers import federations

    home = Path(_tempfile.mkdtemp(dir=home))
    Store(home).publish(model, lineage=Lineage("central"), artifacts={"keras": {"model.keras": b"placeholder"}})
    app = create_app(ServerConfig(home=home, web_client=None, max_update_bytes=64 << 20))
    edge = app.state.edge
    size = flat_size(spec)
    rng = np.random.default_rng(0)
    setup = {"edge": edge, "spec": spec, "size": size, "base": rng.normal(0, 0.05, size).astype(np.float32)}
    body = (rng.normal(0, 0.01 / np.sqrt(size), size)).astype("<f4").tobytes()
    chunks = [body[i:i + (1 << 16)] for i in range(0, len(body), 1 << 16)]
    route = next(r for r in federations.router.routes if r.path.endswith("/updates"))
    namespace: dict = {}
    exec(BARE_APP, namespace)  # the very app the bare server runs
    bare = namespace["app"]

    async def post(layer: str, task: str, token: str) -> int:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": f"/v1/federations/{model}/tasks/{task}/updates", "raw_path": b"",
                 "root_path": "", "query_string": b"examples=32", "server": ("127.0.0.1", 80),
                 "client": ("127.0.0.1", 1), "app": app,
                 "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode()),
                             (b"content-type", b"application/octet-stream"),
                             (b"content-length", str(len(body)).encode())]}
        pieces = iter(chunks)

        async def receive() -> dict:
            chunk = next(pieces, None)
            if chunk is None:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": chunk, "more_body": chunk is not chunks[-1]}

        status = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        if layer == "app":
            await app(scope, receive, send)
        elif layer == "router":
            await app.router(scope, receive, send)
        elif layer == "route":
            scope.update(path_params={"model": model, "task_id": task}, route=route)
            await route.handle(scope, receive, send)
        else:
            await bare(scope, receive, send)
        return status[0]

    async def measure(layer: str) -> float:
        task = open_tasks(model, setup, [f"loop-{layer}"])[0]
        tokens = [edge.enrol(model, "simulated")[1] for _ in range(updates + concurrency)]
        for token in tokens[:concurrency]:  # warm-up
            await post(layer, task, token)
        queue = tokens[concurrency:]
        codes: dict[int, int] = {}

        async def worker() -> None:
            while queue:
                code = await post(layer, task, queue.pop())
                codes[code] = codes.get(code, 0) + 1

        cpu = time.thread_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu = time.thread_time() - cpu
        edge.discard_files(task)
        if set(codes) != {202}:
            raise RuntimeError(f"{layer}: {codes}")
        return cpu / updates * 1e3

    async def run() -> dict:
        return {layer: await measure(layer) for layer in LOOP_SPLIT}

    return uvloop.run(run())


def hygiene_costs(repeats: int = 2000) -> dict[str, float]:
    """Event-loop µs per body of the JSON bounds check (server/json_bounds.py), which every body
    but a device update's passes, against json.loads of the same body: a telemetry batch of the
    digits model's size (64 features x 10 bins, 50 recent ids) and a feedback item."""
    import random

    from server.json_bounds import problem

    rng = random.Random(0)
    telemetry = json.dumps({
        "version": 3, "batch_id": "9f1c2a5b7d3e4f60a1b2c3d4e5f60718", "client_id": "c" * 32, "predictions": 100,
        "errors": 0, "latency_ms": [rng.randint(0, 20) for _ in range(11)],
        "features": {f"feature_{i}": [rng.randint(0, 20) for _ in range(10)] for i in range(64)},
        "prediction": {"classes": [rng.randint(0, 20) for _ in range(10)], "confidence": [rng.randint(0, 9)] * 10},
        "recent": [{"id": f"{rng.getrandbits(64):016x}", "prediction": str(i % 10), "confidence": 0.9}
                   for i in range(50)]}).encode()
    feedback = json.dumps({"version": 3, "prediction": "7", "label": "1",
                           "batch_id": "5be0c1d2e3f4a5b6c7d8e9f0a1b2c3d4"}).encode()

    def per_call(fn, body: bytes) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                fn(body)
            best = min(best, (time.perf_counter() - started) / repeats * 1e6)
        return best

    return {"telemetry_bytes": len(telemetry), "telemetry_bounds": per_call(problem, telemetry),
            "telemetry_json_loads": per_call(json.loads, telemetry), "feedback_bytes": len(feedback),
            "feedback_bounds": per_call(problem, feedback), "feedback_json_loads": per_call(json.loads, feedback),
            **middleware_costs(repeats * 50)}


def middleware_costs(repeats: int) -> dict[str, float]:
    """µs per device-update request through the CORS and body layers as they were (Starlette's
    CORSMiddleware for every route, then the body limit, which lets updates pass) and as they
    are (server/cors.py's split, which also asks whether the route is an admin one, then the
    body limit with its upload cap), around an app that does nothing."""
    from starlette.middleware.cors import CORSMiddleware

    from server.cors import PublicCors, admin_routes
    from server.limits import BodyLimitMiddleware
    from server.routers import channels, federations

    async def nothing(scope, receive, send) -> None:
        return None

    options = {"allow_origins": ["*"], "allow_methods": ["GET", "HEAD", "POST", "OPTIONS"],
               "allow_headers": ["Authorization", "Content-Type"], "expose_headers": ["ETag"], "max_age": 600}
    exempt = federations.UPDATES_PATH
    before = CORSMiddleware(BodyLimitMiddleware(nothing, 64 * 1024, exempt=exempt), **options)
    after = PublicCors(BodyLimitMiddleware(nothing, 64 * 1024, exempt=exempt, max_uploads=256),
                       admin=admin_routes(channels.router.routes), **options)
    scope = {"type": "http", "method": "POST", "path": "/v1/federations/digits/tasks/0b6d7f/updates",
             "headers": [(b"host", b"127.0.0.1"), (b"authorization", b"Bearer x"),
                         (b"content-type", b"application/octet-stream"), (b"content-length", b"153128")]}

    async def per_call(app) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                await app(scope, None, None)
            best = min(best, (time.perf_counter() - started) / repeats * 1e6)
        return best

    async def both() -> dict[str, float]:
        return {"update_middleware_before": await per_call(before), "update_middleware_after": await per_call(after)}

    return asyncio.run(both())


def _commit(checkout: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="8,64", help="keep-alive connections, a comma-separated list")
    parser.add_argument("--seconds", type=float, default=10.0, help="time box per (model, server, repeat)")
    parser.add_argument("--devices", type=int, default=200, help="enrolled devices per model")
    parser.add_argument("--tasks", type=int, default=5, help="open tasks per run: each device posts to each")
    parser.add_argument("--repeats", type=int, default=3, help="bare/ours alternations per model and concurrency")
    parser.add_argument("--models", default="digits-cnn,mlp-1m")
    parser.add_argument("--durability", default=",".join(DURABILITY_MODES),
                        help=f"ours' {ENV_DURABILITY} modes, each measured against bare (default first)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="another checkout of Pollinate (e.g. a git worktree of an earlier commit) whose"
                             " pollinate serve runs beside ours in each repeat, in the default durability mode")
    args = parser.parse_args()
    if args.reference is not None:
        args.reference = args.reference.resolve()
        if not (args.reference / "pollinate" / "__main__.py").is_file():
            parser.error(f"--reference {args.reference}: not a checkout of Pollinate (no pollinate/__main__.py)")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.modes = [m for m in DURABILITY_MODES if m in args.durability.split(",")]
    if DEFAULT_DURABILITY not in args.modes:
        parser.error(f"--durability must include the default, {DEFAULT_DURABILITY}")

    specs = {k: v for k, v in model_specs().items() if k in args.models.split(",")}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_before": os.getloadavg()[0]},
              "devices": args.devices, "tasks": args.tasks, "repeats": args.repeats, "seconds": args.seconds,
              "target_ratio": TARGET_RATIO, "durability": args.modes, "default_durability": DEFAULT_DURABILITY,
              "rows": []}
    if args.reference is not None:
        result["reference"] = {"commit": _commit(args.reference), "target_ratio": REFERENCE_TARGET}
    result["hygiene_checks_us"] = hygiene_costs()
    print(f"request hygiene checks (µs per body): {result['hygiene_checks_us']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pollinate-edge-ingest-") as scratch:
        scratch = Path(scratch)
        setups = build_store(scratch / "store", specs, max(args.devices, max(concurrencies)))
        if args.reference is not None:
            built = build_reference(args.reference, scratch / "ref-store", setups,
                                    reference_gateways(args, concurrencies), max(args.devices, max(concurrencies)))
            for name, setup in setups.items():
                setup["ref"] = built[name]
        gc.freeze()  # the client's setup objects: never traversed again while it posts
        (scratch / "bare_app.py").write_text(BARE_APP)
        for model, setup in setups.items():
            for concurrency in concurrencies:
                row = measure(model, setup, concurrency, args, scratch)
                result["rows"].append(row)
        result["loop_split_ms"] = {}
        for model in setups:  # in a child: its own event loop, store and committer, no client around
            out = subprocess.run([sys.executable, __file__, "--loop-split", model, str(scratch)], cwd=ROOT,
                                 capture_output=True, text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            result["loop_split_ms"][model] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{model}: event-loop CPU per update in-process (ms): {result['loop_split_ms'][model]}", flush=True)
    result["machine"]["load_after"] = os.getloadavg()[0]
    # per model, the rows at the first concurrency listed (8 by default), in the shape
    # benchmarks/edge.py reads; "rows" has every concurrency
    result["models"] = {row["model"]: row for row in result["rows"] if row["concurrency"] == concurrencies[0]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edge_ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "edge_ingest.md")
    print(f"wrote {RESULTS / 'edge_ingest.md'}")


def measure(model: str, setup: dict, concurrency: int, args, scratch: Path) -> dict:
    """`args.repeats` alternations of bare and ours (each durability mode) for one model at
    one concurrency."""
    row = {"model": model, "concurrency": concurrency, "parameters": setup["size"],
           "bytes_per_update": len(setup["body"]), "runs": []}
    servers = [("bare", None)] + [(ours_key(mode), mode) for mode in args.modes]
    if args.reference is not None:
        servers.append(("ref", DEFAULT_DURABILITY))
    for r in range(args.repeats):
        tag = f"c{concurrency}-r{r}"
        run = {}
        for key, mode in servers if r % 2 == 0 else servers[::-1]:
            if key == "ref":  # the reference's own store: tasks opened up front by its code
                ref = setup["ref"]
                tasks = [ref["tasks"][f"{tag}-ref-{k}"] for k in range(args.tasks)]
                warmup = ref["tasks"][f"{tag}-ref-warmup"]
                tokens = ref["tokens"]
            else:
                tasks = open_tasks(model, setup, [f"{tag}-{key}-{k}" for k in range(args.tasks)])
                warmup = open_tasks(model, setup, [f"{tag}-{key}-warmup"])[0]
                tokens = setup["tokens"]
            jobs = [(task, token) for task in tasks for token in tokens[:args.devices]]
            warmups = [(warmup, token) for token in tokens[:concurrency]]
            kind = "bare" if mode is None else "ref" if key == "ref" else "ours"
            proc, port = start(kind, scratch, mode, args.reference)
            try:
                run[key] = post_all(port, model, jobs, warmups, setup["body"], concurrency, args.seconds,
                                    proc.pid, mode is not None)
            finally:
                stop(proc)
            for task in (*tasks, warmup):  # the run's updates: gigabytes for the big model
                if key == "ref":
                    shutil.rmtree(scratch / "ref-store" / "edge" / task, ignore_errors=True)
                else:
                    setup["edge"].discard_files(task)
            s = run[key]
            print(f"{model:11s} x{concurrency:<3d} #{r} {key:10s} {s['updates_per_s']:8.1f} updates/s "
                  f"{s['mb_per_s']:8.1f} MB/s  cpu {s['server_cpu_ms_per_update']:.2f} ms/update "
                  f"(loop {s['loop_cpu_ms_per_update']:.2f}, other threads {s['other_threads_cpu_ms_per_update']:.2f};"
                  f" {s['server_cpu_cores']:.2f} cores)  {s['statuses']}", flush=True)
            if s["phases_ms"]:
                print("      ms per update: " + ", ".join(f"{k} {v:.2f}" for k, v in s["phases_ms"].items()),
                      flush=True)
            if mode is not None and set(s["statuses"]) != {"202"}:
                print(f"warning: {model} ({mode}): not every update was accepted: {s['statuses']}", flush=True)
        for mode in args.modes:
            run[ratio_key(mode)] = run[ours_key(mode)]["updates_per_s"] / run["bare"]["updates_per_s"]
        if "ref" in run:
            run["ratio_ref"] = run["ours"]["updates_per_s"] / run["ref"]["updates_per_s"]
        row["runs"].append(run)
    for mode in args.modes:
        row[ratio_key(mode)] = statistics.median(run[ratio_key(mode)] for run in row["runs"])
    row["meets_target"] = row["ratio"] >= TARGET_RATIO
    if args.reference is not None:
        row["ratio_ref"] = statistics.median(run["ratio_ref"] for run in row["runs"])
        row["meets_reference_target"] = row["ratio_ref"] >= REFERENCE_TARGET
    for key, mode in servers:
        row[key] = {stat: statistics.median(run[key][stat] for run in row["runs"])
                    for stat in ("updates_per_s", "mb_per_s", "server_cpu_ms_per_update", "server_cpu_cores",
                                 "loop_cpu_ms_per_update", "other_threads_cpu_ms_per_update")}
        if mode is not None and key != "ref":
            row[key]["durability"] = mode
            row[key]["phases_ms"] = {phase: statistics.median(run[key]["phases_ms"].get(phase, 0.0)
                                                              for run in row["runs"])
                                     for phase in row["runs"][0][key]["phases_ms"]}
    return row


def _ratio(ratio: float, target: float) -> str:
    """Two decimals, or three where two would round a miss up to the target."""
    return f"{ratio:.3f}" if ratio < target <= round(ratio, 2) else f"{ratio:.2f}"


DESCRIBED = {
    "process": "appended to the task's segment with O_DIRECT but no RWF_DSYNC (the bytes have left the "
               "process when the write returns: a kill -9 of the server loses nothing), committed in SQLite "
               "(WAL, synchronous=NORMAL: a committed transaction survives a kill -9), no sync waited for",
    "power": "appended to the task's segment durably (O_DIRECT + RWF_DSYNC), committed in SQLite "
             "(synchronous=FULL): survives a power cut too, at two disk waits per batch",
}


def write_markdown(result: dict, path: Path) -> None:
    machine = result["machine"]
    modes = result.get("durability") or [DEFAULT_DURABILITY]
    default = result.get("default_durability", DEFAULT_DURABILITY)
    target = result["target_ratio"]
    lines = [
        "# Edge update ingestion (benchmarks/edge_ingest.py)",
        "",
        f"{machine['cpus']} CPUs, shared (load {machine['load_before']:.1f} before the run, "
        f"{machine['load_after']:.1f} after). {result['devices']} devices x {result['tasks']} open tasks per run, one "
        f"float32 update per device and task, {result['repeats']} alternating repeats per row (medians shown). "
        "`ours` = `pollinate serve`, one uvicorn worker: token, open task, body under the limit, length, finite "
        "values, L2 norm, recorded, then 202 — in each durability mode (`" + ENV_DURABILITY + "`, default `"
        + default + "`):",
        "",
        *(f"- `{mode}`{' (the default)' if mode == default else ''}: {DESCRIBED[mode]};" for mode in modes),
        "",
        "`bare` = a FastAPI route on one uvicorn worker that only reads the body. Each mode is measured against "
        "bare in the same repeat. The client is one asyncio process with that many keep-alive connections. "
        f"Target: ours >= {target}x bare.",
        "",
    ]
    if max(machine["load_before"], machine["load_after"]) > machine["cpus"]:
        lines += [f"The machine was busy with other work (load above its {machine['cpus']} CPUs): absolute rates, "
                  "and single repeats, vary severalfold from one repeat to the next; the per-repeat ratios are "
                  "in the second table.", ""]
    lines += [
        "| model | update | connections | durability | bare updates/s | bare MB/s | ours updates/s | ours MB/s "
        "| ours/bare |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        for mode in modes:
            ours, ratio = row[ours_key(mode)], row[ratio_key(mode)]
            lines.append(
                f"| {row['model']} ({row['parameters']:,} parameters) | {row['bytes_per_update'] / 1e6:.2f} MB "
                f"| {row['concurrency']} | {mode} | {row['bare']['updates_per_s']:.0f} | {row['bare']['mb_per_s']:.0f} "
                f"| {ours['updates_per_s']:.0f} | {ours['mb_per_s']:.0f} "
                f"| **{_ratio(ratio, target)}x** {'(met)' if ratio >= target else '(NOT met)'} |")
    ref = result.get("reference")
    if ref:
        goal = ref["target_ratio"]
        lines += ["", f"Against the reference: `pollinate serve` from a checkout of commit `{ref['commit']}` (the code "
                  "before issue 19's request hygiene: no read timeouts, upload cap, JSON bounds or CORS split), on a "
                  "store its own code built, in the same repeats as ours and bare, default durability. Target: ours >= "
                  f"{goal}x ref (ingestion within 10%).", "",
                  "| model | connections | ref updates/s | ours updates/s | ours/ref | each repeat "
                  "| ref CPU ms/update | ours CPU ms/update | ours/ref CPU |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for row in result["rows"]:
            if "ratio_ref" not in row:
                continue
            each = ", ".join(f"{run['ratio_ref']:.2f}" for run in row["runs"])
            cpu_ours, cpu_ref = row["ours"]["server_cpu_ms_per_update"], row["ref"]["server_cpu_ms_per_update"]
            lines.append(f"| {row['model']} | {row['concurrency']} | {row['ref']['updates_per_s']:.0f} "
                         f"| {row['ours']['updates_per_s']:.0f} | **{_ratio(row['ratio_ref'], goal)}x** "
                         f"{'(met)' if row['ratio_ref'] >= goal else '(NOT met)'} | {each} "
                         f"| {cpu_ref:.3f} | {cpu_ours:.3f} | {cpu_ours / cpu_ref:.2f} |")
        lines += ["", "The server CPU an update costs (medians over the repeats) is the steadier measure on a shared "
                  "machine: the rates move with whatever else the cores run, the work per update does not."]
    costs = result.get("hygiene_checks_us")
    if costs:
        lines += ["", "What the JSON bounds (server/json_bounds.py) cost on the event loop per body, which every body "
                  "but a device update's passes once before any route parses it, against `json.loads` of the same "
                  "body (best of 5 x 2,000 calls, µs):", "",
                  "| body | bytes | bounds check | json.loads | check / parse |", "|---|---:|---:|---:|---:|"]
        for body in ("telemetry", "feedback"):
            check, parse = costs[f"{body}_bounds"], costs[f"{body}_json_loads"]
            lines.append(f"| {body} | {costs[f'{body}_bytes']:,} | {check:.1f} | {parse:.1f} | {check / parse:.2f} |")
        if "update_middleware_after" in costs:
            lines += ["", "The other checks on a device update's way in, per request (µs; around an app that does nothing): "
                      f"CORS as it was (Starlette's middleware for every route) {costs['update_middleware_before']:.1f}, "
                      "as it is (the admin-route split, server/cors.py, then the upload cap, server/limits.py) "
                      f"{costs['update_middleware_after']:.1f}. The read timeouts (server/protocol.py) cost a float "
                      "assignment per body read and one timer per connection."]
    lines += ["", "Server CPU per update (ms; ours: the event loop, and the store's committer thread), "
              "and each repeat's ratio:", "",
              "| model | connections | durability | bare CPU | ours CPU | ours: loop | ours: committer | ratios |",
              "|---|---:|---|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        for mode in modes:
            ours = row[ours_key(mode)]
            ratios = ", ".join(f"{run[ratio_key(mode)]:.2f}" for run in row["runs"])
            lines.append(f"| {row['model']} | {row['concurrency']} | {mode} "
                         f"| {row['bare']['server_cpu_ms_per_update']:.2f} "
                         f"| {ours['server_cpu_ms_per_update']:.2f} | {ours['loop_cpu_ms_per_update']:.2f} "
                         f"| {ours['other_threads_cpu_ms_per_update']:.2f} | {ratios} |")
    phases = list(result["rows"][0]["ours"]["phases_ms"]) if result["rows"] else []
    if phases:
        lines += ["", "Where an accepted update's wall time goes in ours (ms, the server's own "
                  "`pollinate_edge_update_seconds_total`): `read` its body (admission included), `queue` for the "
                  "committer, `check_append` the checks and the append of its batch (durable in `power`), `sync` a "
                  "new segment's folder (`power` only), `commit` the SQLite transaction, `wake` the route again:", "",
                  "| model | connections | durability | " + " | ".join(phases) + " | total |",
                  "|---|---:|---|" + "---:|" * (len(phases) + 1)]
        for row in result["rows"]:
            for mode in modes:
                split = row[ours_key(mode)]["phases_ms"]
                lines.append(f"| {row['model']} | {row['concurrency']} | {mode} | "
                             + " | ".join(f"{split.get(k, 0):.2f}" for k in phases)
                             + f" | {sum(split.values()):.2f} |")
    split = result.get("loop_split_ms") or {}
    if split:
        lines += ["", f"Event-loop CPU per accepted update with no sockets (ms; the ASGI app called in-process, the "
                  f"real store and committer behind it, durability `{default}`): through the whole app (its middleware "
                  "and the update route's fast path, `server/shortcuts.py`), through FastAPI's router (what the "
                  "fast path skips: route matching through the included routers), the update route's function alone, "
                  "and the bare FastAPI app. `app - route` is what the middleware and the fast path cost, "
                  "`router - route` what FastAPI's routing would:", "",
                  "| model | app | router | route | bare app |", "|---|---:|---:|---:|---:|"]
        for model, ms in split.items():
            lines.append(f"| {model} | " + " | ".join(f"{ms[k]:.3f}" for k in LOOP_SPLIT) + " |")
    lines += ["", "## Where ours' extra time goes", "",
              "In `power` mode each batch of updates costs two disk waits (its segment write, synced, then the "
              "SQLite commit) that bare never makes; with few connections those waits, not the CPU, set its rate, "
              "and they grow with whatever else loads the disk and the cores. In `process` mode no sync is "
              "waited for (the O_DIRECT write still waits for the device to take the bytes, ~0.1 ms per update "
              "here): both servers are bound by CPU — ours' event loop (uvicorn's HTTP work, as bare's, plus the "
              "route's admission and the hand-over to the committer) and the committer thread (checks, append, "
              "commit), which share one GIL and, with the client, the machine's cores. With few connections a "
              "connection waits for each answer before it sends its next update, so ours' rate is also bounded "
              "by connections / an update's wall time (the phase table's total): bare answers as soon as it has "
              "read the body, ours once its batch is committed (handed between the event loop and the committer "
              "thread twice, each hand-over waiting for the GIL on a busy machine).", ""]
    for row in result["rows"]:
        bare = row["bare"]
        ms = split.get(row["model"])
        for mode in modes:
            ours = row[ours_key(mode)]
            phases = ours["phases_ms"]
            loop = (f" (in-process: middleware and fast path {ms['app'] - ms['route']:.3f}, the route's work "
                    f"{ms['route']:.3f}, against the whole bare app's {ms['bare']:.3f})") if ms and mode == default else ""
            lines.append(
                f"- {row['model']}, {row['concurrency']} connections, `{mode}`: "
                f"{_ratio(row[ratio_key(mode)], target)}x. Ours uses "
                f"{ours['server_cpu_ms_per_update']:.2f} ms of CPU per update against bare's "
                f"{bare['server_cpu_ms_per_update']:.2f} — {ours['loop_cpu_ms_per_update']:.2f} on its event loop{loop} "
                f"and {ours['other_threads_cpu_ms_per_update']:.2f} on the committer; an update waits "
                f"{phases.get('queue', 0):.2f} ms for the committer, {phases.get('check_append', 0):.2f} "
                f"for its batch's checks and append, {phases.get('commit', 0):.2f} for the commit and "
                f"{phases.get('wake', 0):.2f} to be answered.")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loop-split"]:
        print(json.dumps(loop_split(Path(sys.argv[3]), sys.argv[2], model_specs()[sys.argv[2]])))
    else:
        main()
