"""Request hygiene, attacked the way issue 19's attacker did, against a real `pollinate serve`
(uvicorn) on 127.0.0.1 — and, for the shipped config, a real nginx in front of it.

Every test here failed on the code before issue 19 (commit daf1709): deep JSON was a 500,
half-sent heads and stalled bodies were held open for ever, X-Forwarded-For was believed
from anyone on loopback and enrolment had no limit, ``?channel=typo`` served the newest
version, ``node_modules`` was served, ``/status`` mixed two federations' refusals, and the
admin routes answered CORS for any origin and sat in the public OpenAPI document.

The servers run with 1-second read timeouts so that the waits stay short; raw sockets play
the clients that httpx would never be (a head that never ends, a body that stalls).
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from server_helpers import stores
from server_helpers.live import LiveServer, wait_healthy

from registry import Store
from registry.edge import EdgeStore, weights_spec
from server.json_bounds import MAX_DEPTH, MAX_ITEMS, MAX_STRING
from server.protocol import MAX_HEAD_BYTES
from server.web_assets import default_web_client

TOKEN = "hygiene-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 1.0  # POLLINATE_HEADER_TIMEOUT and POLLINATE_BODY_TIMEOUT of these servers
MAX_UPLOADS = 3
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
CONFIG = {"epochs": 1, "batch_size": 8, "learning_rate": 0.01}


# --------------------------------------------------------------------------- helpers


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def connect(url: str, timeout: float = 6.0) -> socket.socket:
    sock = socket.create_connection(address(url), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it hangs up, and when it hung up (monotonic seconds);
    raises TimeoutError when it never does within the socket's timeout."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic()
        data += chunk


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def json_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def upload_head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def devices(home: Path) -> int:
    """Devices enrolled in the store (read with SQLite directly)."""
    with sqlite3.connect(Store(home).db_path) as db:
        return db.execute("SELECT COUNT(*) FROM edge_devices").fetchone()[0]


def promptly(url: str, path: str = "/v1/models") -> float:
    """An honest client's request: it must be answered, and quickly (seconds it took)."""
    started = time.monotonic()
    assert httpx.get(url + path, timeout=5).status_code == 200
    return time.monotonic() - started


def open_task(home: Path, model: str, federation: str, round: int = 1):
    """What an edge gateway does at the start of a round (a 15-value Dense layer)."""
    rng = np.random.default_rng(round)
    arrays = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    base = np.concatenate([a.reshape(-1) for a in arrays])
    return EdgeStore(Store(home)).open_task(
        model, federation=federation, round=round, gateway="gw-1", base_version=1, config=CONFIG,
        weights=weights_spec(arrays, ["dense/kernel", "dense/bias"]), base=base, deadline=time.time() + 3600,
        min_updates=2, norm_bound=float(np.linalg.norm(base)))


