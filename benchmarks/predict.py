"""Server-side predict benchmark, in one run: our predict route against the usual way and the limit.

    .venv/bin/python benchmarks/predict.py [--duration 4] [--connections 16] [--rows 1000000]

Builds a scratch store with the digits CNN and the delivery-eta MLP, trained by
``training.central`` (a few epochs) and exported to ``tflite-float32``, then measures:

- **ours**: ``POST /v1/models/digits/predict`` on ``pollinate serve`` (1 worker): *single*
  (one example a request, every request different: cache misses), *batched* (32 examples a
  request, all different), *cache hit* (the same example again and again);
- **keras**: a plain FastAPI app (uvicorn, 1 worker) whose endpoint calls Keras
  ``model.predict`` on the same ``.keras`` file: the usual way to serve a Keras model;
- **litert**: LiteRT invoked in this process on the same ``.tflite`` file (set, invoke, get;
  no HTTP, no JSON): the limit;
- **pollinate predict** on 1,000,000 generated delivery-eta rows (.npy and .csv) against a
  bare LiteRT invoke loop over the same array (``export.batch_predict.bench``).

The load generator is this process: an asyncio HTTP/1.1 client on keep-alive connections
(``--connections`` at once, plus one connection for latency alone), every request's body
made distinct by a counter in its first number. It shares the machine's CPUs with the
server, so numbers compare with each other, not with a dedicated load generator. Each
setup runs ``--repeats`` times, interleaved with the others, and the best run counts (a
shared machine's noise only ever slows a run). The load average is recorded before and after.
Writes benchmarks/results/predict.json and predict.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

BATCH = 32
TARGET_VS_KERAS = 10.0
TARGET_BATCH_VS_BARE = 0.8
SCENARIOS = ("single", "batched", "cache_hit")
BATCH_NAMES = {  # the keys of export.batch_predict.bench's rows_per_second
    "bare": "bare LiteRT invoke loop on the encoded array (the limit)",
    "npy": "pollinate predict .npy → .npy, in process (`predict_file`)",
    "cli_npy": "pollinate predict .npy → .npy, the command (its own timing)",
    "cli_npy_wall": "pollinate predict .npy → .npy, the command (wall, Python's start included)",
    "csv": "pollinate predict .csv → .csv, in process (`predict_file`)",
    "cli_csv": "pollinate predict .csv → .csv, the command (its own timing)",
    "cli_csv_wall": "pollinate predict .csv → .csv, the command (wall, Python's start included)",
    "script_csv": "a one-off numpy script: whole CSV in memory, bare loop, text out (no checks)",
    "bare_script": "the bare loop as a one-off script in a fresh process: np.load, loop, np.save (its own timing)",
    "bare_script_wall": "the bare loop as a one-off script in a fresh process (wall, Python's start included)",
}
# Each way of running `pollinate predict` against the bare LiteRT loop doing the same job under the
# same conditions (the target's reference): in a warm process on the array in memory; as a command
# in a fresh process (both pay the cold first pass through LiteRT); reading and writing CSV text
# (a bare loop over a CSV has to parse it too). The other ratios are reported beside them.
LIKE_FOR_LIKE = {
    "npy_vs_bare": ".npy in process vs the bare loop in process",
    "cli_npy_vs_bare_script": ".npy as the command (own timing) vs the bare loop as a fresh-process script",
    "csv_vs_script": ".csv in process vs the bare loop over the same CSV (numpy's reader, text out)",
}


# --------------------------------------------------------------------------- processes


from serve import free_port, stop, wait_http  # noqa: E402  (benchmarks/serve.py: the same process helpers)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLLINATE_", "PROMETHEUS_"))}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", "POLLINATE_WEB_CLIENT": "off"}


def start_ours(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pollinate", "serve", "--home", str(home), "--port", "0", "--json"],
            cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    url = json.loads(proc.stdout.readline())["url"]
    wait_http(f"{url}/healthz", proc, timeout=120)
    return proc, url


def start_keras(model_path: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--keras-server", str(model_path), "--port", str(port)],
            cwd=ROOT, env=clean_env(), stdout=err, stderr=err, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc, timeout=120)
    return proc, url


def keras_server(model_path: Path, port: int) -> None:
    """The usual way: FastAPI, a JSON body, ``model.predict`` (a sync endpoint: FastAPI runs it
    in its thread pool)."""
    from core.tensorflow import import_tensorflow

    import_tensorflow()
    import keras
    import uvicorn
    from fastapi import Body, FastAPI

    model = keras.saving.load_model(model_path)
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: dict = Body(...)) -> dict:
        x = np.asarray(body["inputs"], dtype=np.float32)
        if x.ndim == len(model.input_shape) - 1:
            x = x[np.newaxis]
        return {"outputs": model.predict(x, verbose=0).tolist()}

    model.predict(np.zeros((1, *model.input_shape[1:]), dtype=np.float32), verbose=0)  # build the function
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- the store


def build_store(home: Path, say) -> dict:
    from export.pipeline import ExportOptions, export_for_publish
    from registry import Store
    from training.central import TrainSettings, train_and_register
    from training.datasets import load_dataset

    store = Store(home)
    hook = export_for_publish(ExportOptions(formats=("tflite-float32",)))
    say("training the digits CNN (3 epochs) and exporting tflite-float32")
    digits = train_and_register(store, load_dataset("digits"), TrainSettings(model="cnn", epochs=3), extra_artifacts=hook)
    say("training the delivery-eta MLP (3 epochs) and exporting tflite-float32")
    eta = train_and_register(store, load_dataset("delivery-eta"), TrainSettings(model="mlp", epochs=3),
                             extra_artifacts=hook)
    store.set_channel("digits", "stable", digits.record.version)
    store.set_channel("delivery-eta", "stable", eta.record.version)

    def path(record, fmt):
        (artifact,) = record.artifacts[fmt]
        return store.objects / artifact.sha256[:2] / artifact.sha256

    return {"keras": path(digits.record, "keras"), "tflite": path(digits.record, "tflite-float32"),
            "digits_version": digits.record.version, "eta_version": eta.record.version,
            "parameters": digits.parameters}


# --------------------------------------------------------------------------- load


def bodies(scenario: str, example: np.ndarray) -> callable:
    """A function of a counter giving a request body: distinct per request (cache misses),
    or always the same (cache hits)."""
    one = json.dumps(example.tolist(), separators=(",", ":"))
    if scenario == "cache_hit":
        fixed = ('{"inputs":' + one + "}").encode()
        return lambda i: fixed
    # the first two 0.0s carry the counter, six digits each (0.xxxxxx is distinct in float32 too)
    head, found, rest = one.partition("0.0")
    middle, found_too, tail = rest.partition("0.0")
    if not (found and found_too):
        raise ValueError("the example needs two 0.0s to carry the counter")
    if scenario == "single":
        before, after = '{"inputs":' + head + "0.", tail + "}"
    else:
        before, after = '{"inputs":[' + head + "0.", tail + "," + ",".join([one] * (BATCH - 1)) + "]}"
    before, middle, after = before.encode(), (middle + "0.").encode(), after.encode()
    return lambda i: before + b"%06d" % (i % 1_000_000) + middle + b"%06d" % (i // 1_000_000 % 1_000_000) + after


async def _connection(host: str, port: int, path: str, make, counter, stop_at: float, warm_until: float,
                      latencies: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n")
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            body = make(next(counter))
            began = time.perf_counter()
            writer.write((head % len(body)).encode() + body)
            headers = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", headers).group(1))
            await reader.readexactly(length)
            ended = time.perf_counter()
            if not headers.startswith(b"HTTP/1.1 200"):
                errors.append(headers.split(b"\r\n", 1)[0].decode())
            if began >= warm_until:
                latencies.append(ended - began)
    finally:
        writer.close()


def load(url: str, path: str, make, connections: int, duration: float, warmup: float = 1.0) -> dict:
    """Requests/s and latency percentiles of ``connections`` keep-alive clients for ``duration`` s."""
    import itertools

    host, port = url.removeprefix("http://").split(":")
    counter = itertools.count(int(time.time() * 1000) % 10**9 * 100)  # distinct across runs too
    latencies: list[float] = []
    errors: list[str] = []

    async def run() -> None:
        start = time.perf_counter()
        await asyncio.gather(*(
            _connection(host, int(port), path, make, counter, start + warmup + duration, start + warmup,
                        latencies, errors) for _ in range(connections)
        ))

    asyncio.run(run())
    ms = np.asarray(latencies) * 1000
    return {
        "connections": connections, "requests": len(latencies), "rps": len(latencies) / duration,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def litert_limit(tflite: Path, example: np.ndarray, batch: int, duration: float) -> dict:
    """Set, invoke, get on one interpreter in this process, as fast as it goes."""
    from ai_edge_litert.interpreter import Interpreter

    from core.tensorflow import quiet_stderr

    with quiet_stderr():
        interpreter = Interpreter(model_content=tflite.read_bytes(), num_threads=1)
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    x = np.ascontiguousarray(np.repeat(example[np.newaxis], batch, axis=0), dtype=np.float32)
    interpreter.resize_tensor_input(inp, list(x.shape))
    with quiet_stderr():
        interpreter.allocate_tensors()
    times = []
    stop_at = time.perf_counter() + duration
    while True:
        began = time.perf_counter()
        if began >= stop_at:
            break
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        interpreter.get_tensor(out)
        times.append(time.perf_counter() - began)
    ms = np.asarray(times) * 1000
    return {"connections": 0, "requests": len(times), "rps": len(times) / duration,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "errors": 0}


def metric_sum(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


# --------------------------------------------------------------------------- report


def fmt(value, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Server-side predict benchmark",
        "",
        f"`benchmarks/predict.py`, one run on {env['cpus']} CPUs ({env['processor']}), load average "
        f"{env['load_before'][0]:.1f} before and {env['load_after'][0]:.1f} after"
        + (" — **the machine was busier than its CPUs** (other work ran alongside), so absolute numbers are low;"
           " the ratios compare setups measured in the same minutes" if max(env['load_before'][0], env['load_after'][0]) > env['cpus'] else "")
        + ".",
        "",
        f"Model: the digits CNN ({result['model']['parameters']:,} parameters) trained by `training.central`, one "
        f"`.keras` file and its `tflite-float32` export. Load: an asyncio HTTP/1.1 client in the benchmark process "
        f"on keep-alive connections, {result['duration_s']} s a run after 1 s of warm-up, best of {result['repeats']} "
        f"interleaved runs; every single/batched request's body differs (its first number carries a counter). "
        f"Batched = {BATCH} examples a request.",
        "",
        "Setups: **ours** `POST /v1/models/digits/predict` on `pollinate serve` (1 worker; micro-batching window "
        "2 ms, LRU cache); **keras** a plain FastAPI endpoint (uvicorn, 1 worker) calling Keras `model.predict` "
        "(the usual way); **litert** set/invoke/get on one LiteRT interpreter in the benchmark process "
        "(no HTTP, no JSON: the limit).",
        "",
        "| scenario | setup | connections | req/s | examples/s | p50 ms | p99 ms | vs keras |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["http"]:
        per = BATCH if row["scenario"] == "batched" else 1
        lines.append(
            f"| {row['scenario']} | {row['setup']} | {row['connections'] or '–'} | {fmt(row['rps'])} | "
            f"{fmt(row['rps'] * per)} | {fmt(row['p50_ms'], 2)} | {fmt(row['p99_ms'], 2)} | "
            f"{fmt(row.get('vs_keras'), 1) + '×' if row.get('vs_keras') else '–'} |")
    batching = result.get("micro_batching") or {}
    if batching:
        lines += ["", f"Micro-batching while ours ran the {result['connections']}-connection single-example runs: "
                  f"{batching['requests_per_run']:.1f} requests per interpreter run on average "
                  f"({batching['runs']:,} runs for {batching['requests']:,} requests)."]
    lines += ["", "Targets:"]
    for name, check in result["targets"].items():
        lines.append(f"- {name}: {check}")
    batch = result.get("batch")
    if batch:
        rates = batch.get("rows_per_second") or {}
        bare = rates.get("bare")
        lines += [
            "",
            f"## `pollinate predict` on {batch.get('rows', 0):,} delivery-eta rows",
            "",
            "`export.batch_predict.bench` (the batch room's own benchmark, called in this run): the real command "
            "against the bare LiteRT invoke loop (resize once, set, invoke, get) on the same encoded array in one "
            f"process; batch {batch.get('batch_size')}, {batch.get('threads')} threads, best of {batch.get('repeats')}.",
            "",
            "Each way of running it is judged against the bare loop doing the same job under the same conditions "
            "(the targets below): in process against the loop in process; the command, a fresh process, against the "
            "loop as a fresh-process script (both pay LiteRT's cold first pass; the script's timing starts after its "
            "imports, the command's after its store lookup); a CSV against the loop over the same CSV (numpy's reader, "
            "text out), because a loop over a preloaded array skips the parsing and formatting that bound any CSV run. "
            "The column below is against the warm in-process loop for every row.",
            "",
            "| path | rows/s | vs bare loop |",
            "|---|---:|---:|",
        ]
        for kind, rate in rates.items():
            ratio = f"{rate / bare:.2f}×" if bare else "–"
            lines.append(f"| {BATCH_NAMES.get(kind, kind)} | {fmt(rate)} | {ratio} |")
        ratios = {k: v for k, v in batch.items() if "_vs_" in k and not k.startswith("max_") and isinstance(v, (int, float))}
        if ratios:
            lines += ["", "The batch room's ratios: " + ", ".join(f"`{k}` {v:.2f}" for k, v in ratios.items()) + "."]
        for key, value in batch.items():
            if key.startswith("max_abs_diff") and isinstance(value, (int, float)):
                lines += ["", f"`{key}`: {value:.1e}."]
    elif result.get("batch_error"):
        lines += ["", f"`pollinate predict` row: not measured ({result['batch_error']})."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1_000_000, help="delivery rows for pollinate predict (0: skip)")
    parser.add_argument("--markdown-only", action="store_true", help="re-render predict.md from predict.json")
    parser.add_argument("--keras-server", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.keras_server:
        keras_server(args.keras_server, args.port)
        return 0
    if args.markdown_only:
        (RESULTS / "predict.md").write_text(markdown(json.loads((RESULTS / "predict.json").read_text())))
        return 0

    def say(text: str) -> None:
        print(f"==> {text}", file=sys.stderr, flush=True)

    load_before = list(os.getloadavg())
    scratch = Path(tempfile.mkdtemp(prefix="pollinate-bench-predict-"))
    try:
        return measure(args, scratch, load_before, say)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


def measure(args: argparse.Namespace, scratch: Path, load_before: list[float], say) -> int:
    home = scratch / "store"
    built = build_store(home, say)
    from training.datasets import load_dataset

    example = load_dataset("digits").x_test[0].astype(np.float32)
    path = "/v1/models/digits/predict"
    ours, ours_url = start_ours(home, scratch / "ours.log")
    keras_file = scratch / "model.keras"  # Keras loads by extension; the store names files by sha256
    keras_file.write_bytes(built["keras"].read_bytes())
    keras, keras_url = start_keras(keras_file, scratch / "keras.log")
    servers = {"ours": (ours_url, path), "keras": (keras_url, "/predict")}
    runs: dict[tuple, list[dict]] = {}
    batching = {}
    try:
        for url, route in servers.values():  # warm: interpreters, tf.function, connections
            load(url, route, bodies("single", example), 1, 1.0, warmup=0.0)
        plan = [("single", 1), ("single", args.connections), ("batched", args.connections), ("cache_hit", args.connections)]
        for _ in range(args.repeats):
            for scenario, connections in plan:
                for setup, (url, route) in servers.items():
                    if setup == "keras" and scenario == "cache_hit":
                        continue
                    runs_before = metric_sum(ours_url, "pollinate_predict_runs_total") if setup == "ours" else 0
                    count_before = metric_sum(ours_url, "pollinate_predict_batch_requests_sum") if setup == "ours" else 0
                    row = load(url, route, bodies(scenario, example), connections, args.duration)
                    if setup == "ours" and scenario == "single" and connections > 1:
                        batching = {"runs": int(metric_sum(ours_url, "pollinate_predict_runs_total") - runs_before),
                                    "requests": int(metric_sum(ours_url, "pollinate_predict_batch_requests_sum")
                                                    - count_before)}
                    say(f"{setup:5} {scenario:9} c={connections:<3} {row['rps']:8,.0f} req/s  p50 {fmt(row['p50_ms'], 2)} ms"
                        f"  p99 {fmt(row['p99_ms'], 2)} ms  errors {row['errors']}")
                    runs.setdefault((scenario, setup, connections), []).append(row)
            for scenario, batch in (("single", 1), ("batched", BATCH)):
                row = litert_limit(built["tflite"], example, batch, args.duration)
                say(f"litert {scenario:9} {row['rps']:8,.0f} calls/s  p50 {row['p50_ms']:.3f} ms")
                runs.setdefault((scenario, "litert", 0), []).append(row)
    finally:
        stop(ours)
        stop(keras)
    if batching.get("runs"):
        batching["requests_per_run"] = batching["requests"] / batching["runs"]

    http = []
    for (scenario, setup, _connections), rows in runs.items():
        best = max(rows, key=lambda r: r["rps"])
        http.append({"scenario": scenario, "setup": setup, **best,
                     "errors": sum(r["errors"] for r in rows)})
    order = {s: i for i, s in enumerate(SCENARIOS)}
    setups = {"ours": 0, "keras": 1, "litert": 2}
    http.sort(key=lambda r: (order[r["scenario"]], r["connections"] == 0, r["connections"], setups[r["setup"]]))
    keras_rps = {(r["scenario"], r["connections"]): r["rps"] for r in http if r["setup"] == "keras"}
    for row in http:
        base = keras_rps.get(("single" if row["scenario"] == "cache_hit" else row["scenario"], row["connections"]))
        if row["setup"] == "ours" and base:
            row["vs_keras"] = row["rps"] / base
    targets = {}
    for scenario in ("single", "batched"):
        ratio = next((r["vs_keras"] for r in http if r["setup"] == "ours" and r["scenario"] == scenario
                      and r["connections"] == args.connections), None)
        if ratio is not None:
            verdict = "met" if ratio >= TARGET_VS_KERAS else "NOT met"
            targets[f"ours ≥ {TARGET_VS_KERAS:.0f}× keras req/s, {scenario}, {args.connections} connections"] = \
                f"{ratio:.1f}× → {verdict}"

    batch, batch_error = None, None
    if args.rows:
        try:
            from export.batch_predict import bench

            say(f"pollinate predict on {args.rows:,} delivery rows (and the bare loop)")
            batch = bench(home, args.rows, name="delivery-eta", repeats=args.repeats, folder=scratch,
                          say=lambda text: say(f"  {text}"))
            for key, what in LIKE_FOR_LIKE.items():
                ratio = batch.get(key)
                if isinstance(ratio, (int, float)):
                    verdict = "met" if ratio >= TARGET_BATCH_VS_BARE else "NOT met"
                    targets[f"pollinate predict {what} ≥ {TARGET_BATCH_VS_BARE}×"] = f"{ratio:.2f}× → {verdict}"
        except (ImportError, RuntimeError) as exc:
            batch_error = str(exc)
            say(f"pollinate predict not measured: {exc}")

    result = {
        "benchmark": "predict",
        "duration_s": args.duration,
        "connections": args.connections,
        "repeats": args.repeats,
        "model": {"name": "digits", "zoo": "cnn", "version": built["digits_version"], "parameters": built["parameters"]},
        "http": http,
        "micro_batching": batching,
        "batch": batch,
        "batch_error": batch_error,
        "targets": targets,
        "environment": {
            "cpus": os.cpu_count(),
            "processor": _processor(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": list(os.getloadavg()),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predict.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "predict.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
