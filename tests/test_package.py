"""The package as a user gets it: a wheel, installed (not editable) into a fresh venv, run
from a folder with no checkout and no node_modules anywhere.

The wheel is built from a copy of this working tree (tracked and untracked-but-not-ignored
files, so nothing built in the checkout leaks in) with `pip wheel --no-deps`; setup.py's build
step runs `npm ci` from the lock files (npm's cache makes it quick; the registry otherwise) and
builds the page's TF.js files and the bundled TF.js runner into the wheel.

To stay quick the fresh venv gets the wheel with `--no-deps` and sees the project's
dependencies (TensorFlow, FastAPI, ...) through a `.pth` file naming this test run's
site-packages: the wheel's own packages come first on sys.path, and the checkout is not on it
(the editable install's import hook lives in a .pth file of that folder, which a .pth line does
not run). Everything Pollinate runs is then the installed copy: `pollinate train`,
`pollinate export` (TF.js verified in Node by the packaged runner, cpu and wasm),
`pollinate serve` and the demo page in Debian's headless chromium, predicting a test digit.
Then the clear errors: a wheel whose TF.js files or runner were removed, and no Node at all.
The last two tests check the same refusals on a web client folder directly, in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO
from tests.server_helpers.live import wait_healthy
from tests.web_helpers.browser import chromium_context, missing_browser

# a wheel build, a venv, a training run and a browser: about 45 s together
NEEDS_WHEEL = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None,
                       reason="building the wheel needs Node.js 20 with npm"),
]


def needs_wheel(test):
    for mark in NEEDS_WHEEL:
        test = mark(test)
    return test


VENDOR = ("tf.fesm.min.js", "tf-backend-wasm.fesm.min.js", "tfjs-backend-wasm.wasm", "tfjs-backend-wasm-simd.wasm")
MAX_WHEEL_BYTES = 8_000_000  # a few MB of JS and wasm, never a node_modules tree


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("POLLINATE_", "PYTHON", "NODE_", "npm_", "VIRTUAL_ENV"))}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "200", **extra}


def run(command: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env())


def copy_source(dest: Path) -> None:
    """The working tree as git sees it (no node_modules, no built folders, no .venv), plus
    hard-linked copies of the checkout's node_modules: setup.py runs `npm ci` only when they
    differ from the lock file, and npm ci replaces a folder rather than writing into its files,
    so the checkout's own node_modules are never touched."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not name.startswith("test-artifacts/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    for project in ("web_client", "export/node"):
        if (REPO / project / "node_modules").is_dir():
            try:
                shutil.copytree(REPO / project / "node_modules", dest / project / "node_modules", symlinks=True,
                                copy_function=os.link)
            except OSError:  # another file system: setup.py runs npm ci from npm's cache instead
                shutil.rmtree(dest / project / "node_modules", ignore_errors=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("package")
    timings = {}
    started = time.monotonic()
    copy_source(root / "src")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", root / "wheels",
                 root / "src"], cwd=root, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next((root / "wheels").glob("pollinate-*.whl"))
    timings["wheel"] = time.monotonic() - started

    started = time.monotonic()
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                "--disable-pip-version-check", wheel], cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    (site / "_pollinate_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    timings["install"] = time.monotonic() - started
    work = root / "work"  # the user's folder: no checkout, no node_modules up the tree
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "pollinate": venv / "bin" / "pollinate", "site": site,
            "work": work, "home": work / "store", "timings": timings}


