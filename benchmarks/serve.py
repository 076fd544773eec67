"""Distribution-service benchmark: our server against nginx, with wrk on loopback.

    .venv/bin/python benchmarks/serve.py [--duration 5] [--connections 32]

Builds a scratch store with one version (a ~40 KB TF.js ``model.json`` and a 4 MiB weight
shard), then measures four endpoints — the channel manifest, its 304 revalidation
(``If-None-Match``), ``model.json`` and the shard — on four setups, in one run:

- ``ours-1w`` / ``ours-2w``: ``pollinate serve --workers 1|2`` (uvicorn);
- ``nginx``: Debian's nginx serving the same bytes as static files at the same URLs
  (the reference; the manifest is a static copy of ours, revalidated with nginx's ETag);
- ``offload``: nginx in front of ``pollinate serve --workers 2 --offload nginx`` (our
  rendered config: the app answers every request, nginx sends file bytes).

wrk runs with one thread (``-t1``) and ``--connections`` connections for ``--duration``
seconds after a 1 s warm-up, on the same machine, so wrk takes CPU from the server:
numbers are comparable with each other, not with a dedicated load generator.
Writes benchmarks/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

MODEL = "bench"
SHARD_BYTES = 4 * 1024 * 1024
ENDPOINTS = ("manifest", "manifest_304", "model_json", "shard_4mib")
SETUPS = ("ours-1w", "ours-2w", "nginx", "offload")
TARGET_304_RPS = 5000
TARGET_OFFLOAD_RATIO = 0.8


# --------------------------------------------------------------------------- tools


def need(tool: str, package: str) -> str:
    """The tool's path; installed from Debian when missing and we are root, else a clear error."""
    found = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"==> installing {package} (apt-get)", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)
        found = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if not found:
        sys.exit(f"error: {tool} is required: apt-get install {package}")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- fixtures


def model_json_bytes(target: int = 40_000) -> bytes:
    """A TF.js layers-model topology of about ``target`` bytes (a small CNN's is ~40 KB)."""
    layers, i = [], 0
    while True:
        layers.append({"class_name": "Conv2D", "config": {
            "name": f"conv2d_{i}", "trainable": True, "dtype": "float32", "filters": 32, "kernel_size": [3, 3],
            "strides": [1, 1], "padding": "same", "activation": "relu", "use_bias": True,
            "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
            "bias_initializer": {"class_name": "Zeros", "config": {}}}, "inbound_nodes": [[[f"l{i}", 0, 0, {}]]]})
        i += 1
        body = json.dumps({
            "format": "layers-model", "generatedBy": "keras v3", "convertedBy": "TensorFlow.js Converter v4.22.0",
            "modelTopology": {"class_name": "Functional", "config": {"name": "cnn", "layers": layers}},
            "weightsManifest": [{"paths": ["group1-shard1of1.bin"],
                                 "weights": [{"name": f"conv2d_{j}/kernel", "shape": [3, 3, 32, 32], "dtype": "float32"}
                                             for j in range(i)]}],
        }).encode()
        if len(body) >= target:
            return body


def build_store(home: Path) -> dict:
    from registry import Lineage, Store

    store = Store(home)
    record = store.publish(
        MODEL,
        lineage=Lineage("central"),
        artifacts={"tfjs-layers": {"model.json": model_json_bytes(), "group1-shard1of1.bin": os.urandom(SHARD_BYTES)},
                   "tflite-int8": {"model.tflite": os.urandom(300_000)}},
        metrics={"accuracy": 0.97},
        input_spec={"shape": [8, 8, 1], "dtype": "float32", "preprocessing": {"kind": "scale", "divide_by": 16}},
        labels=[str(i) for i in range(10)],
    )
    store.set_channel(MODEL, "stable", record.version)
    files = {f.name: f for f in record.artifacts["tfjs-layers"]}
    return {"version": record.version, "model_json": files["model.json"], "shard": files["group1-shard1of1.bin"]}


def paths(version: int) -> dict[str, str]:
    files = f"/v1/models/{MODEL}/versions/{version}/files/tfjs-layers"
    return {
        "manifest": f"/v1/models/{MODEL}/manifest?client_id=bench-client",
        "model_json": f"{files}/model.json",
        "shard_4mib": f"{files}/group1-shard1of1.bin",
    }


# --------------------------------------------------------------------------- servers


