"""Browser benchmark: the demo page in headless Chromium, per TF.js backend.

    .venv/bin/python benchmarks/browser.py [--home STORE] [--runs 5] [--repeats 200]

Serves a store with `pollinate serve` (without --home: a fresh one with the digits CNN
trained for 3 epochs by `pollinate train`) and opens /web_client/ in Debian's chromium
(headless, --disable-gpu) through Playwright, once per backend the browser can run
(webgl, wasm, cpu; one that fails to initialise is reported as unavailable, with why):

- first load (cold): a fresh profile (empty HTTP cache, IndexedDB and service worker); time
  from navigation start until the model is ready to predict (page, TF.js, backend start-up,
  manifest, files, sha256, model build + one warm-up predict), and the library's share of it
  (`client.load()`: manifest → files → model);
- second load (cached): a reload of the same profile once the service worker is installed:
  scripts and TF.js come from the service worker, the model from IndexedDB, the manifest is
  revalidated (304); only the HTML page and that 304 cross the network;
- single-prediction latency: `client.predict()` on the ten sample test digits, `repeats`
  times after a warm-up, inside the page (values read back, so the timing is honest); median
  and p90 of the library's `inferenceMs` (tensor in → probabilities out) and of the whole
  call (input checks, preprocessing, ranking).

Each load figure is the median of `runs` fresh profiles. Writes benchmarks/results/browser.json
and browser.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
BACKENDS = ("webgl", "wasm", "cpu")

from tests.web_helpers.browser import CHROMIUM, chromium_context, missing_requirements  # noqa: E402


def env() -> dict[str, str]:
    out = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for key in ("POLLINATE_HOME", "POLLINATE_ADMIN_TOKEN", "POLLINATE_SERVER", "POLLINATE_WEB_CLIENT"):
        out.pop(key, None)
    return out


def prepare_store(home: Path) -> None:
    print(f"== training digits (3 epochs) into {home}", flush=True)
    subprocess.run([sys.executable, "-m", "pollinate", "train", "--dataset", "digits", "--epochs", "3",
                    "--home", str(home), "--json"], cwd=ROOT, env=env(), check=True, stdout=subprocess.DEVNULL)


class Server:
    """`pollinate serve --port 0 --json` in a subprocess."""

    def __init__(self, home: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "pollinate", "serve", "--home", str(home), "--port", "0",
                                      "--json"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.url = json.loads(self.proc.stdout.readline())["url"]
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("pollinate serve did not come up")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


LOAD_FACTS = """() => {
    const c = window.pollinate.client, l = c.lastLoad;
    const resources = performance.getEntriesByType('resource');
    return {
        ready_ms: window.pollinate.timings.readyMs,
        library_load_ms: l.ms,
        manifest_status: l.manifestStatus,
        model_source: l.source,
        model_bytes_downloaded: l.bytesDownloaded,
        verify_ms: l.verifyMs,
        network_bytes: resources.reduce((n, r) => n + (r.transferSize || 0), 0)
            + (performance.getEntriesByType('navigation')[0]?.transferSize || 0),
        backend: c.backend,
    };
}"""

LATENCY = """async ({repeats}) => {
    const c = window.pollinate.client;
    const samples = (await (await fetch('app/samples.json')).json()).samples;
    for (let i = 0; i < 20; i++) await c.predict(samples[i % samples.length].pixels);
    const inference = [], call = [];
    for (let i = 0; i < repeats; i++) {
        const t0 = performance.now();
        const r = await c.predict(samples[i % samples.length].pixels);
        call.push(performance.now() - t0);
        inference.push(r.inferenceMs);
    }
    return {inference, call};
}"""

WEBGL_INFO = """() => {
    const gl = document.createElement('canvas').getContext('webgl2') || document.createElement('canvas').getContext('webgl');
    if (!gl) return null;
    const ext = gl.getExtension('WEBGL_debug_renderer_info');
    return ext ? gl.getParameter(ext.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
}"""


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))])


def measure_backend(url: str, backend: str, runs: int, repeats: int) -> dict:
    cold, warm, latency = [], [], None
    for run in range(runs):
        with tempfile.TemporaryDirectory() as profile, chromium_context(Path(profile)) as (context, messages):
            page = context.new_page()
            page.goto(f"{url}/web_client/?poll=0&backend={backend}")
            page.wait_for_function("window.pollinate !== undefined")
            try:
                page.evaluate("window.pollinate.ready")
            except Exception as error:  # the backend cannot start here
                reason = page.evaluate("window.pollinate.client.skippedBackends.map(s => s.reason).join('; ')")
                return {"backend": backend, "available": False, "reason": reason or str(error).splitlines()[0]}
            cold.append(page.evaluate(LOAD_FACTS))
            page.evaluate("window.pollinate.offlineReady")
            page.reload()
            page.wait_for_function("window.pollinate !== undefined")
            page.evaluate("window.pollinate.ready")
            warm.append(page.evaluate(LOAD_FACTS))
            if run == 0:
                latency = page.evaluate(LATENCY, {"repeats": repeats})
            errors = [m for m in messages if m.startswith("pageerror")]
            if errors:
                raise RuntimeError(f"page errors with {backend}: {errors}")
    assert all(w["manifest_status"] == 304 and w["model_source"] == "cache" for w in warm), warm

    def summary(rows: list[dict]) -> dict:
        return {
            "ready_ms": median([r["ready_ms"] for r in rows]),
            "library_load_ms": median([r["library_load_ms"] for r in rows]),
            "verify_ms": median([r["verify_ms"] for r in rows]),
            "network_bytes": int(median([r["network_bytes"] for r in rows])),
            "model_bytes_downloaded": int(median([r["model_bytes_downloaded"] for r in rows])),
            "manifest_status": rows[0]["manifest_status"],
            "model_source": rows[0]["model_source"],
        }

    return {
        "backend": backend, "available": True, "runs": runs,
        "first_load": summary(cold), "second_load": summary(warm),
        "first_load_runs_ms": [round(r["ready_ms"], 1) for r in cold],
        "second_load_runs_ms": [round(r["ready_ms"], 1) for r in warm],
        "predict": {
            "repeats": repeats,
            "inference_median_ms": median(latency["inference"]), "inference_p90_ms": p90(latency["inference"]),
            "call_median_ms": median(latency["call"]), "call_p90_ms": p90(latency["call"]),
        },
    }


def environment(url: str) -> dict:
    with tempfile.TemporaryDirectory() as profile, chromium_context(Path(profile)) as (context, _):
        page = context.new_page()
        page.goto(f"{url}/web_client/?poll=0&sw=0")
        page.wait_for_function("window.pollinate !== undefined")
        page.evaluate("window.pollinate.ready")
        facts = {
            "user_agent": page.evaluate("navigator.userAgent"),
            "webgl_renderer": page.evaluate(WEBGL_INFO),
            "default_backend": page.evaluate("window.pollinate.client.backend"),
            "model": page.evaluate("(({name, version, metrics}) => ({name, version, accuracy: metrics.accuracy}))(window.pollinate.client.info)"),
        }
    package = json.loads((ROOT / "web_client/node_modules/@tensorflow/tfjs/package.json").read_text())
    dist = ROOT / "web_client/node_modules/@tensorflow"
    facts.update({
        "chromium": subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip(),
        "chromium_flags": "--headless --no-sandbox --disable-gpu (see tests/web_helpers/browser.py)",
        "tfjs": package["version"],
        "tfjs_bundle_bytes": (dist / "tfjs/dist/tf.fesm.min.js").stat().st_size,
        "tfjs_wasm_binary_bytes": (dist / "tfjs-backend-wasm/dist/tfjs-backend-wasm-simd.wasm").stat().st_size,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    })
    return facts


def markdown(report: dict) -> str:
    env_ = report["environment"]
    model_bytes = next((r["first_load"]["model_bytes_downloaded"] for r in report["backends"] if r["available"]), 0)
    lines = [
        "# Browser benchmark",
        "",
        f"`benchmarks/browser.py`: the demo page (`/web_client/`) served by `pollinate serve` on loopback, in "
        f"{env_['chromium']} headless (`--disable-gpu`), {env_['cpus']} CPUs; TF.js {env_['tfjs']}; model "
        f"{env_['model']['name']} v{env_['model']['version']} ({model_bytes:,} bytes of TF.js files). Load times are the median of "
        f"{report['runs']} fresh profiles, measured from navigation start to \"model ready to predict\" "
        "(includes TF.js start-up, backend initialisation, manifest, files, sha256 checks, model build and one warm-up "
        "predict). The second load is a reload once the service worker is installed: the HTML page comes from the "
        "network (the service worker is network-first for page files), scripts and TF.js from the service worker, "
        "the model from IndexedDB (sha256 re-checked), and the manifest is revalidated with `If-None-Match` (304). "
        "Prediction latency: "
        f"{report['repeats']} single-sample `client.predict()` calls on test digits after 20 warm-up calls.",
        "",
        f"WebGL here is `{env_['webgl_renderer']}` (a software rasteriser, no GPU): its row (webgl forced with "
        "`?backend=webgl`) says nothing about a real GPU. The library picks webgl → wasm → cpu but passes over a "
        f"software-rendered WebGL, so the page's default here is **{env_['default_backend']}**. "
        "`performance.now()` is coarsened to 0.1 ms in a page that is not cross-origin isolated, so sub-millisecond "
        "latencies are ±0.1 ms.",
        "",
        "| backend | first load (cold) ms | of which `client.load()` ms | bytes over the network | second load (cached) ms | of which `client.load()` ms | bytes over the network | manifest | predict median ms | p90 ms | whole call median ms |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in report["backends"]:
        if not row["available"]:
            lines.append(f"| {row['backend']} | unavailable: {row['reason']} | | | | | | | | | |")
            continue
        cold, warm, pred = row["first_load"], row["second_load"], row["predict"]
        lines.append(
            f"| {row['backend']} | {cold['ready_ms']:.0f} | {cold['library_load_ms']:.0f} | {cold['network_bytes']:,} | "
            f"{warm['ready_ms']:.0f} | {warm['library_load_ms']:.0f} | {warm['network_bytes']:,} | {warm['manifest_status']} | "
            f"{pred['inference_median_ms']:.2f} | {pred['inference_p90_ms']:.2f} | {pred['call_median_ms']:.2f} |"
        )
    lines += [
        "",
        "\"Bytes over the network\" is the sum of the page's resource `transferSize` (0 for what the service worker or "
        "the HTTP cache answered); the cold figure is mostly TF.js "
        f"({env_['tfjs_bundle_bytes']:,} bytes minified, plus {env_['tfjs_wasm_binary_bytes']:,} for the wasm binary). "
        "sha256 verification of the model files: "
        + ", ".join(f"{r['backend']} {r['first_load']['verify_ms']:.1f} ms cold / {r['second_load']['verify_ms']:.1f} ms cached"
                    for r in report["backends"] if r["available"]) + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, help="a store with a digits model (default: train one in a temp folder)")
    parser.add_argument("--runs", type=int, default=5, help="fresh profiles per backend (load times are their median)")
    parser.add_argument("--repeats", type=int, default=200, help="timed predictions per backend")
    args = parser.parse_args()
    missing = missing_requirements()
    if missing:
        sys.exit("error: " + "; ".join(missing) + " (bash scripts/setup.sh --test installs them)")

    with tempfile.TemporaryDirectory() as scratch:
        home = args.home
        if home is None:
            home = Path(scratch) / "store"
            prepare_store(home)
        server = Server(home)
        try:
            facts = environment(server.url)
            rows = []
            for backend in BACKENDS:
                print(f"== {backend}: {args.runs} cold + cached loads, {args.repeats} predictions", flush=True)
                rows.append(measure_backend(server.url, backend, args.runs, args.repeats))
                print("  ", json.dumps({k: rows[-1].get(k) for k in ("available", "first_load", "second_load", "predict", "reason")}), flush=True)
        finally:
            server.stop()

    report = {"runs": args.runs, "repeats": args.repeats, "environment": facts, "backends": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "browser.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "browser.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