def pollinate(installed: dict, *args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([installed["pollinate"], *args], cwd=installed["work"], env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained(installed) -> dict:
    """digits v1 trained by the installed package, exported to TF.js by `pollinate export`."""
    started = time.monotonic()
    home = installed["home"]
    result = pollinate(installed, "train", "--dataset", "digits", "--epochs", "2", "--seed", "0", "--no-export",
                       "--home", home, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    result = pollinate(installed, "export", "digits", "--version", "1", "--formats", "tfjs-layers", "--home", home, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    installed["timings"]["train+export"] = time.monotonic() - started
    return {"home": home, "report": json.loads(result.stdout)}


@needs_wheel
def test_the_wheel_carries_the_page_tfjs_and_the_runner_but_no_node_modules(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert not [n for n in names if "node_modules" in n]
    for name in ("web_client/index.html", "web_client/pollinate.js", "web_client/sw.js", "web_client/app/app.js",
                 "web_client/lib/telemetry.js", "web_client/lib/hybrid.js", "web_client/lib/tabular.js",
                 "web_client/dashboard/index.html", "web_client/dashboard/dashboard.js", "web_client/try/index.html",
                 "web_client/vendor.json", "web_client/vendor/tfjs/THIRD_PARTY_LICENSES.txt",
                 *(f"web_client/vendor/tfjs/{f}" for f in VENDOR),
                 "export/node/dist/run_tfjs.mjs", "export/node/dist/tfjs-backend-wasm.wasm",
                 "export/node/dist/tfjs-backend-wasm-simd.wasm", "export/node/dist/THIRD_PARTY_LICENSES.txt",
                 "server/nginx/pollinate.conf"):
        assert name in names, name
    assert not [n for n in names if n.startswith(("web_client/test", "tests/"))], "tests stay out of the wheel"
    assert installed["wheel"].stat().st_size < MAX_WHEEL_BYTES
    # the installed copy is what runs: not the checkout
    where = run([installed["python"], "-c", "import server, web_client, export; print(server.__file__, web_client.__file__, export.__file__)"],
                cwd=installed["work"])
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).is_relative_to(installed["site"]), where.stdout


@needs_wheel
def test_installed_export_verifies_tfjs_with_the_packaged_runner(trained):
    rows = {row["runtime"]: row for row in trained["report"]["formats"] if row["format"] == "tfjs-layers"}
    assert set(rows) == {"tfjs cpu", "tfjs wasm"}, trained["report"]["formats"]
    assert all(row["passed"] and row["max_abs_diff"] <= 1e-4 for row in rows.values()), rows


@pytest.fixture
def served(installed, trained, tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(installed["pollinate"]), "serve", "--home", str(trained["home"]), "--port", "0", "--json"],
                                cwd=installed["work"], env=clean_env(), stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, f"pollinate serve exited ({proc.wait(timeout=10)}):\n{log.read_text()}"
        url = json.loads(line)["url"]
        wait_healthy(url, proc, 30, log.read_text)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@needs_wheel
@pytest.mark.skipif(bool(missing_browser()), reason="; ".join(missing_browser()) or "ok")
def test_installed_serve_gives_a_page_that_loads_tfjs_and_predicts_in_chromium(installed, trained, served, tmp_path):
    from training.datasets.digits import load_digits

    started = time.monotonic()
    assert httpx.get(f"{served}/", follow_redirects=False).headers["location"] == "/web_client/"
    assert httpx.get(f"{served}/web_client/node_modules/@tensorflow/tfjs/package.json").status_code == 404
    for page_path in ("/dashboard", "/try/digits"):  # the monitoring and try-it pages ship in the wheel too
        answer = httpx.get(f"{served}{page_path}", follow_redirects=True)
        assert answer.status_code == 200 and "<html" in answer.text.lower(), (page_path, answer.status_code)
    data = load_digits()
    pixels = np.rint(data.x_test[0, ..., 0] * 16).astype(int).reshape(-1).tolist()
    with chromium_context(tmp_path / "profile") as (context, messages):
        page = context.new_page()
        fetched = []
        page.on("response", lambda r: fetched.append((r.url.removeprefix(served), r.status)))
        page.goto(f"{served}/web_client/?poll=0&sw=0")
        page.wait_for_function("window.pollinate !== undefined")
        info = page.evaluate("window.pollinate.ready")
        assert info["version"] == 1
        page.evaluate("values => window.pollinate.drawPixels(values)", pixels)
        page.get_by_test_id("predict-button").click()
        page.wait_for_function("window.pollinate.lastResult !== null")
        result = page.evaluate("() => ({label: window.pollinate.lastResult.label, probabilities: window.pollinate.lastResult.probabilities, backend: window.pollinate.lastResult.backend})")
        shown = page.get_by_test_id("prediction").text_content().strip()
        backend = page.get_by_test_id("backend").text_content().strip()
    assert shown == result["label"] and shown in [str(d) for d in range(10)], (shown, result)
    assert backend in ("webgl", "wasm", "cpu")
    assert abs(sum(result["probabilities"]) - 1) < 1e-4
    tfjs = [(u, s) for u, s in fetched if "/vendor/tfjs/" in u]
    assert ("/web_client/vendor/tfjs/tf.fesm.min.js", 200) in tfjs, fetched
    assert not [u for u, _ in fetched if "node_modules" in u]
    assert not [m for m in messages if m.startswith("pageerror")], messages
    installed["timings"]["page"] = time.monotonic() - started
    print("timings (s):", {k: round(v, 1) for k, v in installed["timings"].items()})


@needs_wheel
def test_a_page_without_its_tfjs_files_is_refused_at_start(installed, trained, tmp_path):
    vendor = installed["site"] / "web_client" / "vendor"
    hidden = tmp_path / "vendor"
    shutil.move(vendor, hidden)
    try:
        result = pollinate(installed, "serve", "--home", trained["home"], "--port", "0", timeout=60)
        assert result.returncode != 0
        error = result.stderr.strip().splitlines()[-1]
        assert "vendor/tfjs/tf.fesm.min.js" in error and "reinstall Pollinate" in error, result.stderr
        assert "Traceback" not in result.stderr
    finally:
        shutil.move(hidden, vendor)


@needs_wheel
def test_export_without_the_runner_or_without_node_fails_naming_the_fix(installed, trained, tmp_path):
    from registry import Store

    model = tmp_path / "model.keras"  # the stored Keras file, exported as a user's own file
    shutil.copy(Store(trained["home"]).artifact_path("digits", 1, "keras", "model.keras"), model)
    export = ["export", model, "--out", tmp_path / "out", "--formats", "tfjs-layers"]
    dist = installed["site"] / "export" / "node" / "dist"
    hidden = tmp_path / "dist"
    shutil.move(dist, hidden)
    try:
        result = pollinate(installed, *export, timeout=300)
        assert result.returncode != 0
        assert "TF.js runner is missing" in result.stderr and "reinstall Pollinate" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not (installed["site"] / "export" / "node" / "node_modules").exists(), "nothing was installed"
    finally:
        shutil.move(hidden, dist)
    no_node = tmp_path / "bin"
    no_node.mkdir()
    result = pollinate(installed, *export, env=clean_env(PATH=str(no_node)), timeout=300)
    assert result.returncode != 0
    assert "Node.js >= 18 is needed" in result.stderr and "install Node.js 20" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "export-report.json").exists()


# ---- the same checks on a web client folder, without building anything (fast) -------------------


@pytest.fixture
def page_copy(tmp_path) -> Path:
    """The checkout's web client without its vendored TF.js: what a broken install looks like."""
    from server.web_assets import default_web_client

    folder = tmp_path / "web_client"
    shutil.copytree(default_web_client(), folder, ignore=shutil.ignore_patterns("node_modules", "vendor", "test*"))
    return folder


def test_a_web_client_without_tfjs_is_refused_and_explained(page_copy, tmp_path):
    from fastapi.testclient import TestClient

    from core.errors import PollinateError
    from server.app import create_app
    from server.config import ServerConfig
    from server.web_assets import check_web_client, inspect_web_client

    status = inspect_web_client(page_copy)
    assert status.has_page and not status.whole
    assert status.missing[0] == "vendor/tfjs/tf.fesm.min.js", "the page's own import comes first"
    config = ServerConfig(home=tmp_path / "store", web_client=page_copy)
    with pytest.raises(PollinateError, match=r"cannot serve the demo page: .*missing vendor/tfjs/tf.fesm.min.js"):
        check_web_client(config)
    with TestClient(create_app(config)) as client:
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 503 and "vendor/tfjs/tf.fesm.min.js" in root.json()["detail"]
        for path in ("/web_client/", "/web_client/index.html"):
            page = client.get(path)
            assert page.status_code == 503 and "demo page is unavailable" in page.text, path
        assert client.get("/web_client/pollinate.js").status_code == 200  # the rest is still served
        assert client.get("/healthz").status_code == 200


def test_the_checkout_page_is_whole_and_folders_without_a_page_mean_api_only(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import ServerConfig
    from server.web_assets import check_web_client, default_web_client, inspect_web_client

    if not inspect_web_client(default_web_client()).whole:
        pytest.skip("web_client/vendor/tfjs is not built here (scripts/setup.sh)")
    check_web_client(ServerConfig(home=tmp_path / "s"))  # the default: whole, no error
    empty = tmp_path / "empty"
    empty.mkdir()
    for env in ({"POLLINATE_WEB_CLIENT": str(empty)}, {"POLLINATE_WEB_CLIENT": "off"}):
        config = ServerConfig.from_env({**env, "POLLINATE_HOME": str(tmp_path / "s")})
        check_web_client(config)  # API only: no error
        with TestClient(create_app(config)) as client:
            assert client.get("/").json()["docs"] == "/docs"
    assert ServerConfig.from_env({"POLLINATE_WEB_CLIENT": "off"}).to_env()["POLLINATE_WEB_CLIENT"] == "off"


def test_the_server_serves_exactly_what_the_wheel_ships_of_the_web_client():
    """One list of what ships: pyproject.toml's package-data for web_client is the server's
    allow-list (server/web_assets.SHIPPED), so a checkout serves what an installed Pollinate
    has, and every file the page loads (its import map, its vendored TF.js) is on it."""
    import tomllib

    from server.web_assets import SHIPPED, default_web_client, inspect_web_client, servable, vendored_files

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert list(SHIPPED) == package_data["web_client"]
    folder = default_web_client()
    needed = ["index.html", *vendored_files(folder)]
    status = inspect_web_client(folder)
    assert not status.missing or not status.has_page, status.problem()
    for path in needed + [p.relative_to(folder).as_posix() for p in (folder / "lib").glob("*.js")]:
        assert servable(path, own=True), path
    for path in ("package.json", "node_modules/x/package.json", "__init__.py", "test/a.test.mjs", "tools/fleet.mjs"):
        assert not servable(path, own=True), path


def flower_scripts(installed: dict) -> None:
    """Flower starts its helpers by name from the venv's bin/ (flower-superlink, flwr-simulation,
    flower-superexec, flwr-serverapp, ...). The fresh venv got flwr through the .pth line, not its
    scripts: write them, running the fresh venv's python, so every Flower process imports the
    installed wheel and never the checkout."""
    import importlib.metadata

    bin_dir = installed["venv"] / "bin"
    for entry in importlib.metadata.distribution("flwr").entry_points:
        if entry.group != "console_scripts" or (bin_dir / entry.name).exists():
            continue
        module, _, attr = entry.value.partition(":")
        script = bin_dir / entry.name
        script.write_text(f"#!{installed['python']}\nimport sys\nfrom {module} import {attr.split('.')[0]} as main\n"
                          f"sys.exit(main{''.join('.' + a for a in attr.split('.')[1:])}())\n")
        script.chmod(0o755)


@needs_wheel
def test_installed_package_federates_with_its_packaged_flower_app(installed, trained):
    """`flwr run` gets the app folder shipped in the wheel (federated/flower_app), and Flower's
    own processes import the installed ServerApp/ClientApp: a round is trained and published."""
    flower_scripts(installed)
    result = pollinate(installed, "federate", "simulate", "--dataset", "digits", "--from", "digits@1", "--clients", "2",
                       "--rounds", "1", "--partition", "iid", "--formats", "tflite-float32", "--home", trained["home"],
                       "--json", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["versions"], summary
    shown = pollinate(installed, "models", "show", "digits", "--version", str(summary["versions"][-1]), "--home",
                      trained["home"], "--json")
    record = json.loads(shown.stdout)
    assert record["lineage"]["source"] == "federated" and record["lineage"]["parent_version"] == 1
    assert "tflite-float32" in record["artifacts"]