def update(client: httpx.Client, model: str, task_id: str, token: str, seed: int = 0) -> httpx.Response:
    body = (np.random.default_rng(seed).normal(size=15) * 0.01).astype("<f4").tobytes()
    return client.post(f"/v1/federations/{model}/tasks/{task_id}/updates", params={"examples": 10}, content=body,
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hygiene") / "store"
    stores.fill(home)
    stores.publish(Store(home), "edge", 9, files={"keras": {"model.keras": b"tiny edge model"}})
    return home


@pytest.fixture(scope="module")
def server(home) -> LiveServer:
    """Pollinate's defaults (its read timeouts included) but a high enrolment rate, and the web
    client that ships (in a checkout: the folder with node_modules beside the page)."""
    env = {"POLLINATE_ADMIN_TOKEN": TOKEN, "POLLINATE_ENROL_RATE": "1000", "POLLINATE_TRUSTED_PROXIES": None,
           "POLLINATE_OPENAPI_ADMIN": None}
    with LiveServer(home, log=home.parent / "server.log", env=env) as live:
        yield live


@pytest.fixture(scope="module")
def timed(home, server) -> LiveServer:
    """The same store behind a server with short read timeouts and a small upload cap, for the
    tests of those alone: a 1 s header timeout would also cut off an honest client that a loaded
    machine delays for a second between connecting and sending (its connection is closed unanswered)."""
    env = {"POLLINATE_ADMIN_TOKEN": TOKEN, "POLLINATE_HEADER_TIMEOUT": str(TIMEOUT_S),
           "POLLINATE_BODY_TIMEOUT": str(TIMEOUT_S), "POLLINATE_MAX_UPLOADS": str(MAX_UPLOADS),
           "POLLINATE_ENROL_RATE": "1000", "POLLINATE_TRUSTED_PROXIES": None, "POLLINATE_WEB_CLIENT": "off"}
    with LiveServer(home, log=home.parent / "timed.log", env=env) as live:
        yield live


@pytest.fixture(scope="module")
def limited(home, server) -> LiveServer:
    """The same store behind a server with Pollinate's proxy defaults (none trusted) and an
    enrolment rate of 5 a minute per address."""
    env = {"POLLINATE_ENROL_RATE": "5", "POLLINATE_WEB_CLIENT": "off", "POLLINATE_TRUSTED_PROXIES": None}
    with LiveServer(home, log=home.parent / "limited.log", env=env) as live:
        yield live


@pytest.fixture(scope="module")
def proxied(home, server) -> LiveServer:
    """The same store behind a server that believes 127.0.0.1 as a proxy (--trusted-proxy)."""
    env = {"POLLINATE_ADMIN_TOKEN": TOKEN, "POLLINATE_ENROL_RATE": "2", "POLLINATE_WEB_CLIENT": "off"}
    with LiveServer(home, "--trusted-proxy", "127.0.0.1", log=home.parent / "proxied.log", env=env) as live:
        yield live


# --------------------------------------------------------------------------- JSON bounds


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/models/digits/telemetry"),
    ("POST", "/v1/models/digits/feedback"),
    ("POST", "/v1/models/digits/predict"),
    ("POST", "/v1/federations/edge/devices"),
    ("PUT", "/v1/models/digits/channels/stable"),
])
def test_deeply_nested_json_is_422_before_any_route_parses_it(server, method, path):
    """The attack: telemetry nested 5,000 levels deep made json.loads raise RecursionError, a
    500. Every JSON route now gets a 422 naming the bound, and the server stays up."""
    for body in (b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"[" * 20000):
        answer = httpx.request(method, server.url + path, content=body, headers=ADMIN, timeout=10)
        assert answer.status_code == 422, (path, answer.status_code, answer.text[:200])
        assert answer.json()["reason"] == "json_bounds" and str(MAX_DEPTH) in answer.json()["detail"]
    promptly(server.url)


def test_too_long_arrays_and_strings_are_refused_and_ordinary_bodies_pass(server):
    """An enrolment's body is a small object: one with a 10,001-item array or a 9,000-byte
    string was accepted (201) and is refused now; the limits leave real bodies alone."""
    url = server.url + "/v1/federations/edge/devices"
    before = devices(server.home)
    wide = httpx.post(url, content=json.dumps({"kind": "phone", "pad": [0] * (MAX_ITEMS + 1)}))
    assert wide.status_code == 422 and "items" in wide.json()["detail"], wide.text
    long = httpx.post(url, content=json.dumps({"kind": "phone", "pad": "x" * (MAX_STRING + 1)}))
    assert long.status_code == 422 and "string" in long.json()["detail"], long.text
    assert devices(server.home) == before  # refused: nothing stored
    nested = {"kind": "phone", "pad": [[[[[[[[1]]]]]]]], "wide": [0] * MAX_ITEMS, "s": "[" * 100}
    assert httpx.post(url, content=json.dumps(nested)).status_code == 201
    assert devices(server.home) == before + 1


# --------------------------------------------------------------------------- read timeouts


def test_a_half_sent_head_is_closed_after_the_header_timeout(timed):
    """The attack: thousands of connections each send part of a request head and wait. Each
    is answered 408 and closed after the header timeout, while an honest client is served."""
    sock = connect(timed.url)
    sent = time.monotonic()
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    assert promptly(timed.url) < 0.5
    answer, closed = read_until_closed(sock)
    assert status_of(answer) == 408 and "head" in json_of(answer)["detail"]
    assert TIMEOUT_S * 0.8 <= closed - sent <= TIMEOUT_S + 2


