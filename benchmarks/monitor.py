"""Field monitoring: telemetry ingestion, bytes on the wire, drift detection power.

    .venv/bin/python benchmarks/monitor.py [--epochs 5] [--seconds 8] [--repeats 3] \
        [--concurrency 8,64] [--draws 20] [--false-runs 100] [--max-predictions 2000]

Trains the zoo's digits CNN for a few epochs with ``training.central`` (in a child process,
so the process that posts and measures never loads TensorFlow) and registers it in a scratch
store with its reference profile, exactly as ``pollinate train`` does. Then, in one run:

1. **Ingestion.** ``pollinate serve`` (one uvicorn worker, the real routes: JSON, the
   per-address token bucket, validation against the version's grid and value range, the
   batch id, the committer's SQLite transaction, the alert watcher), as ``ours`` on a store
   with v1 on ``stable`` and as ``guarded`` with a copy of v1 staged for 50 % under the
   field_accuracy and error_rate guardrails (every post to v1 is tallied under its sender),
   against two references measured in the same run: the same command from the code of
   ``--reference`` (default daf1709, before issue 19: ``git archive`` of that commit into the
   scratch folder, run by this Python with that folder first on the path; the run checks
   that the old code answers, by refusing the new ``batch_id`` field) on a store of its own
   with the same versions and rollout, and a bare FastAPI app on one uvicorn worker whose
   routes only read and ``json.loads`` the body and answer 202. Workloads: telemetry
   batches of 100 predictions aggregated the way a client does (``registry.profile.observe``
   on real held-out digits and the CNN's real outputs; latency histogram from the CNN's
   measured per-prediction latency), without and with the 100 ``recent`` prediction ids
   ``pollinate.js`` adds to every batch, and feedback posts. One asyncio client with that
   many keep-alive connections; every post comes from an address of its own (X-Forwarded-For
   from a trusted proxy, 127.0.0.1) and carries a client id of its own and, to ours, a
   time-ordered ``batch_id``, so the default rate limit (``POLLINATE_TELEMETRY_RATE`` = 60 a
   minute) is in force but never reached. The four servers take turns ``--repeats`` times,
   in rotating order; medians, the median of each round's ratio, and the server's CPU time
   per post (steadier than throughput on a shared machine).
2. **Bytes per 1,000 predictions**: the request bodies (compact JSON, as
   ``JSON.stringify`` writes them) a client sends flushing every 100 and every 1,000
   predictions, against the raw inputs (1,000 × 64 float32).
3. **Drift detection power**: through the real ``registry.monitoring.Monitor`` on a copy
   of the store, batches of 50 predictions of drawn-differently held-out digits (shifted
   1 and 2 px, thick, tiny, a class-prior shift) are ingested and ``check_alerts`` runs
   after each (default thresholds: PSI >= 0.2 or JS >= 0.1 with >= 200 predictions): how
   many predictions until a drift alert, median over ``--draws`` random draws; and false
   alarms: the share of runs of N unshifted held-out digits (bootstrapped) that alert.

Writes benchmarks/results/monitor.json and monitor.md.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
TICKS = os.sysconf("SC_CLK_TCK")
MODEL = "digits"
BATCH = 100          # predictions per telemetry batch (the clients' default flush)
CHECK_EVERY = 50     # predictions per ingested batch in the drift experiment
HOUR = 3600.0

from serve import free_port, stop, wait_http  # noqa: E402  (the serve benchmark's process helpers)

BARE_APP = textwrap.dedent('''
    import json

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/models/{name}/telemetry")
    async def telemetry(name: str, request: Request):
        body = json.loads(await request.body())
        return JSONResponse({"accepted": True, "n": len(body)}, status_code=202)

    @app.post("/v1/models/{name}/feedback")
    async def feedback(name: str, request: Request):
        body = json.loads(await request.body())
        return JSONResponse({"accepted": True, "n": len(body)}, status_code=202)

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}
''')


# --------------------------------------------------------------------------- drawn differently


def shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Every digit moved dy rows down and dx columns right (zeros come in)."""
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def shifted_all_ways(x: np.ndarray, pixels: int) -> np.ndarray:
    """Each digit moved ``pixels`` up, down, left and right: 4 × len(x) inputs (a draw picks
    one of them per digit, so the direction is random per prediction)."""
    return np.concatenate([shift(x, dy, dx) for dy, dx in
                           ((pixels, 0), (-pixels, 0), (0, pixels), (0, -pixels))])