def start_ours(home: Path, workers: int, *extra: str, log: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLLINATE_", "PROMETHEUS_"))}
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pollinate", "serve", "--home", str(home), "--port", "0", "--workers", str(workers),
             "--json", *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    url = json.loads(proc.stdout.readline())["url"]
    wait_http(f"{url}/healthz", proc)
    return proc, url


PLAIN_NGINX = """
daemon off;
worker_processes {workers};
pid {runtime}/nginx.pid;
error_log {runtime}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000;
    client_body_temp_path {runtime}/client_body;
    proxy_temp_path {runtime}/proxy;
    fastcgi_temp_path {runtime}/fastcgi;
    uwsgi_temp_path {runtime}/uwsgi;
    scgi_temp_path {runtime}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
        location = /v1/models/{model}/manifest {{
            default_type application/json;
            add_header Cache-Control no-cache;
        }}
        location /v1/models/ {{
            add_header Cache-Control "public, max-age=31536000, immutable";
        }}
    }}
}}
"""


def start_nginx(nginx: str, conf_text: str, runtime: Path, port: int) -> subprocess.Popen:
    from server.nginx import prepare_runtime

    prepare_runtime(runtime)
    conf = runtime / "nginx.conf"
    conf.write_text(conf_text)
    command = [nginx, "-c", str(conf), "-p", str(runtime), "-e", str(runtime / "error.log")]
    subprocess.run([*command, "-t", "-q"], check=True)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_port(port, proc)
    return proc


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not listen on {port}")
        time.sleep(0.05)


def plain_docroot(root: Path, home: Path, info: dict, manifest_body: bytes) -> None:
    """The same bytes at the same URL paths, for nginx to serve as static files."""
    p = paths(info["version"])
    for key, artifact in (("model_json", info["model_json"]), ("shard_4mib", info["shard"])):
        target = root / p[key].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(home / "objects" / artifact.sha256[:2] / artifact.sha256, target)
    manifest = root / p["manifest"].split("?")[0].lstrip("/")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_bytes(manifest_body)


# --------------------------------------------------------------------------- load


def etag_of(url: str) -> str:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["ETag"]


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
SIZES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def wrk(tool: str, url: str, headers: dict[str, str], duration: int, connections: int) -> dict:
    args = [tool, "-t1", f"-c{connections}", "--latency", "--timeout", "10s"]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    subprocess.run([*args[:3], "-d1s", *args[3:], url], capture_output=True, check=True)  # warm-up
    out = subprocess.run([*args, f"-d{duration}s", url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    latency = {p: float(v) * UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": latency.get("50"),
        "p99_ms": latency.get("99"),
        "mb_per_s": float(transfer.group(1)) * SIZES[transfer.group(2)] / 1e6 if transfer else None,
        "bad_responses": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1).strip() if socket_errors else None,
    }


def measure(tool: str, base: str, version: int, etag: str, duration: int, connections: int) -> dict:
    p = paths(version)
    identity = {"Accept-Encoding": "identity"}
    runs = {
        "manifest": (p["manifest"], identity),
        "manifest_304": (p["manifest"], {**identity, "If-None-Match": etag}),
        "model_json": (p["model_json"], identity),
        "shard_4mib": (p["shard_4mib"], identity),
    }
    results = {}
    for name, (path, headers) in runs.items():
        results[name] = wrk(tool, base + path, headers, duration, connections)
        print(f"    {name:<13} {results[name]['rps']:>10,.0f} req/s  p50 {results[name]['p50_ms']:.2f} ms"
              f"  p99 {results[name]['p99_ms']:.2f} ms", file=sys.stderr)
    return results


# --------------------------------------------------------------------------- report


def ratio(value: float | None, reference: float | None) -> float | None:
    return round(value / reference, 3) if value and reference else None


def write_report(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    r = report["results"]
    cfg = report["config"]
    lines = [
        "# Distribution-service benchmark",
        "",
        f"`benchmarks/serve.py`: wrk {report['wrk_version']} `-t1 -c{cfg['connections']} -d{cfg['duration_s']}s`"
        f" on loopback, {report['machine']['cpus']} CPUs ({report['machine']['cpu']}); wrk runs on the same"
        " machine and takes CPU from the server. Manifest = the channel manifest"
        f" (`?client_id=…`, {cfg['manifest_bytes']:,} bytes); 304 = its revalidation with `If-None-Match`;"
        f" model.json = {cfg['model_json_bytes']:,} bytes; shard = {cfg['shard_bytes'] // 2**20} MiB. No gzip"
        " (`Accept-Encoding: identity`).",
        "",
        "Setups: **ours-1w/2w** `pollinate serve --workers 1|2`; **nginx** Debian's nginx"
        f" {report['nginx_version']} ({cfg['nginx_workers']} workers) serving the same bytes as static files (the"
        " reference); **offload** that nginx in front of `pollinate serve --workers 2 --offload nginx`"
        " (`server/nginx/pollinate.conf`: the app answers, nginx sends file bytes).",
        "",
        "| endpoint | setup | req/s | p50 ms | p99 ms | MB/s | vs nginx |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for endpoint in ENDPOINTS:
        for setup in SETUPS:
            m = r[setup][endpoint]
            mbs = f"{m['mb_per_s']:,.0f}" if m["mb_per_s"] is not None else "—"
            vs = ratio(m["rps"], r["nginx"][endpoint]["rps"])
            shown = f"{vs:.2f}×" if vs is not None else "—"
            lines.append(f"| {endpoint} | {setup} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {mbs} |"
                         f" {shown} |")
    t = report["targets"]
    lines += [
        "",
        "Targets (2 CPUs):",
        f"- 304 revalidation ≥ {TARGET_304_RPS:,} req/s: ours-1w {t['revalidation_304_rps']['ours-1w']:,.0f},"
        f" ours-2w {t['revalidation_304_rps']['ours-2w']:,.0f}"
        f" → {'met' if t['revalidation_304_rps']['met'] else 'NOT met'}.",
        f"- shard throughput with offload ≥ {TARGET_OFFLOAD_RATIO}× plain nginx:"
        f" {t['offload_shard_vs_nginx']['ratio']:.2f}× → {'met' if t['offload_shard_vs_nginx']['met'] else 'NOT met'}.",
        "",
        "Bad responses (non-2xx/3xx) in every run: "
        + ("none." if not any(r[s][e]["bad_responses"] for s in SETUPS for e in ENDPOINTS) else "SOME — see serve.json."),
        "",
    ]
    (RESULTS / "serve.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (after a 1 s warm-up)")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    wrk_tool = need("wrk", "wrk")
    nginx = need("nginx", "nginx")
    from server.nginx import render_config

    nginx_workers = os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="pollinate-serve-bench-"))
    os.chmod(scratch, 0o755)  # nginx workers (not root) read the files
    running: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    try:
        home = scratch / "store"
        info = build_store(home)
        version = info["version"]

        for workers in (1, 2):
            setup = f"ours-{workers}w"
            print(f"==> {setup}", file=sys.stderr)
            proc, url = start_ours(home, workers, log=scratch / f"{setup}.log")
            running.append(proc)
            etag = etag_of(url + paths(version)["manifest"])
            if workers == 1:
                with urllib.request.urlopen(urllib.request.Request(
                        url + paths(version)["manifest"], headers={"Accept-Encoding": "identity"})) as response:
                    manifest_body = response.read()
            results[setup] = measure(wrk_tool, url, version, etag, args.duration, args.connections)
            stop(proc)

        print("==> nginx (static files)", file=sys.stderr)
        docroot = scratch / "docroot"
        plain_docroot(docroot, home, info, manifest_body)
        port = free_port()
        proc = start_nginx(nginx, PLAIN_NGINX.format(workers=nginx_workers, runtime=scratch / "nginx-plain",
                                                     port=port, docroot=docroot, model=MODEL),
                           scratch / "nginx-plain", port)
        running.append(proc)
        base = f"http://127.0.0.1:{port}"
        results["nginx"] = measure(wrk_tool, base, version, etag_of(base + paths(version)["manifest"]),
                                   args.duration, args.connections)
        stop(proc)

        print("==> offload (nginx in front of pollinate serve --offload nginx)", file=sys.stderr)
        app, app_url = start_ours(home, 2, "--offload", "nginx", log=scratch / "offload-app.log")
        running.append(app)
        port = free_port()
        runtime = scratch / "nginx-offload"
        conf = render_config(home, int(app_url.rsplit(":", 1)[1]), port, runtime_dir=runtime, daemon=False,
                             worker_processes=nginx_workers)
        proc = start_nginx(nginx, conf, runtime, port)
        running.append(proc)
        base = f"http://127.0.0.1:{port}"
        results["offload"] = measure(wrk_tool, base, version, etag_of(base + paths(version)["manifest"]),
                                     args.duration, args.connections)
    finally:
        for proc in running:
            stop(proc)
        shutil.rmtree(scratch, ignore_errors=True)

    revalidation = {s: results[s]["manifest_304"]["rps"] for s in ("ours-1w", "ours-2w")}
    offload_ratio = ratio(results["offload"]["shard_4mib"]["mb_per_s"], results["nginx"]["shard_4mib"]["mb_per_s"])
    report = {
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "wrk_version": _version([wrk_tool, "-v"]),
        "nginx_version": _version([nginx, "-v"]),
        "config": {"duration_s": args.duration, "connections": args.connections, "wrk_threads": 1,
                   "nginx_workers": nginx_workers, "manifest_bytes": len(manifest_body),
                   "model_json_bytes": info["model_json"].size, "shard_bytes": info["shard"].size,
                   "offload_app_workers": 2},
        "results": results,
        "ratios_vs_nginx": {s: {e: ratio(results[s][e]["rps"], results["nginx"][e]["rps"]) for e in ENDPOINTS}
                            for s in SETUPS},
        "targets": {
            "revalidation_304_rps": {**revalidation, "target": TARGET_304_RPS,
                                     "met": max(revalidation.values()) >= TARGET_304_RPS},
            "offload_shard_vs_nginx": {"ratio": offload_ratio, "target": TARGET_OFFLOAD_RATIO,
                                       "met": bool(offload_ratio and offload_ratio >= TARGET_OFFLOAD_RATIO)},
        },
    }
    write_report(report)
    print((RESULTS / "serve.md").read_text())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(command: list[str]) -> str:
    out = subprocess.run(command, capture_output=True, text=True)
    match = re.search(r"(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


if __name__ == "__main__":
    main()