def test_a_head_trickled_a_byte_at_a_time_is_closed_too(timed):
    """Slowloris: a byte every 0.2 s keeps the connection busy but the head never completes;
    the timeout runs from the head's first byte, not from the last one."""
    sock = connect(timed.url)
    head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40
    started = time.monotonic()
    closed_at = None
    for byte in head:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed_at = time.monotonic()
            break
        time.sleep(0.2)
        sock.settimeout(0.01)
        try:
            if sock.recv(65536) is not None:
                closed_at = time.monotonic()
                break
        except TimeoutError:
            pass
    assert closed_at is not None, "the trickled head was never cut off"
    assert closed_at - started <= TIMEOUT_S + 1.5


def test_a_connection_that_sends_nothing_is_closed(timed):
    sock = connect(timed.url)
    opened = time.monotonic()
    answer, closed = read_until_closed(sock)
    assert answer == b"" and closed - opened <= TIMEOUT_S + 2


@pytest.mark.parametrize("route", ["telemetry", "update"])
def test_a_stalled_body_is_closed_after_the_body_timeout(timed, home, route):
    """Headers, part of the body, then nothing: 408 after the body timeout (for the JSON
    routes, whose body the app buffers, and for a device update, which streams), nothing
    recorded, and the server keeps serving everyone else meanwhile."""
    if route == "telemetry":
        head = upload_head("/v1/models/digits/telemetry", 1000)
    else:
        task = open_task(home, "edge", "fed-stall")
        token = httpx.post(timed.url + "/v1/federations/edge/devices").json()["token"]
        head = upload_head(f"/v1/federations/edge/tasks/{task.task_id}/updates?examples=10", 60,
                           f"Authorization: Bearer {token}\r\n")
    sock = connect(timed.url)
    sock.sendall(head + b"{" * 10)
    sent = time.monotonic()
    assert promptly(timed.url) < 0.5
    answer, closed = read_until_closed(sock)
    assert status_of(answer) == 408 and "body" in json_of(answer)["detail"]
    assert TIMEOUT_S * 0.8 <= closed - sent <= TIMEOUT_S + 2
    if route == "update":
        assert EdgeStore(Store(home)).accepted(task.task_id) == 0


def test_uploads_past_the_cap_are_503_at_once_and_the_cap_frees_itself(timed):
    """The attack: 6,000 stalled uploads were all held open. With POLLINATE_MAX_UPLOADS=3, three
    stalled uploads fill the cap; the fourth is refused at once (503, Retry-After, JSON) while
    reads are served; once the body timeout closes the three, uploads are taken again."""
    stalled = []
    for _ in range(MAX_UPLOADS):
        sock = connect(timed.url)
        sock.sendall(upload_head("/v1/models/digits/feedback", 500) + b'{"version"')
        stalled.append(sock)
    time.sleep(0.2)  # the server has seen the three heads
    started = time.monotonic()
    refused = httpx.post(timed.url + "/v1/models/digits/feedback", json={"version": 1, "prediction": 1, "label": 1})
    assert time.monotonic() - started < 0.5
    assert refused.status_code == 503 and refused.headers["retry-after"].isdigit()
    assert refused.json()["reason"] == "busy" and str(MAX_UPLOADS) in refused.json()["detail"]
    assert promptly(timed.url, "/v1/models/digits/manifest") < 0.5
    for sock in stalled:
        answer, _ = read_until_closed(sock)
        assert status_of(answer) == 408
    time.sleep(0.2)
    again = httpx.post(timed.url + "/v1/models/digits/feedback", json={"version": 1, "prediction": 1, "label": 1})
    assert again.status_code != 503, again.text