def thick(x: np.ndarray) -> np.ndarray:
    """A thicker pen: every pixel takes the brightest of its 3×3 neighbourhood."""
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.max([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


def tiny(x: np.ndarray) -> np.ndarray:
    """The digit drawn at half size in the middle of the canvas."""
    n, h, w, c = x.shape
    small = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    out = np.zeros_like(x)
    out[:, h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = small
    return out


# --------------------------------------------------------------------------- the model (child process)


def train_child(home: Path, out: Path, epochs: int) -> None:
    """Train and register the digits CNN (profile attached by training.central), then save
    the held-out digits, their drawn-differently variants and the model's outputs on each,
    and the model's measured latency per single prediction."""
    from registry import Store
    from training.central import TrainSettings, predict, train_and_register
    from training.datasets import load_dataset
    from training.stored import load_keras_model

    dataset = load_dataset("digits")
    store = Store(home)
    outcome = train_and_register(store, dataset, TrainSettings(model="cnn", epochs=epochs), name=MODEL)
    model = load_keras_model(store, MODEL, outcome.record.version)
    x = np.concatenate([dataset.x_test, dataset.x_val]).astype(np.float32)
    y = np.concatenate([dataset.y_test, dataset.y_val]).astype(np.int64)
    inputs = {"heldout": x, "shift1": shifted_all_ways(x, 1), "shift2": shifted_all_ways(x, 2),
              "thick": thick(x), "tiny": tiny(x)}
    arrays = {"y": y}
    for key, value in inputs.items():
        arrays[f"x_{key}"] = value
        arrays[f"p_{key}"] = predict(model, value).astype(np.float32)
    latency = []
    for i in range(60):  # one prediction at a time, as a client predicts (the first ones warm up)
        started = time.perf_counter()
        model(x[i:i + 1], training=False)
        latency.append((time.perf_counter() - started) * 1e3)
    arrays["latency_ms"] = np.asarray(latency[10:])
    np.savez(out / "data.npz", **arrays)
    (out / "train.json").write_text(json.dumps({
        "version": outcome.record.version, "epochs": epochs, "train_seconds": outcome.train_seconds,
        "metrics": outcome.record.metrics, "parameters": outcome.parameters,
        "heldout": int(len(x)), "train_rows": int(len(dataset.x_train))}))


def train(scratch: Path, epochs: int) -> tuple[dict, dict]:
    subprocess.run([sys.executable, __file__, "--train-child", str(scratch / "store"), str(scratch), str(epochs)],
                   cwd=ROOT, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                   stdout=subprocess.DEVNULL)
    data = dict(np.load(scratch / "data.npz"))
    return data, json.loads((scratch / "train.json").read_text())


# --------------------------------------------------------------------------- what a client sends


def batch_body(grid: dict, spec: dict, x: np.ndarray, outputs: np.ndarray, latency_ms: np.ndarray,
               version: int, client_id: str | None, ids: list[str] | None) -> dict:
    """One telemetry batch as a client aggregates it (docs/monitoring.md section 2)."""
    from registry.profile import bin_counts, observe

    seen = observe(x, outputs, grid, spec)
    body = {"version": version}
    if client_id is not None:
        body["client_id"] = client_id
    body.update({"predictions": seen["predictions"], "errors": 0,
                 "latency_ms": bin_counts(latency_ms, grid["latency_ms_edges"]).tolist(),
                 "features": seen["features"], "prediction": seen["prediction"]})
    if ids:
        labels = grid["prediction"]["labels"]
        body["recent"] = [{"id": pid, "prediction": labels[int(o.argmax())],
                           "confidence": round(float(o.max()), 4)} for pid, o in zip(ids, outputs[-len(ids):])]
    return body


def compact(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def bytes_per_thousand(grid: dict, spec: dict, data: dict, rng: np.random.Generator, draws: int = 20) -> dict:
    """Request-body bytes for 1,000 predictions, flushing every 100 and every 1,000."""
    x, p, lat = data["x_heldout"], data["p_heldout"], data["latency_ms"]
    client_id = "dev-" + "0" * 24  # the device client's id shape (pollinate.js: optional)
    out = {}
    for flush in (100, 1000):
        for recent in (False, True):
            totals = []
            for _ in range(draws):
                idx = rng.integers(0, len(x), 1000)
                total = 0
                for start in range(0, 1000, flush):
                    part = idx[start:start + flush]
                    ids = [os.urandom(16).hex() for _ in range(min(100, len(part)))] if recent else None
                    total += len(compact(batch_body(grid, spec, x[part], p[part], rng.choice(lat, len(part)),
                                                    1, client_id, ids)))
                totals.append(total)
            out[f"flush{flush}{'_recent' if recent else ''}"] = {
                "flush_every": flush, "recent_ids": recent, "batches": 1000 // flush,
                "bytes": int(statistics.median(totals))}
    raw = 1000 * 64 * 4
    for row in out.values():
        row["share_of_raw"] = row["bytes"] / raw
    return {"raw_float32_bytes": raw, "rows": out}


# --------------------------------------------------------------------------- drift detection


class Clock:
    """Fake times for the drift runs: each run gets its own span, two days after the last
    (alerts look back 24 h), starting at an hour boundary years before now, so that no run
    sees another's windows."""

    def __init__(self) -> None:
        self.next = (time.time() // HOUR) * HOUR - 5 * 365 * 24 * HOUR

    def run(self) -> float:
        start = self.next
        self.next += 48 * HOUR
        return start


CLOCK = Clock()  # one for the whole run: every drift run and in-process measurement has its span


def drift_run(monitor, grid: dict, spec: dict, draw, steps: int, clock: Clock, latency: np.ndarray,
              rng: np.random.Generator, *, full: bool = False) -> dict:
    """Ingest up to ``steps`` batches of CHECK_EVERY predictions from ``draw`` (-> (x, outputs))
    and check alerts after each; the first drift alert's prediction count and subjects, and the
    largest PSI after 200 predictions. Stops at the first alert unless ``full``."""
    start = clock.run()
    monitor.check_alerts(MODEL, now=start)  # clears the alerts still open from the run before
    first = margin = None
    subjects: list[str] = []
    for step in range(steps):
        x, outputs = draw(CHECK_EVERY)
        now = start + step  # one second apart, all in one hour's window
        monitor.ingest_telemetry(MODEL, batch_body(grid, spec, x, outputs, rng.choice(latency, len(x)), 1, None,
                                                   None), now=now)
        new = [a for a in monitor.check_alerts(MODEL, now=now) if a["kind"] == "drift"]
        if new and first is None:
            first = (step + 1) * CHECK_EVERY
            subjects = sorted(a["subject"] for a in new)
        if (step + 1) * CHECK_EVERY == MARGIN_AT:
            margin = max_psi(monitor, start)
        if first is not None and margin is not None and not full:
            break
    return {"first_alert": first, "subjects": subjects, "start": start, "max_psi_at_200": margin,
            "max_psi_at_end": max_psi(monitor, start)}


MARGIN_AT = 200  # predictions: the default min_predictions, the first check that may alert


def max_psi(monitor, start: float) -> float:
    """The largest PSI over the features and the predicted classes of a run so far."""
    drift = monitor.report(MODEL, version=1, since=start, until=start + HOUR - 1)["versions"]["1"]["drift"]
    return max(d["psi"] for d in drift.values())


def drift_power(store_home: Path, data: dict, args, rng: np.random.Generator,
                min_predictions: int | None = None, false_runs: int | None = None) -> dict:
    """Detection and false alarms with the default thresholds, or with ``min_predictions``
    configured instead of the default (reset to the default afterwards)."""
    from registry import Store
    from registry.monitoring import Monitor

    monitor = Monitor(Store(store_home))
    if min_predictions is not None:
        monitor.configure(MODEL, min_predictions=min_predictions)
    grid = monitor.grid(MODEL, 1)
    spec = Store(store_home).get_version(MODEL, 1).input_spec
    config = monitor.config(MODEL)
    latency = data["latency_ms"]
    y = data["y"]

    def pool(key: str, weights: np.ndarray | None = None):
        x, p = data[f"x_{key}"], data[f"p_{key}"]
        prob = None if weights is None else weights / weights.sum()

        def draw(n: int):
            idx = rng.choice(len(x), n, replace=True, p=prob)
            return x[idx], p[idx]
        return draw

    prior = np.where(y == args.prior_class, args.prior_share / max(1, (y == args.prior_class).sum()),
                     (1 - args.prior_share) / max(1, (y != args.prior_class).sum()))
    shifts = {
        "shifted 1 px": pool("shift1"),
        "shifted 2 px": pool("shift2"),
        "thick": pool("thick"),
        "tiny": pool("tiny"),
        f"class prior ({args.prior_share:.0%} are {args.prior_class}s)": pool("heldout", prior),
    }
    steps = args.max_predictions // CHECK_EVERY
    clock = CLOCK
    detection = {}
    for name, draw in shifts.items():
        started = time.perf_counter()
        runs = [drift_run(monitor, grid, spec, draw, steps, clock, latency, rng) for _ in range(args.draws)]
        firsts = [r["first_alert"] for r in runs]
        found = [f for f in firsts if f is not None]
        subject_counts: dict[str, int] = {}
        for r in runs:
            for s in r["subjects"]:
                subject_counts[s] = subject_counts.get(s, 0) + 1
        # a run that never alerted counts as "more than the cap" in the median
        ordered = sorted(f if f is not None else float("inf") for f in firsts)
        median = statistics.median_low(ordered) if len(ordered) % 2 else \
            (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
        margins = [r["max_psi_at_200"] for r in runs if r["max_psi_at_200"] is not None]
        detection[name] = {"median": None if median == float("inf") else median,
                           "max_psi_at_200": statistics.median(margins) if margins else None,
                           "min": min(found) if found else None, "max": max(found) if found else None,
                           "detected": len(found), "draws": len(runs), "first_alerts": firsts,
                           "subjects": dict(sorted(subject_counts.items(), key=lambda kv: -kv[1])),
                           "seconds": time.perf_counter() - started}
        print(f"drift {name:32s} median {detection[name]['median']} predictions "
              f"({len(found)}/{len(runs)} within {args.max_predictions}), subjects {detection[name]['subjects']}",
              flush=True)
    false_alarms = {}
    unshifted = pool("heldout")
    false_runs = args.false_runs if false_runs is None else false_runs
    for n in (200, 500, 1000):
        started = time.perf_counter()
        any_check = at_end = 0
        subject_counts = {}
        psi_at_end: list[float] = []
        for _ in range(false_runs):
            r = drift_run(monitor, grid, spec, unshifted, n // CHECK_EVERY, clock, latency, rng, full=True)
            psi_at_end.append(r["max_psi_at_end"])
            if r["first_alert"] is not None:
                any_check += 1
                for s in r["subjects"]:
                    subject_counts[s] = subject_counts.get(s, 0) + 1
            report = monitor.report(MODEL, version=1, since=r["start"], until=r["start"] + HOUR - 1)
            drift = report["versions"]["1"]["drift"]
            at_end += any(d["alert"] for d in drift.values())
        false_alarms[str(n)] = {"runs": false_runs, "alerted_any_check": any_check / false_runs,
                                "alerted_at_end": at_end / false_runs,
                                "max_psi_at_end": {"median": statistics.median(psi_at_end),
                                                   "p90": float(np.percentile(psi_at_end, 90))},
                                "subjects": dict(sorted(subject_counts.items(), key=lambda kv: -kv[1])),
                                "seconds": time.perf_counter() - started}
        print(f"false alarms N={n}: {any_check}/{false_runs} runs alerted at some check, "
              f"{at_end}/{false_runs} at the end; {subject_counts}", flush=True)
    if min_predictions is not None:
        monitor.configure(MODEL, min_predictions=None)
    return {"thresholds": {k: config[k] for k in ("psi", "js", "min_predictions", "alert_hours")},
            "check_every": CHECK_EVERY, "max_predictions": args.max_predictions, "draws": args.draws,
            "detection": detection, "false_alarms": false_alarms}


# --------------------------------------------------------------------------- ingestion


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of all of a process's threads."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


class Connection:
    """One keep-alive HTTP/1.1 connection of the load client (raw bytes on asyncio/uvloop)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port, limit=1 << 20))

    async def post(self, path: str, body: bytes, address: str = "") -> int:
        forwarded = f"X-Forwarded-For: {address}\r\n" if address else ""
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"{forwarded}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0)
        await self.reader.readexactly(length)
        return int(lines[0].split()[1])

    def close(self) -> None:
        self.writer.close()


WORKLOADS = ("telemetry", "telemetry+recent", "feedback")


def with_batch_id(template: str) -> str:
    """A body template that also carries a ``batch_id`` (``%(i)s``: unique per post), as
    clients send since issue 19."""
    return '{"batch_id":"%(i)s",' + template[1:]


def address_of(k: int) -> str:
    """The k-th sender's address (X-Forwarded-For): a fleet's, one per device."""
    return f"10.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"


def templates(workload: str, grid: dict, spec: dict, data: dict, rng: np.random.Generator, count: int = 64) -> list[str]:
    """Body templates (compact JSON) with ``%(c)s`` for the client id and, in ``recent`` ids,
    ``%(b)s`` for the batch's 16 hex digits: each sent body is unique, as a fleet's are."""
    x, p, y, lat = data["x_heldout"], data["p_heldout"], data["y"], data["latency_ms"]
    labels = grid["prediction"]["labels"]
    out = []
    for _ in range(count):
        if workload == "feedback":
            i = int(rng.integers(len(y)))
            body = {"version": 1, "prediction": labels[int(p[i].argmax())], "label": labels[int(y[i])],
                    "client_id": "%(c)s"}
        else:
            idx = rng.integers(0, len(x), BATCH)
            ids = ["%(b)s" + os.urandom(8).hex() for _ in range(BATCH)] if workload.endswith("recent") else None
            body = batch_body(grid, spec, x[idx], p[idx], rng.choice(lat, BATCH), 1, "%(c)s", ids)
        out.append(json.dumps(body, separators=(",", ":")))
    return out


def post_all(port: int, workload: str, bodies: list[str], concurrency: int, seconds: float, pid: int,
             nonce: int) -> dict:
    import uvloop

    return uvloop.run(_post_all(port, workload, bodies, concurrency, seconds, pid, nonce))


async def _post_all(port: int, workload: str, bodies: list[str], concurrency: int, seconds: float, pid: int,
                    nonce: int) -> dict:
    """``concurrency`` connections post for ``seconds`` (after one untimed post each); client
    ids and recent ids carry ``nonce`` (unique per measurement) and the post's number."""
    path = f"/v1/models/{MODEL}/{workload.split('+')[0]}"
    counter = iter(range(1 << 40))

    def body() -> tuple[bytes, str]:
        k = next(counter)
        data = bodies[k % len(bodies)] % {"c": f"bench-{nonce}-{k}", "b": f"{nonce:04x}{k:012x}",
                                          "i": f"{nonce:08x}{k:024x}"}
        return data.encode(), address_of(nonce * 1_000_003 + k)

    statuses: dict[int, int] = {}
    sent = 0
    connections = [await Connection.open(port) for _ in range(concurrency)]
    for code in await asyncio.gather(*(c.post(path, *body()) for c in connections)):  # warm-up, untimed
        if code != 202:
            raise RuntimeError(f"{workload}: warm-up answered {code}")
    cpu = cpu_seconds(pid)
    started = time.perf_counter()
    stop_at = started + seconds

    async def worker(connection: Connection) -> None:
        nonlocal sent
        while time.perf_counter() < stop_at:
            data, address = body()
            status = await connection.post(path, data, address)
            statuses[status] = statuses.get(status, 0) + 1
            sent += len(data)

    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu
    for connection in connections:
        connection.close()
    n = sum(statuses.values())
    events = BATCH if workload.startswith("telemetry") else 1
    return {"posts": n, "seconds": elapsed, "posts_per_s": n / elapsed, "events_per_s": n * events / elapsed,
            "bytes_per_post": sent / max(n, 1), "server_cpu_ms_per_post": cpu / max(n, 1) * 1e3,
            "server_cpu_cores": cpu / elapsed, "statuses": {str(k): v for k, v in sorted(statuses.items())}}


SERVERS = ("bare", "reference", "ours", "guarded")
STORES = {"ours": "plain-store", "guarded": "store"}  # ours: no rollout staged; guarded: v2 staged, guardrails on


def start(server: str, scratch: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    # no demo page for either (an archived commit has no vendored TF.js; nothing here loads the page)
    env = {**os.environ, "POLLINATE_TRUSTED_PROXIES": "127.0.0.1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "POLLINATE_WEB_CLIENT": "off"}
    env.pop("POLLINATE_HOME", None)
    if server in STORES:
        command = [sys.executable, "-m", "pollinate", "serve", "--home", str(scratch / STORES[server]),
                   "--port", str(port)]
        cwd = ROOT
    elif server == "reference":  # the old code: its folder first on the path (and for any worker it starts)
        command = [sys.executable, "-m", "pollinate", "serve", "--home", str(scratch / "reference-store"),
                   "--port", str(port)]
        cwd = scratch / "reference"
        env["PYTHONPATH"] = str(cwd)
    else:
        command = [sys.executable, "-m", "uvicorn", "bare_app:app", "--port", str(port),
                   "--log-level", "warning", "--no-access-log"]
        cwd = scratch
    with open(scratch / f"{server}.log", "ab") as log:
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    except BaseException:
        stop(proc)
        log = (scratch / f"{server}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the {server} server did not come up:\n{log}") from None
    return proc, port


# Run by the reference's own code (its folder first on sys.path): a store of its own with the
# versions the benchmark's store holds (files exported by this process), stable -> v1 with v2
# staged for 50 % under guardrails — as the benchmark's store is set up by set_up_rollout.
REFERENCE_STORE = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import registry
    from registry import Lineage, Store
    from registry.monitoring import Monitor

    folder, home, spec = Path(sys.argv[1]).resolve(), sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
    assert Path(registry.__file__).resolve().is_relative_to(folder), registry.__file__
    store = Store(home)
    for version in spec["versions"]:
        store.publish(spec["model"], lineage=Lineage("central"), metrics=version["metrics"],
                      input_spec=version["input_spec"], labels=version["labels"],
                      artifacts={fmt: {name: Path(path) for name, path in files.items()}
                                 for fmt, files in version["artifacts"].items()})
    store.set_channel(spec["model"], "stable", 1)
    store.set_channel(spec["model"], "stable", 2, rollout_percent=50)
    Monitor(store).set_guardrails(spec["model"], "stable", ["field_accuracy", "error_rate"])
    print(registry.__file__)
''')


def set_up_rollout(scratch: Path, reference: str) -> dict:
    """v2 (a copy of v1) staged for 50 % of ``stable`` under guardrails in the benchmark's
    store (a copy with v1 alone on ``stable`` is the plain store), and the same in a store made
    by the reference's code; the reference's code is ``git archive`` of that commit. Returns
    what was checked."""
    from registry import Lineage, Store
    from registry.monitoring import Monitor

    folder = scratch / "reference"
    folder.mkdir(exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", reference], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    commit = subprocess.run(["git", "rev-parse", reference], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    store = Store(scratch / "store")
    record = store.get_version(MODEL, 1)
    artifacts = {fmt: {f.name: str(store.artifact_path(MODEL, 1, fmt, f.name)) for f in files}
                 for fmt, files in record.artifacts.items()}
    spec = {"model": MODEL, "versions": [{"metrics": record.metrics, "input_spec": record.input_spec,
                                          "labels": record.labels, "artifacts": artifacts}] * 2}
    (scratch / "reference-versions.json").write_text(json.dumps(spec))
    shutil.copytree(scratch / "store", scratch / "plain-store")  # the same versions, nothing staged
    store.publish(MODEL, lineage=Lineage("central"), metrics=record.metrics, input_spec=record.input_spec,
                  labels=record.labels, artifacts={fmt: {name: Path(path) for name, path in files.items()}
                                                   for fmt, files in artifacts.items()})
    store.set_channel(MODEL, "stable", 1)
    store.set_channel(MODEL, "stable", 2, rollout_percent=50)
    Monitor(store).set_guardrails(MODEL, "stable", ["field_accuracy", "error_rate"])
    made = subprocess.run([sys.executable, "-c", REFERENCE_STORE, str(folder), str(scratch / "reference-store"),
                           str(scratch / "reference-versions.json")], cwd=folder, check=True, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(folder)})
    # where the reference's `registry` was imported from, relative to the scratch folder
    found = Path(made.stdout.strip()).resolve().relative_to(scratch.resolve())
    return {"reference": reference, "commit": commit, "reference_registry": str(found)}


def check_reference(scratch: Path, body: str) -> dict:
    """The reference server runs the old code: it refuses the ``batch_id`` field ours takes
    (``body``: a feedback with one)."""
    import urllib.error
    import urllib.request

    answers = {}
    for server in ("ours", "reference"):
        proc, port = start(server, scratch)
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{MODEL}/feedback",
                                             data=body.encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    answers[server] = [answer.status, answer.read().decode()[:200]]
            except urllib.error.HTTPError as error:
                answers[server] = [error.code, error.read().decode()[:200]]
        finally:
            stop(proc)
    if answers["ours"][0] != 202 or answers["reference"][0] != 422 or "batch_id" not in answers["reference"][1]:
        raise RuntimeError(f"the reference server is not the old code: {answers}")
    return answers


def ingestion(scratch: Path, grid: dict, spec: dict, data: dict, args, rng: np.random.Generator
              ) -> tuple[list[dict], dict]:
    """Per workload and connection count, ``args.repeats`` rounds of the three servers (bare,
    ours, the reference), in a rotating order; each server is started once per round and
    measures every workload and connection count. Returns the rows and what was checked of
    the reference."""
    workloads = [w for w in args.workloads.split(",") if w]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    checked = set_up_rollout(scratch, args.reference)
    probe = with_batch_id(templates("feedback", grid, spec, data, rng, 1)[0]) % {"c": "check", "i": "0" * 32}
    checked["answers"] = check_reference(scratch, probe)
    print(f"reference {checked['reference']} ({checked['commit'][:12]}) runs its own code: "
          f"{checked['reference_registry']}; {checked['answers']}", flush=True)
    plain = {w: templates(w, grid, spec, data, rng) for w in workloads}
    ided = {w: [with_batch_id(t) for t in ts] for w, ts in plain.items()}
    bodies = {"bare": plain, "reference": plain, "ours": ided, "guarded": ided}
    (scratch / "bare_app.py").write_text(BARE_APP)
    gc.freeze()
    runs: dict[tuple[str, int], list[dict]] = {(w, c): [] for w in workloads for c in concurrencies}
    nonce = 0
    for r in range(args.repeats):
        measured: dict[tuple[str, int], dict] = {key: {} for key in runs}
        for server in SERVERS[r % len(SERVERS):] + SERVERS[:r % len(SERVERS)]:
            proc, port = start(server, scratch)
            try:
                for w in workloads:
                    for c in concurrencies:
                        nonce += 1
                        s = post_all(port, w, bodies[server][w], c, args.seconds, proc.pid, nonce)
                        measured[(w, c)][server] = s
                        print(f"{w:17s} x{c:<3d} #{r} {server:5s} {s['posts_per_s']:8.1f} posts/s "
                              f"{s['events_per_s']:9.0f} events/s  {s['bytes_per_post']:6.0f} B/post  "
                              f"cpu {s['server_cpu_ms_per_post']:.2f} ms/post ({s['server_cpu_cores']:.2f} cores)  "
                              f"{s['statuses']}", flush=True)
            finally:
                stop(proc)
        for key, run in measured.items():
            run["ratio"] = run["ours"]["posts_per_s"] / run["bare"]["posts_per_s"]
            run["ratio_reference"] = run["ours"]["posts_per_s"] / run["reference"]["posts_per_s"]
            run["cpu_ratio_reference"] = (run["ours"]["server_cpu_ms_per_post"]
                                          / run["reference"]["server_cpu_ms_per_post"])
            run["guarded_ratio_reference"] = run["guarded"]["posts_per_s"] / run["reference"]["posts_per_s"]
            run["guarded_cpu_ratio_reference"] = (run["guarded"]["server_cpu_ms_per_post"]
                                                  / run["reference"]["server_cpu_ms_per_post"])
            runs[key].append(run)
    rows = []
    for (w, c), repeats in runs.items():
        row = {"workload": w, "concurrency": c, "runs": repeats,
               "ratio": statistics.median(run["ratio"] for run in repeats),
               "ratio_reference": statistics.median(run["ratio_reference"] for run in repeats),
               "cpu_ratio_reference": statistics.median(run["cpu_ratio_reference"] for run in repeats),
               "guarded_ratio_reference": statistics.median(run["guarded_ratio_reference"] for run in repeats),
               "guarded_cpu_ratio_reference": statistics.median(run["guarded_cpu_ratio_reference"]
                                                                for run in repeats),
               "all_accepted": all(set(run[server]["statuses"]) == {"202"} for run in repeats
                                   for server in ("ours", "guarded", "reference"))}
        for server in SERVERS:
            row[server] = {key: statistics.median(run[server][key] for run in repeats)
                           for key in ("posts_per_s", "events_per_s", "bytes_per_post", "server_cpu_ms_per_post",
                                       "server_cpu_cores")}
        rows.append(row)
        if not row["all_accepted"]:
            print(f"warning: {w} x{c}: not every post was accepted: "
                  f"{[(run['ours']['statuses'], run['guarded']['statuses'], run['reference']['statuses']) for run in repeats]}",
                  flush=True)
    return rows, checked


def in_process(store_home: Path, grid: dict, spec: dict, data: dict, rng: np.random.Generator,
               batches: int = 200) -> dict:
    """Milliseconds per call of the Monitor itself (no HTTP), one call at a time, on a copy
    of the store: what the server's worker thread spends per post (SQLite commit included)."""
    from registry import Store
    from registry.monitoring import Monitor

    monitor = Monitor(Store(store_home))
    start = CLOCK.run()  # a window of its own, away from the drift runs
    out = {}
    for workload in WORKLOADS:
        bodies = [json.loads(t % {"c": f"inproc-{i}", "b": f"{i:016x}"})
                  for i, t in enumerate(templates(workload, grid, spec, data, rng, batches))]
        call = monitor.ingest_feedback if workload == "feedback" else monitor.ingest_telemetry
        call(MODEL, bodies[0], now=start)  # warm: the profile is read once
        cpu, wall = time.process_time(), time.perf_counter()
        for body in bodies[1:]:
            call(MODEL, body, now=start)
        n = len(bodies) - 1
        out[workload] = {"wall_ms": (time.perf_counter() - wall) / n * 1e3,
                         "cpu_ms": (time.process_time() - cpu) / n * 1e3}
        print(f"in-process {workload:17s} {out[workload]['wall_ms']:.2f} ms/call wall, "
              f"{out[workload]['cpu_ms']:.2f} ms CPU", flush=True)
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the digits CNN")
    parser.add_argument("--seconds", type=float, default=8.0, help="time box per (workload, connections, server, repeat)")
    parser.add_argument("--repeats", type=int, default=3, help="bare/ours alternations")
    parser.add_argument("--concurrency", default="8,64", help="keep-alive connections, a comma-separated list")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="a comma-separated subset of "
                        + ", ".join(WORKLOADS) + " (empty: skip ingestion)")
    parser.add_argument("--draws", type=int, default=20, help="random draws per shift (drift detection)")
    parser.add_argument("--false-runs", type=int, default=100, help="runs per N for the false-alarm rate")
    parser.add_argument("--max-predictions", type=int, default=2000, help="a draw stops after this many predictions")
    parser.add_argument("--prior-class", type=int, default=7, help="the over-represented digit of the class-prior shift")
    parser.add_argument("--prior-share", type=float, default=1 / 3, help="its share of the predictions")
    parser.add_argument("--low-min", type=int, default=50, help="also measure drift with min_predictions set to this"
                        " (0: skip)")
    parser.add_argument("--low-false-runs", type=int, default=20, help="false-alarm runs per N with --low-min")
    parser.add_argument("--reference", default="daf1709", help="the commit whose `pollinate serve` ingestion is the"
                        " same-run reference (default: before issue 19's checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-ingestion", action="store_true", help="rerun only the ingestion numbers (and"
                        " the in-process ones) into the existing monitor.json/.md, keeping the other sections")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    if args.only_ingestion:
        return rerun_ingestion(args, rng)

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_before": os.getloadavg()[0]}, "args": vars(args)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pollinate-monitor-bench-") as scratch:
        scratch = Path(scratch)
        data, trained = train(scratch, args.epochs)
        result["model"] = trained
        print(f"trained {MODEL} v{trained['version']} in {trained['train_seconds']:.1f} s: {trained['metrics']}",
              flush=True)
        shutil.copytree(scratch / "store", scratch / "drift-store")

        from registry import Store
        from registry.monitoring import Monitor

        store = Store(scratch / "store")
        grid = Monitor(store).grid(MODEL, trained["version"])
        spec = store.get_version(MODEL, trained["version"]).input_spec
        result["latency_ms"] = {"median": float(np.median(data["latency_ms"])),
                                "p95": float(np.percentile(data["latency_ms"], 95))}

        result["bytes"] = bytes_per_thousand(grid, spec, data, rng)
        for key, row in result["bytes"]["rows"].items():
            print(f"bytes per 1,000 predictions, {key}: {row['bytes']:,} ({row['share_of_raw']:.1%} of raw)",
                  flush=True)
        result["drift"] = drift_power(scratch / "drift-store", data, args, rng)
        if args.low_min:
            print(f"drift with min_predictions = {args.low_min}:", flush=True)
            result["drift_low_min"] = drift_power(scratch / "drift-store", data, args, rng, args.low_min,
                                                  args.low_false_runs)
        result["in_process_ms"] = in_process(scratch / "drift-store", grid, spec, data, rng)
        result["ingestion"], result["reference"] = (
            ingestion(scratch, grid, spec, data, args, rng) if args.workloads else ([], None))
    result["machine"]["load_after"] = os.getloadavg()[0]
    result["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitor.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "monitor.md")
    print(f"wrote {RESULTS / 'monitor.md'} ({result['seconds']:.0f} s)")


def rerun_ingestion(args, rng: np.random.Generator) -> None:
    """The ingestion section alone (a fresh model and store), into the committed results."""
    result = json.loads((RESULTS / "monitor.json").read_text())
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()[0]}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pollinate-monitor-bench-") as scratch:
        scratch = Path(scratch)
        data, trained = train(scratch, args.epochs)
        shutil.copytree(scratch / "store", scratch / "inproc-store")
        from registry import Store
        from registry.monitoring import Monitor

        store = Store(scratch / "store")
        grid = Monitor(store).grid(MODEL, trained["version"])
        spec = store.get_version(MODEL, trained["version"]).input_spec
        result["in_process_ms"] = in_process(scratch / "inproc-store", grid, spec, data, rng)
        result["ingestion"], result["reference"] = (
            ingestion(scratch, grid, spec, data, args, rng) if args.workloads else ([], None))
    machine["load_after"] = os.getloadavg()[0]
    result["ingestion_run"] = {"machine": machine, "args": vars(args), "seconds": time.perf_counter() - started,
                               "date": time.strftime("%Y-%m-%d", time.gmtime())}
    (RESULTS / "monitor.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, RESULTS / "monitor.md")
    print(f"wrote the ingestion section of {RESULTS / 'monitor.md'} ({result['ingestion_run']['seconds']:.0f} s)")


def write_markdown(result: dict, path: Path) -> None:
    machine, model, args = result["machine"], result["model"], result["args"]
    accuracy = model["metrics"].get("test_accuracy", model["metrics"].get("accuracy"))
    lines = [
        "# Field monitoring (benchmarks/monitor.py)",
        "",
        f"{machine['cpus']} CPUs, shared (load {machine['load_before']:.1f} before the run, "
        f"{machine['load_after']:.1f} after; {result['seconds'] / 60:.1f} min in all). The digits CNN "
        f"({model['parameters']:,} parameters) trained {model['epochs']} epochs with `training.central` "
        f"(test accuracy {accuracy if accuracy is None else f'{accuracy:.3f}'}), registered with its reference profile "
        f"({model['train_rows']} training digits); {model['heldout']} held-out digits (test + validation) "
        "and the CNN's real outputs on them feed every client below.",
        "",
    ]
    rows = result["ingestion"]
    run = result.get("ingestion_run")
    if run:  # the ingestion section was rerun alone (--only-ingestion)
        args = {**args, **run["args"]}
    if rows:
        lines += [
            "## Ingestion",
            "",
        ]
        if run:
            lines += [
                f"Rerun alone on {run['date']} with `--only-ingestion` (a freshly trained CNN and store; the other "
                f"sections below are from the run above): {run['machine']['cpus']} CPUs, shared (load "
                f"{run['machine']['load_before']:.1f} before, {run['machine']['load_after']:.1f} after; "
                f"{run['seconds'] / 60:.1f} min).",
                "",
            ]
        lines += [
            "`ours` = `pollinate serve`, one uvicorn worker: JSON, the per-address token bucket, validation "
            "against the version's grid and value range, the batch id (one row kept 7 days per batch), storing by "
            "the monitor's committer thread (the batches queued meanwhile checked and added up in one SQLite "
            "transaction, each post answered once it is committed; `recent` ids stored for 7 days), the alert and "
            "guardrail watcher. `guarded` = the same with a rollout under guardrails (v2, a copy of v1, staged for "
            "50 % of `stable` with the field_accuracy and error_rate guardrails): every post to v1 is also tallied "
            "under its sender, and as every post comes from a new address here, each one is a new tally row — the "
            "most a guardrail can cost. `reference` = the same command from the code of "
            + (f"`{ref['reference']}` ({ref['commit'][:12]}, before issue 19's checks; run from a `git archive` of it "
               "with that folder first on the path: it refused the new `batch_id` field with 422, ours took it) "
               if (ref := result.get("reference")) else "the reference commit ")
            + "on a store of its own with the same versions, rollout and guardrails (its guardrail reads the hour "
            "windows it writes anyway). `bare` = a FastAPI route on one uvicorn worker that reads the body and "
            "`json.loads` it. One asyncio client, keep-alive connections; every post comes from an address of its "
            "own (X-Forwarded-For from 127.0.0.1, a trusted proxy) with a client id of its own and, to ours, a "
            "time-ordered `batch_id` (as the clients make them), so the default rate limit (60 a minute) is in "
            "force but never reached. "
            f"Telemetry batches hold {BATCH} predictions (events); `+recent` adds the 100 prediction ids "
            "`pollinate.js` sends with every batch (for late labels). "
            f"{args['repeats']} rounds of the four servers in rotating order, {args['seconds']:g} s per row "
            "(medians; the ratios are the medians of each round's ratio). The machine is shared: the server's "
            "CPU time per post is the steadier measure of what the checks cost.",
            "",
            "| workload | bytes/post | connections | bare posts/s | reference posts/s | ours posts/s | ours events/s "
            "| **ours/reference** | CPU per post ours/reference | guarded posts/s | **guarded/reference** "
            "| CPU per post guarded/reference | ours CPU ms/post | reference CPU ms/post |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        nan = float("nan")
        for row in rows:
            bare, ours = row["bare"], row["ours"]
            reference = row.get("reference") or {"posts_per_s": nan, "server_cpu_ms_per_post": nan}
            guarded = row.get("guarded") or {"posts_per_s": nan}
            events = f"{ours['events_per_s']:,.0f}" if row["workload"].startswith("telemetry") else "-"
            lines.append(
                f"| {row['workload']} | {ours['bytes_per_post']:,.0f} | {row['concurrency']} "
                f"| {bare['posts_per_s']:,.0f} | {reference['posts_per_s']:,.0f} | {ours['posts_per_s']:,.0f} "
                f"| {events} | **{row.get('ratio_reference', nan):.2f}x** | {row.get('cpu_ratio_reference', nan):.2f}x "
                f"| {guarded['posts_per_s']:,.0f} | **{row.get('guarded_ratio_reference', nan):.2f}x** "
                f"| {row.get('guarded_cpu_ratio_reference', nan):.2f}x "
                f"| {ours['server_cpu_ms_per_post']:.3f} | {reference['server_cpu_ms_per_post']:.3f} |")
        inproc = result.get("in_process_ms") or {}
        if inproc:
            lines += ["", "The `Monitor` alone (no HTTP), one call at a time on a copy of the store, per post: "
                      + "; ".join(f"{w} {v['wall_ms']:.2f} ms wall ({v['cpu_ms']:.2f} ms CPU)"
                                  for w, v in inproc.items())
                      + ". One sender, so every call is a transaction of its own on the committer's "
                      "connection (WAL, synchronous=NORMAL: committed survives a killed process; no fsync per post)."]
        lines += ["", "Each round's ours/reference (guarded/reference): " + "; ".join(
            f"{row['workload']} x{row['concurrency']}: " + ", ".join(
                f"{run.get('ratio_reference', float('nan')):.2f} ({run.get('guarded_ratio_reference', float('nan')):.2f})"
                for run in row["runs"])
            for row in rows) + "."]
        refused = [row for row in rows if not row["all_accepted"]]
        if refused:
            lines += ["", "Not every post was accepted in: " + ", ".join(
                f"{row['workload']} x{row['concurrency']}" for row in refused) + " (see monitor.json)."]
        lines.append("")
    b = result["bytes"]
    lines += [
        "## Bytes per 1,000 predictions",
        "",
        f"Request bodies (compact JSON, as `JSON.stringify` writes them; a 28-character client id), median of "
        f"20 draws of held-out digits, against sending the raw inputs ({b['raw_float32_bytes']:,} bytes: "
        "1,000 × 64 float32). Headers not counted. With `recent`, a batch lists at most 100 prediction ids.",
        "",
        "| flush every | batches | recent ids | bytes | of raw inputs |",
        "|---:|---:|---|---:|---:|",
    ]
    for row in b["rows"].values():
        lines.append(f"| {row['flush_every']:,} | {row['batches']} | {'yes' if row['recent_ids'] else 'no'} "
                     f"| {row['bytes']:,} | {row['share_of_raw']:.1%} |")
    d = result["drift"]
    t = d["thresholds"]
    lines += [
        "",
        "## Drift detection power",
        "",
        f"Through the real `Monitor` on a real store: batches of {d['check_every']} predictions ingested, "
        f"`check_alerts` after each, default thresholds (PSI >= {t['psi']:g} or JS >= {t['js']:g} on any feature or "
        f"the predicted classes, at least {t['min_predictions']} predictions in the last {t['alert_hours']:g} h): "
        f"predictions until the first drift alert, over {d['draws']} random draws (with replacement) of "
        f"drawn-differently held-out digits; a draw stops at {d['max_predictions']:,}. Shifted: each digit moved "
        "1 or 2 px in a random direction (up, down, left, right); thick: 3×3 dilation; tiny: half size in the "
        "middle; class prior: one digit over-represented, the digits themselves unchanged.",
        "",
        "| shift | median predictions to alert | min - max | alerted | median largest PSI at 200 "
        "| features that fired first (draws) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, row in d["detection"].items():
        median = f"{row['median']:,.0f}" if row["median"] is not None else f"> {d['max_predictions']:,}"
        span = f"{row['min']:,} - {row['max']:,}" if row["min"] is not None else "-"
        subjects = ", ".join(f"{k} ({v})" for k, v in list(row["subjects"].items())[:4]) or "-"
        margin = f"{row['max_psi_at_200']:.2f}" if row["max_psi_at_200"] is not None else "-"
        lines.append(f"| {name} | {median} | {span} | {row['detected']}/{row['draws']} | {margin} | {subjects} |")
    lines += [
        "",
        "False alarms: runs of N unshifted held-out digits (bootstrapped), the same ingestion and checks; "
        "`any check` = an alert at one of the checks along the way (what the server would raise), "
        "`at the end` = the drift report over all N predictions alerts.",
        "",
        "| N | runs | alerted at any check | alerted at the end | largest PSI at the end (median, p90) "
        "| features that fired |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for n, row in d["false_alarms"].items():
        subjects = ", ".join(f"{k} ({v})" for k, v in list(row["subjects"].items())[:4]) or "-"
        psi = row["max_psi_at_end"]
        lines.append(f"| {int(n):,} | {row['runs']} | {row['alerted_any_check']:.0%} | {row['alerted_at_end']:.0%} "
                     f"| {psi['median']:.3f}, {psi['p90']:.3f} | {subjects} |")
    low = result.get("drift_low_min")
    if low:
        m = low["thresholds"]["min_predictions"]
        lines += [
            "",
            f"The 200-prediction minimum is what sets the numbers above. With `min_predictions` configured to {m} "
            f"(`Monitor.configure`, as `pollinate monitor configure` sets it; the rest as above), the same draws "
            "and runs:",
            "",
            "| shift | median predictions to alert | min - max | alerted |",
            "|---|---:|---:|---:|",
        ]
        for name, row in low["detection"].items():
            median = f"{row['median']:,.0f}" if row["median"] is not None else f"> {low['max_predictions']:,}"
            span = f"{row['min']:,} - {row['max']:,}" if row["min"] is not None else "-"
            lines.append(f"| {name} | {median} | {span} | {row['detected']}/{row['draws']} |")
        lines += ["", "| N unshifted | runs | alerted at any check | alerted at the end | features that fired |",
                  "|---:|---:|---:|---:|---|"]
        for n, row in low["false_alarms"].items():
            subjects = ", ".join(f"{k} ({v})" for k, v in list(row["subjects"].items())[:4]) or "-"
            lines.append(f"| {int(n):,} | {row['runs']} | {row['alerted_any_check']:.0%} | {row['alerted_at_end']:.0%} "
                         f"| {subjects} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train-child"]:
        train_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
