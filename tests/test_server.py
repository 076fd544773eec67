"""The distribution service, tested against a real `pollinate serve` (uvicorn) on 127.0.0.1.

Every server here is a subprocess on a free port over a store filled with small real
files (tests/server_helpers/stores.py); nginx, when used, is Debian's, started by the test.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
from conftest import REPO
from server_helpers import stores
from server_helpers.live import LiveServer, wait_healthy

from registry import Store, cohort_bucket
from server.schemas import ManifestOut

TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
IDENTITY = {"Accept-Encoding": "identity"}
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("served") / "store"
    return {"home": home, "published": stores.fill(home)}


@pytest.fixture(scope="module")
def server(store, tmp_path_factory) -> LiveServer:
    """The main server: admin token set, default CORS, no web client."""
    empty = tmp_path_factory.mktemp("no-web-client")
    with LiveServer(store["home"], log=empty / "server.log",
                    env={"POLLINATE_ADMIN_TOKEN": TOKEN, "POLLINATE_WEB_CLIENT": str(empty)}) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def tokenless(store, tmp_path_factory) -> LiveServer:
    """Same store, but the server was started without POLLINATE_ADMIN_TOKEN (and its web
    client folder does not exist)."""
    logs = tmp_path_factory.mktemp("tokenless")
    with LiveServer(store["home"], log=logs / "server.log", env={"POLLINATE_WEB_CLIENT": str(logs / "missing")}) as live:
        yield live


@pytest.fixture(scope="module")
def web_client_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("web_client")
    (folder / "index.html").write_text("<!doctype html><title>pollinate demo</title><script src='app.js'></script>")
    (folder / "app.js").write_text("console.log('hi')")
    return folder


@pytest.fixture(scope="module")
def offload(store, web_client_dir, tmp_path_factory) -> LiveServer:
    """--offload nginx, one allowed CORS origin, and a web client folder."""
    logs = tmp_path_factory.mktemp("offload")
    with LiveServer(store["home"], "--offload", "nginx", "--cors-origin", "https://app.example",
                    log=logs / "server.log",
                    env={"POLLINATE_ADMIN_TOKEN": TOKEN, "POLLINATE_WEB_CLIENT": str(web_client_dir)}) as live:
        yield live


def file_url(model: str, version: int, fmt: str, name: str) -> str:
    return f"/v1/models/{model}/versions/{version}/files/{fmt}/{quote(name, safe='')}"


def raw_get(url: str, target: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A request with the path sent exactly as written (httpx would normalise '..')."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def sri(data: bytes) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(data).digest()).decode()


# --------------------------------------------------------------------------- small routes


def test_health_root_docs_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 200 and root.json()["docs"] == "/docs"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/healthz", "/v1/models", "/v1/models/{name}/manifest", "/v1/models/{name}/versions",
                 "/v1/models/{name}/versions/{version}/manifest",
                 "/v1/models/{name}/versions/{version}/files/{format}/{file}",
                 "/v1/models/{name}/channels", "/metrics"):
        assert path in paths, path
    # the admin routes are left out of the public document (POLLINATE_OPENAPI_ADMIN=1 lists them:
    # the fuzzing server below); they still answer
    assert "/v1/models/{name}/channels/{channel}" not in paths
    assert "/v1/models/{name}/channels/{channel}/rollback" not in paths
    assert set(paths["/v1/models/{name}/versions/{version}/files/{format}/{file}"]) == {"get", "head"}


def test_server_never_imports_tensorflow():
    probe = "import sys, server.app, server.cli; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_web_client_is_served_when_it_exists(offload, web_client_dir):
    with httpx.Client(base_url=offload.url, timeout=10) as c:
        root = c.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/web_client/"
        kept = c.get("/", params={"channel": "canary"}, follow_redirects=False)
        assert kept.headers["location"] == "/web_client/?channel=canary"  # the page reads its channel
        page = c.get("/", follow_redirects=True)
        assert page.status_code == 200 and "pollinate demo" in page.text
        assert c.get("/web_client/app.js").text == "console.log('hi')"
        assert c.get("/web_client/missing.js").status_code == 404
    for target in ("/web_client/../registry/store.py", "/web_client/..%2F..%2Fregistry%2Fstore.py",
                   "/web_client/%2e%2e/%2e%2e/pyproject.toml"):
        status, _, body = raw_get(offload.url, target)
        assert status in (400, 404), target
        assert b"sqlite" not in body.lower() and b"[project]" not in body


def test_list_models_and_versions(client, store):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"digits", "eta", "rollout"}
    assert models["digits"]["latest_version"] == 2 and models["digits"]["versions"] == 2
    assert models["digits"]["channels"]["stable"]["version"] == 1
    assert models["eta"]["channels"] == {}
    versions = client.get("/v1/models/digits/versions").json()
    assert [v["version"] for v in versions["versions"]] == [1, 2]
    assert versions["versions"][0]["manifest_url"] == "/v1/models/digits/versions/1/manifest"
    assert "tfjs-layers" in versions["versions"][0]["formats"]
    assert client.get("/v1/models/nope/versions").status_code == 404


# --------------------------------------------------------------------------- manifests


def test_channel_manifest_is_the_contract(client, store):
    response = client.get("/v1/models/digits/manifest", headers=IDENTITY)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-cache"
    etag = response.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{64}"', etag)  # strong
    assert etag == '"' + hashlib.sha256(response.content).hexdigest() + '"'
    manifest = response.json()
    ManifestOut.model_validate(manifest)
    assert (manifest["name"], manifest["version"], manifest["channel"], manifest["cohort"]) == ("digits", 1, "stable", "channel")
    assert manifest["input"]["shape"] == [8, 8, 1] and manifest["labels"][0] == "0"
    assert manifest["lineage"]["source"] == "central" and manifest["metrics"]["accuracy"] == pytest.approx(0.901)
    entries = {fmt: a["url"].rsplit("/", 1)[1] for fmt, a in manifest["artifacts"].items()}
    assert entries == {"tfjs-layers": "model.json", "tflite-int8": "model.tflite", "tflite-float32": "model.tflite",
                       "keras": "model.keras", "report": "report.json", "export-report": "export-report.json",
                       "misc": "a%20b%23c%3F.bin"}
    expected = store["published"]["digits"][0]["files"]
    listed = 0
    for fmt, artifact in manifest["artifacts"].items():
        assert artifact["url"].startswith("/v1/models/digits/versions/1/files/")
        for f in artifact["files"]:
            data = expected[(fmt, f["name"])]
            assert f["sha256"] == stores.sha256(data) and f["bytes"] == len(data)
            assert f["integrity"] == sri(data)
            assert f["url"] == file_url("digits", 1, fmt, f["name"])
            listed += 1
    assert listed == len(expected)
    # `stable` unset (the default channel): the newest version stands in, and the manifest says so;
    # any other channel that is not set is 404 (tests/test_request_hygiene.py has the attack)
    eta = client.get("/v1/models/eta/manifest").json()
    assert (eta["version"], eta["cohort"], eta["channel"]) == (1, "latest", "stable")
    canary = client.get("/v1/models/digits/manifest", params={"channel": "canary"})
    assert canary.status_code == 404 and "no channel 'canary'" in canary.json()["detail"]


def test_manifest_revalidation_304(client):
    first = client.get("/v1/models/digits/manifest", headers=IDENTITY)
    etag = first.headers["etag"]
    for header in (etag, f'"nope", {etag}', f"W/{etag}", "*"):
        again = client.get("/v1/models/digits/manifest", headers={**IDENTITY, "If-None-Match": header})
        assert again.status_code == 304, header
        assert again.content == b"" and again.headers["etag"] == etag
        assert again.headers["cache-control"] == "no-cache"
    stale = client.get("/v1/models/digits/manifest", headers={**IDENTITY, "If-None-Match": '"stale"'})
    assert stale.status_code == 200 and stale.content == first.content
    # gzip is another representation with its own strong ETag; either one revalidates.
    packed = client.get("/v1/models/digits/manifest", headers={"Accept-Encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip" and packed.json() == first.json()
    assert packed.headers["etag"] == etag[:-1] + '-gzip"'
    assert "Accept-Encoding" in packed.headers["vary"]
    for header in (etag, packed.headers["etag"]):
        assert client.get("/v1/models/digits/manifest", headers={"Accept-Encoding": "gzip",
                                                                  "If-None-Match": header}).status_code == 304


def test_manifest_etag_changes_exactly_when_the_answer_changes(client, store):
    Store(store["home"]).set_channel("eta", "beta", 1)
    url = "/v1/models/eta/manifest?channel=beta"
    before = client.get(url, headers=IDENTITY)
    assert before.json()["cohort"] == "channel"
    assert client.get(url, headers=IDENTITY).headers["etag"] == before.headers["etag"]
    stores.publish(Store(store["home"]), "eta", 33)  # another process writes: a new version
    assert client.get(url, headers={**IDENTITY, "If-None-Match": before.headers["etag"]}).status_code == 304
    moved = client.put("/v1/models/eta/channels/beta", json={"version": 2}, headers=ADMIN)
    assert moved.status_code == 200 and moved.json()["version"] == 2
    after = client.get(url, headers={**IDENTITY, "If-None-Match": before.headers["etag"]})
    assert after.status_code == 200 and after.json()["version"] == 2
    assert after.headers["etag"] != before.headers["etag"]


def test_fixed_version_manifest(client):
    response = client.get("/v1/models/digits/versions/2/manifest", headers=IDENTITY)
    assert response.status_code == 200
    manifest = response.json()
    assert (manifest["version"], manifest["channel"], manifest["cohort"]) == (2, None, None)
    assert manifest["manifest_url"] == "/v1/models/digits/versions/2/manifest"
    assert response.headers["cache-control"] == "no-cache"  # formats may still be attached later
    etag = response.headers["etag"]
    assert client.get("/v1/models/digits/versions/2/manifest", headers={"If-None-Match": etag}).status_code == 304
    assert client.get("/v1/models/digits/versions/9/manifest").status_code == 404
    assert client.get("/v1/models/nope/versions/1/manifest").status_code == 404
    for bad in ("0", "-1", "abc", "1.5", str(2**70)):
        assert client.get(f"/v1/models/digits/versions/{bad}/manifest").status_code == 422, bad


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("fmt, name, content_type", [
    ("tfjs-layers", "model.json", "application/json"),
    ("tfjs-layers", "group1-shard1of2.bin", "application/octet-stream"),
    ("tfjs-layers", "group1-shard2of2.bin", "application/octet-stream"),
    ("tflite-int8", "model.tflite", "application/octet-stream"),
    ("keras", "model.keras", "application/octet-stream"),
    ("report", "confusion.png", "image/png"),
    ("export-report", "export-report.md", "text/markdown; charset=utf-8"),
    ("misc", "a b#c?.bin", "application/octet-stream"),
])
def test_file_bytes_and_caching_headers(client, store, fmt, name, content_type):
    data = store["published"]["digits"][1]["files"][(fmt, name)]
    url = file_url("digits", 2, fmt, name)
    response = client.get(url, headers=IDENTITY)
    assert response.status_code == 200 and response.content == data
    assert response.headers["etag"] == f'"{stores.sha256(data)}"'
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert response.headers["content-type"] == content_type
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["accept-ranges"] == "bytes"
    assert "content-encoding" not in response.headers
    again = client.get(url, headers={**IDENTITY, "If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == response.headers["etag"]
    head = client.head(url, headers=IDENTITY)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data)) and head.headers["etag"] == response.headers["etag"]


def test_json_files_are_gzipped_for_clients_that_accept_it(client, store):
    data = store["published"]["digits"][0]["files"][("tfjs-layers", "model.json")]
    url = file_url("digits", 1, "tfjs-layers", "model.json")
    raw = client.get(url, headers={"Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"
    assert raw.content == data  # httpx decoded it
    assert int(raw.headers["content-length"]) < len(data) // 2
    assert raw.headers["etag"] == f'"{stores.sha256(data)}-gzip"'
    assert "Accept-Encoding" in raw.headers["vary"]
    for tag in (f'"{stores.sha256(data)}"', raw.headers["etag"]):
        assert client.get(url, headers={"Accept-Encoding": "gzip", "If-None-Match": tag}).status_code == 304
    status, headers, body = raw_get(str(client.base_url), url, {"Accept-Encoding": "gzip"})
    assert status == 200 and gzip.decompress(body) == data
    # Binary files are never compressed.
    shard = client.get(file_url("digits", 1, "tfjs-layers", "group1-shard1of2.bin"), headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in shard.headers


def test_ranges_resume_downloads(client, store):
    data = store["published"]["digits"][0]["files"][("tfjs-layers", "group1-shard2of2.bin")]
    size = len(data)
    url = file_url("digits", 1, "tfjs-layers", "group1-shard2of2.bin")
    etag = f'"{stores.sha256(data)}"'
    for header, start, end in (("bytes=0-99", 0, 99), ("bytes=1000000-", 1_000_000, size - 1),
                               ("bytes=-500", size - 500, size - 1), (f"bytes=10-{size + 50}", 10, size - 1),
                               ("bytes=1048570-1048580", 1_048_570, 1_048_580)):
        part = client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == data[start:end + 1]
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert part.headers["content-length"] == str(end - start + 1)
        assert part.headers["etag"] == etag
    head = client.head(url, headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head.headers["content-length"] == "10" and head.content == b""
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        refused = client.get(url, headers={"Range": header})
        assert refused.status_code == 416, header
        assert refused.headers["content-range"] == f"bytes */{size}"
        assert "detail" in refused.json()
    # Several ranges, other units, garbage: the whole file (a server may ignore Range).
    for header in ("bytes=0-1,5-6", "items=0-1", "bytes=abc", "bytes=5-1"):
        whole = client.get(url, headers={"Range": header})
        assert whole.status_code == 200 and whole.content == data, header
    # If-Range: the range only if the file is still the one the client started with.
    assert client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}).status_code == 206
    changed = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert changed.status_code == 200 and changed.content == data
    small = client.get(file_url("digits", 1, "tflite-int8", "model.tflite"), headers={"Range": "bytes=5-14"})
    assert small.status_code == 206
    assert small.content == store["published"]["digits"][0]["files"][("tflite-int8", "model.tflite")][5:15]


@pytest.mark.parametrize("target", [
    "/v1/models/nope/versions/1/files/tfjs-layers/model.json",
    "/v1/models/digits/versions/7/files/tfjs-layers/model.json",
    "/v1/models/digits/versions/1/files/onnx/model.onnx",
    "/v1/models/digits/versions/1/files/tfjs-layers/missing.bin",
    "/v1/models/digits/versions/1/files/tfjs-layers/../../../../registry.sqlite",
    "/v1/models/digits/versions/1/files/tfjs-layers/..%2F..%2F..%2F..%2Fregistry.sqlite",
    "/v1/models/digits/versions/1/files/tfjs-layers/%2e%2e",
    "/v1/models/digits/versions/1/files/tfjs-layers/%2Fetc%2Fpasswd",
    "/v1/models/digits/versions/1/files//etc/passwd",
    "/v1/models/digits/versions/1/files/tfjs-layers//etc/passwd",
    "/v1/models/digits/versions/1/files/tfjs-layers/model.json%00.png",
    "/v1/models/..%2F..%2Fetc/versions/1/files/tfjs-layers/model.json",
    "/v1/models/DIGITS/versions/1/files/tfjs-layers/model.json",
    "//etc/passwd",
    "/../../etc/passwd",
    "/objects",
    "/registry.sqlite",
])
def test_unknown_files_and_traversal_are_404(server, target):
    status, headers, body = raw_get(server.url, target)
    assert status in (400, 404), (target, status)
    assert b"SQLite format" not in body and b"root:" not in body
    if status == 404:
        assert headers["content-type"] == "application/json" and "detail" in json.loads(body)


# --------------------------------------------------------------------------- admin


def test_admin_refused_without_a_configured_token(tokenless):
    with httpx.Client(base_url=tokenless.url, timeout=10) as c:
        for headers in ({}, ADMIN, {"Authorization": "Bearer x"}):
            put = c.put("/v1/models/digits/channels/stable", json={"version": 2}, headers=headers)
            assert put.status_code == 403 and "no admin token" in put.json()["detail"]
            post = c.post("/v1/models/digits/channels/stable/rollback", headers=headers)
            assert post.status_code == 403
        assert c.get("/v1/models/digits/manifest").json()["version"] == 1  # nothing moved
        assert c.get("/").json()["docs"] == "/docs"
        assert c.get("/web_client/index.html").status_code == 404


def test_admin_needs_the_right_bearer_token(client, store):
    history = len(Store(store["home"]).channel_history("digits"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        response = client.put("/v1/models/digits/channels/stable", json={"version": 2}, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"].startswith("Bearer") and response.json()["detail"]
        assert client.post("/v1/models/digits/channels/stable/rollback", headers=headers).status_code == 401
    assert len(Store(store["home"]).channel_history("digits")) == history
    moved = client.put("/v1/models/digits/channels/edge", json={"version": 2}, headers=ADMIN)
    assert moved.status_code == 200
    assert moved.json() == {**moved.json(), "model": "digits", "channel": "edge", "version": 2,
                            "candidate_version": None, "rollout_percent": None}
    staged = client.put("/v1/models/digits/channels/edge", json={"version": 1, "rollout_percent": 20}, headers=ADMIN)
    assert staged.json()["candidate_version"] == 1 and staged.json()["rollout_percent"] == 20
    back = client.post("/v1/models/digits/channels/edge/rollback", headers=ADMIN)
    assert back.status_code == 200 and back.json()["version"] == 2 and back.json()["candidate_version"] is None
    unset = client.post("/v1/models/digits/channels/edge/rollback", headers=ADMIN)
    assert unset.status_code == 200 and unset.json()["version"] is None
    channels = client.get("/v1/models/digits/channels").json()
    assert "edge" not in channels["channels"] and channels["channels"]["stable"]["version"] == 1
    assert [h["action"] for h in channels["history"] if h["channel"] == "edge"] == [
        "promote", "rollout", "rollback", "rollback"]


@pytest.mark.parametrize("body, status", [
    (b"{not json", 422),
    (b"", 422),
    (b"[]", 422),
    (b'{"version": 2, "rollout_percent": 0}', 422),
    (b'{"version": 2, "rollout_percent": -5}', 422),
    (b'{"version": 2, "rollout_percent": 100.5}', 422),
    (b'{"version": 2, "rollout_percent": NaN}', 422),
    (b'{"version": 2, "rollout_percent": Infinity}', 422),
    (b'{"version": 2, "rollout_percent": "ten"}', 422),
    (b'{"version": "2"}', 422),
    (b'{"version": true}', 422),
    (b'{"version": 0}', 422),
    (b'{"version": 2.5}', 422),
    (b'{"version": 1e400}', 422),
    (b'{"version": 99999999999999999999999999}', 422),
    (b'{"rollout_percent": 10}', 422),
    (b'{"version": 2, "extra": 1}', 422),
    (b'{"version": 9}', 404),
    (b"[" * 5000 + b"]" * 5000, 422),
])
def test_bad_admin_bodies_are_refused_and_change_nothing(client, store, body, status):
    before = Store(store["home"]).channel_history("digits")
    response = client.put("/v1/models/digits/channels/stable", content=body,
                          headers={**ADMIN, "Content-Type": "application/json"})
    assert response.status_code in ((status, 400) if body.startswith(b"[[") else (status,)), response.text
    assert "detail" in response.json()
    assert Store(store["home"]).channel_history("digits") == before


def test_admin_state_conflicts_and_unknown_names(client, store):
    before = Store(store["home"]).channel_history("eta")
    cases = [
        ("put", "/v1/models/eta/channels/fresh", {"version": 1, "rollout_percent": 10}, 409),  # unset channel
        ("post", "/v1/models/eta/channels/never/rollback", None, 409),  # nothing to undo
        ("put", "/v1/models/nope/channels/stable", {"version": 1}, 404),
        ("put", "/v1/models/Bad%20Name/channels/stable", {"version": 1}, 404),
        ("put", "/v1/models/eta/channels/Not_OK!", {"version": 1}, 422),
        ("put", "/v1/models/eta/channels/" + "x" * 33, {"version": 1}, 422),
        ("post", "/v1/models/nope/channels/stable/rollback", None, 404),
    ]
    for method, url, body, status in cases:
        response = client.request(method, url, json=body, headers=ADMIN)
        assert response.status_code == status, (url, response.text)
        assert response.json()["detail"]
    assert Store(store["home"]).channel_history("eta") == before


def test_oversized_bodies_are_413(client, store):
    before = Store(store["home"]).channel_history("digits")
    big = b'{"version": 2, "pad": "' + b"x" * 70_000 + b'"}'
    declared = client.put("/v1/models/digits/channels/stable", content=big, headers={**ADMIN, "Content-Type": "application/json"})
    assert declared.status_code == 413 and "too large" in declared.json()["detail"]

    def chunks():
        yield b'{"version": 2, "pad": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}'

    streamed = client.put("/v1/models/digits/channels/stable", content=chunks(),
                          headers={**ADMIN, "Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert Store(store["home"]).channel_history("digits") == before
    assert client.get("/healthz").status_code == 200


def test_cors_for_browser_apps(client, offload):
    simple = client.get("/v1/models/digits/manifest", headers={"Origin": "https://anywhere.example"})
    assert simple.headers["access-control-allow-origin"] == "*"
    exposed = simple.headers["access-control-expose-headers"].lower()
    assert "etag" in exposed and "content-length" in exposed and "content-range" in exposed
    preflight = client.options("/v1/models/digits/predict", headers={
        "Origin": "https://anywhere.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
    # admin routes answer no CORS to any origin (tests/test_request_hygiene.py has the attack)
    admin = client.options("/v1/models/digits/channels/stable", headers={
        "Origin": "https://anywhere.example", "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert not [h for h in admin.headers if h.lower().startswith("access-control-")]
    with httpx.Client(base_url=offload.url, timeout=10) as c:
        allowed = c.get("/v1/models", headers={"Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# --------------------------------------------------------------------------- rollout


def test_rollout_cohorts_are_sticky_over_http(client, store):
    staged = client.put("/v1/models/rollout/channels/stable", json={"version": 2, "rollout_percent": 25}, headers=ADMIN)
    assert staged.status_code == 200
    ids = [f"device-{i}" for i in range(1500)]
    first = {}
    for client_id in ids:
        manifest = client.get("/v1/models/rollout/manifest", params={"client_id": client_id}).json()
        first[client_id] = manifest["version"]
        expected = 2 if cohort_bucket("rollout", "stable", client_id) < 25 else 1
        assert manifest["version"] == expected
        assert manifest["cohort"] == ("candidate" if expected == 2 else "channel")
    share = sum(v == 2 for v in first.values()) / len(ids)
    assert 0.21 < share < 0.29, share
    for client_id in random.Random(0).sample(ids, 30):
        for _ in range(5):
            assert client.get("/v1/models/rollout/manifest", params={"client_id": client_id}).json()["version"] == first[client_id]
    # No client id: always the channel's version. Raising the percent only adds clients.
    assert client.get("/v1/models/rollout/manifest").json()["version"] == 1
    client.put("/v1/models/rollout/channels/stable", json={"version": 2, "rollout_percent": 60}, headers=ADMIN)
    later = {i: client.get("/v1/models/rollout/manifest", params={"client_id": i}).json()["version"] for i in ids[:400]}
    assert all(later[i] == 2 for i in later if first[i] == 2)
    assert 0.5 < sum(v == 2 for v in later.values()) / len(later) < 0.7


def test_publishing_while_50_clients_download(client, store):
    """Clients only ever get manifests whose files exist and match their sha256."""
    home = store["home"]
    writer = Store(home)
    small = (40_000, 90_000)
    stores.publish(writer, "busy", 100, files=stores.version_files(100, small))
    client.put("/v1/models/busy/channels/stable", json={"version": 1}, headers=ADMIN)
    stop = threading.Event()
    problems: list[str] = []
    seen_versions: set[int] = set()
    downloads = [0]
    lock = threading.Lock()

    def download(worker: int) -> None:
        with httpx.Client(base_url=client.base_url, timeout=20) as c:
            while not stop.is_set():
                try:
                    manifest = c.get("/v1/models/busy/manifest", params={"client_id": f"w{worker}"}).json()
                    for fmt in ("tfjs-layers", "tflite-int8"):
                        for f in manifest["artifacts"][fmt]["files"]:
                            response = c.get(f["url"])
                            if response.status_code != 200:
                                problems.append(f"v{manifest['version']} {f['name']}: HTTP {response.status_code}")
                            elif (hashlib.sha256(response.content).hexdigest() != f["sha256"]
                                  or len(response.content) != f["bytes"] or sri(response.content) != f["integrity"]):
                                problems.append(f"v{manifest['version']} {f['name']}: bytes do not match")
                    with lock:
                        seen_versions.add(manifest["version"])
                        downloads[0] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is a finding
                    problems.append(f"worker {worker}: {exc!r}")

    threads = [threading.Thread(target=download, args=(i,), daemon=True) for i in range(50)]
    for t in threads:
        t.start()
    try:
        for seed in range(101, 105):
            time.sleep(0.4)
            version = stores.publish(writer, "busy", seed, files=stores.version_files(seed, small))["version"]
            if seed == 103:
                moved = client.put("/v1/models/busy/channels/stable", json={"version": version, "rollout_percent": 50},
                                   headers=ADMIN)
            else:
                moved = client.put("/v1/models/busy/channels/stable", json={"version": version}, headers=ADMIN)
            assert moved.status_code == 200, moved.text
        time.sleep(0.6)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not problems, problems[:10]
    assert downloads[0] >= 100 and len(seen_versions) >= 3, (downloads[0], seen_versions)


# --------------------------------------------------------------------------- operations


def test_state_survives_kill_9(tmp_path):
    home = tmp_path / "store"
    writer = Store(home)
    for seed in (1, 2, 3):
        stores.publish(writer, "sturdy", seed, files={"tflite-int8": {"model.tflite": bytes([seed]) * 100}})
    env = {"POLLINATE_ADMIN_TOKEN": TOKEN}
    first = LiveServer(home, log=tmp_path / "first.log", env=env).start()
    try:
        with httpx.Client(base_url=first.url, timeout=10) as c:
            assert c.put("/v1/models/sturdy/channels/stable", json={"version": 2}, headers=ADMIN).status_code == 200
            assert c.put("/v1/models/sturdy/channels/stable", json={"version": 3, "rollout_percent": 30},
                         headers=ADMIN).status_code == 200
            assert c.put("/v1/models/sturdy/channels/canary", json={"version": 3}, headers=ADMIN).status_code == 200
            before = c.get("/v1/models/sturdy/channels").json()
            etag = c.get("/v1/models/sturdy/manifest", headers=IDENTITY).headers["etag"]
    finally:
        first.kill9()
    with LiveServer(home, log=tmp_path / "second.log", env=env) as second, \
            httpx.Client(base_url=second.url, timeout=10) as c:
        assert c.get("/v1/models/sturdy/channels").json() == before
        assert [v["version"] for v in c.get("/v1/models/sturdy/versions").json()["versions"]] == [1, 2, 3]
        again = c.get("/v1/models/sturdy/manifest", headers={**IDENTITY, "If-None-Match": etag})
        assert again.status_code == 304  # same answer, same ETag, across processes
        assert c.get("/v1/models/sturdy/manifest", params={"channel": "canary"}).json()["version"] == 3
        assert c.post("/v1/models/sturdy/channels/stable/rollback", headers=ADMIN).json()["version"] == 2
    assert Store(home).verify() == []


def test_remote_promote_and_rollback_from_the_cli(server, store):
    def cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "200"}
        env.pop("POLLINATE_ADMIN_TOKEN", None)
        env.pop("POLLINATE_SERVER", None)
        if token is not None:
            env["POLLINATE_ADMIN_TOKEN"] = token
        return subprocess.run([sys.executable, "-m", "pollinate", "models", *args], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=60)

    elsewhere = str(Path(store["home"]).parent / "not-this-store")
    promoted = cli("promote", "eta", "1", "--channel", "remote", "--server", server.url, "--home", elsewhere, "--json")
    assert promoted.returncode == 0, promoted.stderr
    assert json.loads(promoted.stdout)["version"] == 1
    assert Store(store["home"]).get_channel("eta", "remote").version == 1
    assert not Path(elsewhere).exists()  # the local store was never touched
    staged = cli("promote", "eta", "2", "--channel", "remote", "--percent", "10", "--server", server.url, "--json")
    assert staged.returncode == 0, staged.stderr
    assert json.loads(staged.stdout)["candidate_version"] == 2
    rolled = cli("rollback", "eta", "--channel", "remote", "--server", server.url)
    assert rolled.returncode == 0 and "remote" in rolled.stdout
    assert Store(store["home"]).get_channel("eta", "remote").candidate_version is None
    for args, token, message in (
        (("promote", "eta", "1", "--channel", "remote"), "wrong", "(401): wrong bearer token"),
        (("promote", "eta", "1", "--channel", "remote"), None, "POLLINATE_ADMIN_TOKEN"),
        (("promote", "eta", "42", "--channel", "remote"), TOKEN, "(404): model 'eta' has no version 42"),
        (("promote", "eta", "1", "--channel", "remote", "--percent", "101"), TOKEN, "(422): rollout_percent"),
        (("rollback", "eta", "--channel", "nothing-here"), TOKEN, "(409)"),
    ):
        refused = cli(*args, "--server", server.url, token=token)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
        assert message in lines[0], lines[0]
    unreachable = cli("promote", "eta", "1", "--server", "http://127.0.0.1:9")
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_by_route_template(client):
    before = client.get("/metrics").text
    for _ in range(7):
        client.get("/v1/models/eta/manifest", params={"client_id": "m"})
    client.get(file_url("digits", 1, "tflite-int8", "model.tflite"))
    client.get("/v1/models/digits/versions/1/files/tfjs-layers/nope.bin")
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    route = "/v1/models/{name}/manifest"
    assert _metric(text, "pollinate_http_requests_total", route=route, status="200") - \
        _metric(before, "pollinate_http_requests_total", route=route, status="200") == 7
    assert _metric(text, "pollinate_http_request_duration_seconds_count", route=route) >= 7
    files = "/v1/models/{name}/versions/{version}/files/{format}/{file}"
    assert _metric(text, "pollinate_http_requests_total", route=files, status="404") >= 1
    assert _metric(text, "pollinate_http_response_bytes_total", route=files) >= 10_000
    served = dict(model="eta", channel="(latest)", status="200")
    assert _metric(text, "pollinate_manifests_served_total", **served) - \
        _metric(before, "pollinate_manifests_served_total", **served) == 7
    labels = set(re.findall(r'route="([^"]*)"', text))
    assert labels and all(label.startswith("/") or label == "unmatched" for label in labels)
    assert not any("digits" in label or "nope" in label for label in labels)  # templates, not raw paths


def test_metrics_add_up_across_two_workers(store, tmp_path):
    with LiveServer(store["home"], "--workers", "2", log=tmp_path / "server.log") as live:
        for _ in range(60):  # a new connection each time, so both workers answer some
            assert httpx.get(f"{live.url}/v1/models/digits/manifest", headers={"Connection": "close"}).status_code == 200
        for _ in range(4):
            text = httpx.get(f"{live.url}/metrics", headers={"Connection": "close"}).text
            assert _metric(text, "pollinate_http_requests_total", route="/v1/models/{name}/manifest") == 60
            assert _metric(text, "pollinate_manifests_served_total", model="digits", version="1") == 60


# --------------------------------------------------------------------------- nginx offload


def test_offload_answers_with_x_accel_redirect(offload, store):
    data = store["published"]["digits"][0]["files"][("tfjs-layers", "group1-shard1of2.bin")]
    sha = stores.sha256(data)
    with httpx.Client(base_url=offload.url, timeout=10) as c:
        url = file_url("digits", 1, "tfjs-layers", "group1-shard1of2.bin")
        response = c.get(url)
        assert response.status_code == 200 and response.content == b""
        assert response.headers["x-accel-redirect"] == f"/_pollinate_blobs/{sha[:2]}/{sha}"
        assert response.headers["etag"] == f'"{sha}"'
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert response.headers["content-type"] == "application/octet-stream"
        assert c.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
        assert c.get(file_url("digits", 1, "tfjs-layers", "nope.bin")).status_code == 404
        assert "x-accel-redirect" not in c.get("/v1/models/digits/manifest").headers


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup.sh --test installs it)")
def test_real_nginx_sends_the_bytes(offload, store, tmp_path):
    import socket

    from server.nginx import prepare_runtime, render_config

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runtime = prepare_runtime(tmp_path / "nginx")
    conf = runtime / "nginx.conf"
    conf.write_text(render_config(store["home"], urlsplit(offload.url).port, port, runtime_dir=runtime,
                                  daemon=False, single_process=True))
    check = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(runtime), "-e", str(runtime / "error.log")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(runtime), "-e", str(runtime / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, 10, (runtime / "error.log").read_text)
        files = store["published"]["digits"][0]["files"]
        with httpx.Client(base_url=base, timeout=10) as c:
            manifest = c.get("/v1/models/digits/manifest", headers={"Origin": "https://app.example"}).json()
            for f in manifest["artifacts"]["tfjs-layers"]["files"] + manifest["artifacts"]["tflite-int8"]["files"]:
                response = c.get(f["url"], headers={**IDENTITY, "Origin": "https://app.example"})
                assert response.status_code == 200, (f["name"], response.text)
                assert hashlib.sha256(response.content).hexdigest() == f["sha256"]
                assert response.headers["etag"] == f'"{f["sha256"]}"'
                assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
                assert response.headers["access-control-allow-origin"] == "https://app.example"
                assert "etag" in response.headers["access-control-expose-headers"].lower()
                expected_type = "application/json" if f["name"].endswith(".json") else "application/octet-stream"
                assert response.headers["content-type"] == expected_type
            shard = files[("tfjs-layers", "group1-shard2of2.bin")]
            url = file_url("digits", 1, "tfjs-layers", "group1-shard2of2.bin")
            part = c.get(url, headers={"Range": "bytes=100-199"})
            assert part.status_code == 206 and part.content == shard[100:200]
            etag = f'"{stores.sha256(shard)}"'
            assert c.get(url, headers={"If-None-Match": etag}).status_code == 304
            head = c.head(url)
            assert head.status_code == 200 and head.headers["content-length"] == str(len(shard))
            packed = c.get(file_url("digits", 1, "tfjs-layers", "model.json"), headers={"Accept-Encoding": "gzip"})
            assert packed.headers.get("content-encoding") == "gzip"
            assert packed.content == files[("tfjs-layers", "model.json")]
            refused = c.put("/v1/models/digits/channels/stable", json={"version": 2})
            assert refused.status_code == 401  # admin routes are proxied with their refusals
            assert c.get("/_pollinate_blobs/" + stores.sha256(shard)[:2] + "/" + stores.sha256(shard)).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> LiveServer:
    """The admin routes are in this server's OpenAPI document (POLLINATE_OPENAPI_ADMIN=1), so
    every route is fuzzed."""
    home = tmp_path_factory.mktemp("fuzz") / "store"
    stores.fill(home)
    with LiveServer(home, log=home.parent / "server.log",
                    env={"POLLINATE_ADMIN_TOKEN": TOKEN, "POLLINATE_OPENAPI_ADMIN": "1"}) as live:
        yield live


# What no OpenAPI document can state (413 for any body over the cap; 422 for a schema-valid body
# that does not fit the model version it names, on predict, telemetry and feedback) is in the
# repository's schemathesis.toml, which `schemathesis run` reads too: one statement of it.
SCHEMATHESIS_CONFIG = REPO / "schemathesis.toml"
STATE_DEPENDENT_BODIES = ("POST /v1/models/{name}/predict", "POST /v1/models/{name}/telemetry",
                          "POST /v1/models/{name}/feedback")


def test_schemathesis_finds_no_failure_of_any_kind(fuzz_server):
    """Requests generated from the OpenAPI schema — valid, invalid, and valid ones aimed at a
    real model so they get past the 404s — with and without the token, against every route
    (the admin ones included), judged by all of schemathesis' checks: no server error, and
    every status, content type, header and body as the schema documents it; schema-valid
    requests accepted and invalid ones refused."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import CHECKS, load_all_checks
    from schemathesis.config import SchemathesisConfig

    load_all_checks()
    checks = CHECKS.get_all()
    assert len(checks) >= 14  # not_a_server_error, the conformance checks, data acceptance/rejection, auth, ...
    config = SchemathesisConfig.from_path(SCHEMATHESIS_CONFIG)
    import tomllib

    excepted = tomllib.loads(SCHEMATHESIS_CONFIG.read_text())["operations"]
    assert sorted(o["include-name"] for o in excepted) == sorted(STATE_DEPENDENT_BODIES)  # no wider exception
    real = {"name": "digits", "model": "digits", "version": 1, "format": "tfjs-layers", "file": "model.json"}
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=config)
    operations = [op.ok() for op in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert len(operations) >= 20 and set(STATE_DEPENDENT_BODIES) <= labels
    assert "PUT /v1/models/{name}/channels/{channel}" in labels and "POST /v1/federations/{model}/devices" in labels
    failures: list[str] = []
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + 75
    for operation in operations:
        pinned = {k: v for k, v in real.items() if "{" + k + "}" in operation.path}
        strategies = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
        if pinned:
            strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=pinned))
        for strategy in strategies:
            if time.monotonic() > deadline:
                break

            @given(case=strategy)
            @settings(max_examples=40, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case):
                for headers in (ADMIN, {}):
                    try:
                        response = case.call_and_validate(headers=headers, checks=checks, timeout=10)
                    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect every failure
                        failures.append(f"{operation.label}: {str(exc)[:600]}")  # noqa: B023 - called in this iteration
                        return
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                run()
            except Unsatisfiable:  # e.g. no invalid request exists for an operation without inputs
                pass
    assert time.monotonic() <= deadline + 15, "the fuzzing ran past its time box: some operations were skipped"
    kinds = sorted({f.split(":", 1)[0] + ": " + next((line.strip() for line in f.splitlines()
                                                       if line.strip().startswith("- ")), "?") for f in failures})
    assert not failures, "\n".join(kinds) + "\n\n" + "\n\n".join(failures[:3])
    assert sum(statuses.values()) > 500 and {200, 201, 404, 422} <= set(statuses), statuses