def test_a_head_over_the_size_bound_is_431(timed):
    sock = connect(timed.url)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        for _ in range(MAX_HEAD_BYTES // 8000 + 2):
            sock.sendall(b"X-Pad: " + b"a" * 8000 + b"\r\n")
    except OSError:
        pass  # closed while we were still sending: what we want
    answer, _ = read_until_closed(sock)
    assert status_of(answer) == 431


def test_the_timeouts_hold_in_every_worker(home, tmp_path):
    """--workers 2: uvicorn imports the protocol by name in each worker process."""
    env = {"POLLINATE_HEADER_TIMEOUT": str(TIMEOUT_S), "POLLINATE_WEB_CLIENT": "off"}
    with LiveServer(home, "--workers", "2", log=tmp_path / "workers.log", env=env) as live:
        socks = [connect(live.url) for _ in range(4)]  # spread over both workers
        for sock in socks:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent = time.monotonic()
        for sock in socks:
            answer, closed = read_until_closed(sock)
            assert status_of(answer) == 408 and closed - sent <= TIMEOUT_S + 2


# --------------------------------------------------------------------------- who is asking


def test_enrolment_is_rate_limited_per_address_and_x_forwarded_for_is_not_believed(limited):
    """The attack: a direct caller set X-Forwarded-For and uvicorn believed it (its default
    trusts 127.0.0.1), and enrolment had no limit, so one source minted devices at will. Now
    the peer address decides: rotating X-Forwarded-For changes nothing, and the sixth
    enrolment in a minute is 429 with Retry-After, counted like every refusal."""
    url = limited.url + "/v1/federations/digits/devices"
    answers = [httpx.post(url, json={"kind": "phone"}, headers={"X-Forwarded-For": f"203.0.113.{i}"})
               for i in range(8)]
    assert [a.status_code for a in answers] == [201] * 5 + [429] * 3
    refused = answers[-1]
    assert refused.json()["reason"] == "rate_limited" and "enrolments" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    status = httpx.get(limited.url + "/v1/federations/digits/status").json()
    assert status["refused_unattributed"]["rate_limited"] == 3
    metrics = httpx.get(limited.url + "/metrics").text
    assert 'pollinate_edge_refusals_total{model="digits",reason="rate_limited"} 3.0' in metrics


def test_a_trusted_proxy_names_the_client_and_its_forgeries_do_not(proxied):
    """--trusted-proxy 127.0.0.1: X-Forwarded-For from this peer is believed, right-most first:
    each forwarded address has its own budget (2 a minute), and a client that writes its own
    X-Forwarded-For entry before the proxy's cannot step out of it. IPv6 counts by /64."""
    url = proxied.url + "/v1/federations/digits/devices"

    def enrol(forwarded: str) -> int:
        return httpx.post(url, headers={"X-Forwarded-For": forwarded}).status_code

    assert [enrol("198.51.100.1") for _ in range(3)] == [201, 201, 429]
    assert enrol("198.51.100.2") == 201  # another client behind the proxy
    assert enrol("192.0.2.99, 198.51.100.1") == 429  # a forged entry left of the proxy's
    assert [enrol("2001:db8:1:2::1"), enrol("2001:db8:1:2::ffff"), enrol("2001:db8:1:2:a::7")] == [201, 201, 429]


# --------------------------------------------------------------------------- what is served


def test_an_unknown_channel_is_404_not_the_newest_version(server, home):
    """The attack: ?channel=typo served the newest, unreviewed version. Only `stable` (the
    default) stands for the newest while unset; any other unset channel is 404, for the
    manifest and for predict alike, including one a rollback unset."""
    typo = httpx.get(server.url + "/v1/models/digits/manifest", params={"channel": "stabel"})
    assert typo.status_code == 404 and "no channel 'stabel'" in typo.json()["detail"]
    assert "stable" in typo.json()["detail"]  # it names the channels there are
    predicted = httpx.post(server.url + "/v1/models/digits/predict", params={"channel": "stabel"},
                           json={"inputs": [[[0.0]] * 8] * 8})
    assert predicted.status_code == 404
    assert httpx.get(server.url + "/v1/models/digits/manifest").json()["cohort"] == "channel"
    fresh = httpx.get(server.url + "/v1/models/eta/manifest").json()  # stable never set: the newest
    assert (fresh["cohort"], fresh["channel"]) == ("latest", "stable")
    Store(home).set_channel("eta", "canary", 1)
    assert httpx.get(server.url + "/v1/models/eta/manifest", params={"channel": "canary"}).status_code == 200
    Store(home).rollback("eta", "canary")
    assert httpx.get(server.url + "/v1/models/eta/manifest", params={"channel": "canary"}).status_code == 404


def test_only_the_shipped_web_assets_are_served(server):
    """The attack: in a checkout, /web_client/node_modules/@tensorflow/tfjs/package.json was
    served (and package.json, the tests, the tools, the package's __init__.py)."""
    folder = default_web_client()
    assert (folder / "index.html").is_file()
    never = ["node_modules/@tensorflow/tfjs/package.json", "package.json", "package-lock.json", "__init__.py",
             "vendor.mjs", "vendor.json/../package.json", "test/", "tools/fleet.mjs", "test-support/"]
    never += [str(p.relative_to(folder)) for p in sorted((folder / "test").glob("*.mjs"))[:2]]
    for path in never:
        answer = httpx.get(f"{server.url}/web_client/{path}")
        assert answer.status_code == 404, (path, answer.status_code)
    for path in ("", "index.html", "pollinate.js", "lib/protocol.js", "app/app.js", "vendor.json", "try/",
                 "vendor/tfjs/tf.fesm.min.js"):
        assert httpx.get(f"{server.url}/web_client/{path}").status_code == 200, path


def test_status_counts_the_current_federations_refusals_only(server, home):
    """The attack: /v1/federations/{model}/status mixed two federations' refusal counts. Two
    federations of one model, both in round 1: the second's status shows none of the first's
    refusals, in the round or in total; refusals that named no task are counted apart."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        tokens = [client.post("/v1/federations/edge/devices").json()["token"] for _ in range(2)]
        first = open_task(home, "edge", "fed-first")
        assert update(client, "edge", first.task_id, tokens[0]).status_code == 202
        assert update(client, "edge", first.task_id, tokens[0]).status_code == 409  # duplicate, in fed-first
        EdgeStore(Store(home)).close_task(first.task_id, {"updates": 1})
        assert update(client, "edge", first.task_id, tokens[1]).status_code == 409  # stale, in fed-first
        assert client.get("/v1/federations/edge/task", headers={"Authorization": "Bearer nope"}).status_code == 401
        time.sleep(0.01)
        second = open_task(home, "edge", "fed-second")
        now = client.get("/v1/federations/edge/status").json()
        assert (now["federation"], now["round"]) == ("fed-second", 1)
        assert now["refused"] == {} and now["refused_total"] == {}
        assert now["refused_unattributed"].get("unauthorized", 0) >= 1
        assert update(client, "edge", second.task_id, tokens[1]).status_code == 202
        assert update(client, "edge", second.task_id, tokens[1]).status_code == 409
        now = client.get("/v1/federations/edge/status").json()
        assert now["refused"] == {"duplicate": 1} and now["refused_total"] == {"duplicate": 1}


# --------------------------------------------------------------------------- CORS and OpenAPI


def test_admin_routes_answer_no_cors_to_any_origin(server):
    """The attack: admin routes answered CORS (preflight included) for any origin, so a page on
    any site could drive an admin's browser at them. Public and device routes still answer."""
    origin = {"Origin": "https://evil.example"}
    for path, method in (("/v1/models/digits/channels/stable", "PUT"),
                         ("/v1/models/digits/channels/stable/rollback", "POST")):
        preflight = httpx.options(server.url + path, headers={
            **origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert not [h for h in preflight.headers if h.lower().startswith("access-control-")], (path, preflight.headers)
        bare = httpx.options(server.url + path, headers=origin)
        assert "access-control-allow-origin" not in bare.headers
    moved = httpx.put(server.url + "/v1/models/rollout/channels/cors-check", json={"version": 1},
                      headers={**origin, **ADMIN})
    assert moved.status_code == 200 and "access-control-allow-origin" not in moved.headers
    for path, method in (("/v1/models/digits/manifest", "GET"), ("/v1/federations/digits/devices", "POST"),
                         ("/v1/models/digits/telemetry", "POST"), ("/v1/models/digits/predict", "POST")):
        preflight = httpx.options(server.url + path, headers={**origin, "Access-Control-Request-Method": method,
                                                              "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*", path
    assert httpx.get(server.url + "/v1/models", headers=origin).headers["access-control-allow-origin"] == "*"


def test_admin_routes_are_left_out_of_the_public_openapi_document(server, home, tmp_path):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert "/v1/models/{name}/channels/{channel}" not in paths
    assert "/v1/models/{name}/channels/{channel}/rollback" not in paths
    assert "/v1/models/{name}/manifest" in paths and "/v1/federations/{model}/devices" in paths
    env = {"POLLINATE_WEB_CLIENT": "off", "POLLINATE_OPENAPI_ADMIN": None}
    with LiveServer(home, "--openapi-admin", log=tmp_path / "admin.log", env=env) as live:
        listed = httpx.get(live.url + "/openapi.json").json()["paths"]
        assert "put" in listed["/v1/models/{name}/channels/{channel}"]
        assert "post" in listed["/v1/models/{name}/channels/{channel}/rollback"]


# --------------------------------------------------------------------------- the shipped nginx config


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup.sh --test installs it)")
def test_the_shipped_nginx_config_holds_the_same_line(home, tmp_path):
    """nginx rendered by --print-nginx-config in front of `pollinate serve --offload nginx`:
    a half-sent head and a stalled body are closed after the timeouts, uploads past the cap
    are 503 and an update over POLLINATE_MAX_UPDATE_BYTES is 413 (nginx's own answers, in the
    app's JSON shape), and X-Forwarded-For written by the client does not reach the app."""
    from server.config import ServerConfig
    from server.nginx import prepare_runtime, render_config

    limits = {"POLLINATE_HEADER_TIMEOUT": "1", "POLLINATE_BODY_TIMEOUT": "1", "POLLINATE_MAX_UPLOADS": "2",
              "POLLINATE_MAX_UPDATE_BYTES": "1024", "POLLINATE_ENROL_RATE": "3"}
    env = {**limits, "POLLINATE_WEB_CLIENT": "off", "POLLINATE_TRUSTED_PROXIES": None}
    with LiveServer(home, "--offload", "nginx", log=tmp_path / "app.log", env=env) as app:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        runtime = prepare_runtime(tmp_path / "nginx")
        conf = runtime / "nginx.conf"
        conf.write_text(render_config(home, address(app.url)[1], port, runtime_dir=runtime, daemon=False,
                                      single_process=True, config=ServerConfig.from_env(limits)))
        proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(runtime), "-e", str(runtime / "error.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, proc, 10, (runtime / "error.log").read_text)
            half = connect(base)
            half.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            stalled = [connect(base) for _ in range(2)]
            for sock in stalled:
                sock.sendall(upload_head("/v1/models/digits/feedback", 500) + b"{")
            sent = time.monotonic()
            time.sleep(0.2)
            busy = httpx.post(base + "/v1/models/digits/feedback", json={"version": 1, "prediction": 1, "label": 1})
            assert busy.status_code == 503 and busy.json()["reason"] == "busy"
            assert promptly(base) < 0.5
            for sock in (half, *stalled):
                _, closed = read_until_closed(sock)
                assert closed - sent <= 1 + 2.5
            big = httpx.post(base + "/v1/federations/edge/tasks/abc/updates", params={"examples": 1},
                             content=b"\0" * 2048, headers={"Content-Type": "application/octet-stream"})
            assert big.status_code == 413 and big.json()["reason"] == "too_large"
            codes = [httpx.post(base + "/v1/federations/edge/devices",
                                headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(5)]
            assert codes[:3] == [201] * 3 and codes[3:] == [429, 429], codes
        finally:
            proc.terminate()
            proc.wait(timeout=10)
