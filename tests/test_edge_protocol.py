"""The device protocol over HTTP, against a real `pollinate serve` over a real store.

The test plays the gateway directly in the store (``EdgeStore.open_task``) and the devices
over HTTP, exactly as docs/device-protocol.md describes them: enrol, poll the task, fetch the
base weights, post local − base. Every refusal the protocol names is produced and then found
counted in /metrics and /status; a kill -9 between updates loses none and counts none twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import stores
from server_helpers.live import LiveServer

from registry import Store
from registry.edge import EdgeStore, weights_spec
from server.schemas import EnrolOut, FederationStatusOut, TaskOut, UpdateAcceptedOut

ENROL_TOKEN = "enrol-secret-0123456789"
LIMIT = 1024  # POLLINATE_MAX_UPDATE_BYTES for these servers: a 15-value update is 60 bytes
CONFIG = {"epochs": 1, "batch_size": 8, "learning_rate": 0.01}
OCTETS = {"Content-Type": "application/octet-stream"}


# --------------------------------------------------------------------------- helpers


def base_arrays(seed: int = 0) -> list[np.ndarray]:
    """A tiny Dense layer's get_weights(): kernel (4, 3) and bias (3,), 15 values."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32)


def new_model(home: Path, model: str) -> None:
    stores.publish(Store(home), model, 7, files={"keras": {"model.keras": b"tiny model " + model.encode()}})


def open_round(home: Path, model: str, *, round: int = 1, gateway: str = "gw-1", clip: bool = False,
               deadline_s: float = 3600, norm_bound: float | None = None):
    """What a gateway does at the start of a Flower round; the bound defaults to the base's norm."""
    arrays = base_arrays(round)
    base = flat(arrays)
    bound = float(np.linalg.norm(base)) if norm_bound is None else norm_bound
    task = EdgeStore(Store(home)).open_task(
        model, federation=f"fed-{model}", round=round, gateway=gateway, base_version=1, config=CONFIG,
        weights=weights_spec(arrays, ["dense/kernel", "dense/bias"]), base=base,
        deadline=time.time() + deadline_s, min_updates=2, norm_bound=bound, clip=clip)
    return task, base


def delta(seed: int, size: int = 15, scale: float = 0.01) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=size) * scale).astype(np.float32)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def enrol(c: httpx.Client, model: str, kind: str = "simulated", headers: dict | None = None) -> dict:
    response = c.post(f"/v1/federations/{model}/devices", json={"kind": kind}, headers=headers or {})
    assert response.status_code == 201, response.text
    return EnrolOut(**response.json()).model_dump()


def post_update(c: httpx.Client, model: str, task_id: str, token: str | None, body: bytes, **params) -> httpx.Response:
    params.setdefault("examples", 10)
    headers = {**OCTETS, **(bearer(token) if token else {})}
    return c.post(f"/v1/federations/{model}/tasks/{task_id}/updates", params=params, content=body, headers=headers)


def refusal_counts(c: httpx.Client, model: str) -> dict[str, float]:
    """pollinate_edge_refusals_total of one model, by reason, from the real /metrics text."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "pollinate_edge_refusals_total" and sample.labels["model"] == model:
                out[sample.labels["reason"]] = out.get(sample.labels["reason"], 0) + sample.value
    return out


def metric(c: httpx.Client, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def status(c: httpx.Client, model: str) -> dict:
    response = c.get(f"/v1/federations/{model}/status")
    assert response.status_code == 200, response.text
    return FederationStatusOut(**response.json()).model_dump()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edge") / "store"


@pytest.fixture(scope="module")
def server(home) -> LiveServer:
    """Open enrolment, a small update limit."""
    new_model(home, "warmup")
    # these tests enrol a hundred devices from 127.0.0.1: the per-address enrolment limit is
    # test_enrolment_is_rate_limited_per_address's subject, not theirs
    with LiveServer(home, log=home.parent / "open.log", env={"POLLINATE_MAX_UPDATE_BYTES": str(LIMIT),
                                                             "POLLINATE_ENROL_TOKEN": None,
                                                             "POLLINATE_ENROL_RATE": "100000"}) as live:
        yield live


@pytest.fixture(scope="module")
def gated(home, server) -> LiveServer:
    """The same store behind a server that wants POLLINATE_ENROL_TOKEN to enrol."""
    with LiveServer(home, log=home.parent / "gated.log", env={"POLLINATE_ENROL_TOKEN": ENROL_TOKEN}) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# --------------------------------------------------------------------------- the happy path


def test_enrol_with_and_without_an_enrol_token(home, client, gated):
    new_model(home, "enrolling")
    url = "/v1/federations/enrolling/devices"
    first = client.post(url, json={"kind": "phone"})
    assert first.status_code == 201
    device = EnrolOut(**first.json())
    assert len(device.token) >= 32 and device.device_id
    no_body = client.post(url)  # the body is optional
    assert no_body.status_code == 201 and no_body.json()["token"] != device.token
    assert client.post(url, json={"kind": "toaster"}).status_code == 201  # recorded as a plain device
    edge = EdgeStore(Store(home))
    assert edge.device_kinds([device.device_id, no_body.json()["device_id"]]) == {
        device.device_id: "phone", no_body.json()["device_id"]: "device"}
    assert edge.authenticate("enrolling", device.token) == device.device_id

    with httpx.Client(base_url=gated.url, timeout=30) as g:
        assert g.post(url, json={"kind": "browser"}).status_code == 401
        assert g.post(url, headers=bearer("not-the-enrol-token")).status_code == 401
        assert g.post(url, headers=bearer(device.token)).status_code == 401  # a device token is no enrol token
        ok = g.post(url, json={"kind": "browser"}, headers=bearer(ENROL_TOKEN))
        assert ok.status_code == 201 and set(ok.json()) == {"device_id", "token"}
        refused = g.post(url)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "POLLINATE_ENROL_TOKEN" in refused.json()["detail"]
        assert refusal_counts(g, "enrolling") == {"unauthorized": 4}
    # no task named, so no federation: unattributed
    assert status(client, "enrolling")["refused_unattributed"] == {"unauthorized": 4}
    assert status(client, "enrolling")["refused"] == {}


def test_task_weights_and_updates_in_float32_and_float16(home, client):
    new_model(home, "tiny")
    a, b = enrol(client, "tiny", "phone"), enrol(client, "tiny", "browser")
    assert client.get("/v1/federations/tiny/task", headers=bearer(a["token"])).status_code == 204
    assert status(client, "tiny")["round"] is None

    task, base = open_round(home, "tiny")
    answer = client.get("/v1/federations/tiny/task", headers=bearer(a["token"]))
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    spec = TaskOut(**answer.json()).model_dump()
    assert spec["task_id"] == task.task_id and spec["round"] == 1 and spec["base_version"] == 1
    assert spec["deadline"].endswith("Z") and spec["config"] == CONFIG and spec["size"] == 15
    assert spec["weights"] == [{"name": "dense/kernel", "shape": [4, 3], "dtype": "float32"},
                               {"name": "dense/bias", "shape": [3], "dtype": "float32"}]
    assert spec["norm_bound"] == pytest.approx(float(np.linalg.norm(base)))

    weights = client.get(f"/v1/federations/tiny/tasks/{task.task_id}/weights", headers=bearer(a["token"]))
    assert weights.status_code == 200 and weights.headers["content-type"] == "application/octet-stream"
    assert weights.content == base.astype("<f4").tobytes()

    d32, d16 = delta(1), delta(2)
    first = post_update(client, "tiny", task.task_id, a["token"], d32.astype("<f4").tobytes(), examples=12)
    assert first.status_code == 202, first.text
    accepted = UpdateAcceptedOut(**first.json())
    assert (accepted.task_id, accepted.round, accepted.accepted, accepted.clipped) == (task.task_id, 1, 1, False)
    assert accepted.norm == pytest.approx(float(np.linalg.norm(d32)), rel=1e-5)
    second = post_update(client, "tiny", task.task_id, b["token"], d16.astype("<f2").tobytes(),
                         examples=5, dtype="float16")
    assert second.status_code == 202 and second.json()["accepted"] == 2

    stored = {u.device_id: u for u in EdgeStore(Store(home)).updates(task.task_id)}
    assert set(stored) == {a["device_id"], b["device_id"]}
    np.testing.assert_array_equal(stored[a["device_id"]].delta, d32)
    np.testing.assert_allclose(stored[b["device_id"]].delta, d16, rtol=1e-3, atol=1e-6)
    assert (stored[a["device_id"]].examples, stored[b["device_id"]].examples) == (12, 5)

    # both devices contributed: nothing left for them this round
    assert client.get("/v1/federations/tiny/task", headers=bearer(a["token"])).status_code == 204
    now = status(client, "tiny")
    assert (now["round"], now["open"], now["accepted"], now["refused"]) == (1, True, 2, {})
    assert [t["accepted"] for t in now["tasks"]] == [2]
    assert metric(client, "pollinate_edge_updates_total", model="tiny") == 2
    assert metric(client, "pollinate_edge_update_bytes_total", model="tiny") == 60 + 30
    # where their time went, phase by phase (the benchmark divides these by the updates)
    for phase in ("read", "queue", "check_append", "sync", "commit", "wake"):
        assert metric(client, "pollinate_edge_update_seconds_total", phase=phase) > 0, phase
    assert client.get(f"/v1/federations/tiny/tasks/{task.task_id}/updates").status_code == 405


def test_updates_share_one_segment_and_are_read_back_by_offset(home, client):
    """A server appends every update of a task to one segment file (no file per update); the
    rows name where each one is; the gateway reads them back exactly, in arrival order."""
    new_model(home, "logged")
    task, _ = open_round(home, "logged")
    devices = [enrol(client, "logged") for _ in range(3)]
    sent = {d["device_id"]: delta(300 + i) for i, d in enumerate(devices)}
    for d in devices:
        assert post_update(client, "logged", task.task_id, d["token"], sent[d["device_id"]].tobytes()).status_code == 202
    folder = home / "edge" / task.task_id
    assert sorted(p.suffix for p in folder.iterdir()) == [".f32", ".seg"]  # base.f32 and one segment
    import sqlite3

    with sqlite3.connect(Store(home).db_path) as db:
        rows = db.execute("SELECT device_id, segment, segment_offset, segment_bytes FROM edge_updates"
                          " WHERE task_id = ? ORDER BY segment_offset", (task.task_id,)).fetchall()
    assert [r[0] for r in rows] == [d["device_id"] for d in devices]
    assert {r[1] for r in rows} == {next(folder.glob("*.seg")).name}
    assert [r[2] % 4096 for r in rows] == [0, 0, 0] and [r[3] for r in rows] == [60, 60, 60]
    updates = EdgeStore(Store(home)).updates(task.task_id)
    assert [u.device_id for u in updates] == [d["device_id"] for d in devices]
    for update in updates:
        np.testing.assert_array_equal(update.delta, sent[update.device_id])


def test_updates_of_the_earlier_layout_and_store_are_still_read(tmp_path):
    """A store made before segments (same schema version, unreleased) gains the segment columns
    when opened; an update recorded as a file of its own is still read."""
    import sqlite3

    home = tmp_path / "store"
    new_model(home, "older")
    task, _ = open_round(home, "older")
    device_id = EdgeStore(Store(home)).enrol("older")[0]
    with sqlite3.connect(Store(home).db_path) as db:
        for column in ("segment", "segment_offset", "segment_bytes"):
            db.execute(f"ALTER TABLE edge_updates DROP COLUMN {column}")
        db.execute("INSERT INTO edge_updates VALUES (?, ?, 3, 0.5, 0, ?)", (task.task_id, device_id, time.time()))
    old = delta(400)
    old.tofile(home / "edge" / task.task_id / f"{device_id}.f32")
    edge = EdgeStore(Store(home))  # adds the columns
    newer = edge.enrol("older")[0]
    edge.accept(task.task_id, newer, delta(401).tobytes(), examples=2)
    by_device = {u.device_id: u for u in edge.updates(task.task_id)}
    np.testing.assert_array_equal(by_device[device_id].delta, old)
    np.testing.assert_array_equal(by_device[newer].delta, delta(401))
    assert (by_device[device_id].examples, by_device[newer].examples) == (3, 2)


def test_durability_modes_and_a_segment_that_lost_its_bytes(tmp_path, monkeypatch):
    """`process` (the default) skips a row whose bytes a power cut took (a short segment) when
    the gateway reads the round back; `power` promised those bytes and says they are gone."""
    from core.errors import InvalidInput
    from registry.edge import durability_mode

    monkeypatch.delenv("POLLINATE_EDGE_DURABILITY", raising=False)
    home = tmp_path / "store"
    new_model(home, "cut")
    task, _ = open_round(home, "cut")
    edge = EdgeStore(Store(home))
    assert edge.durability == durability_mode() == "process"
    kept, lost = (edge.enrol("cut", "phone")[0] for _ in range(2))
    edge.accept(task.task_id, kept, delta(1).tobytes(), examples=1)
    edge.accept(task.task_id, lost, delta(2).tobytes(), examples=1)
    segment = next((home / "edge" / task.task_id).glob("*.seg"))
    os.truncate(segment, 4096)  # the second update's bytes never reached the disk
    assert [u.device_id for u in EdgeStore(Store(home)).updates(task.task_id)] == [kept]
    with pytest.raises(OSError):
        EdgeStore(Store(home), durability="power").updates(task.task_id)
    with pytest.raises(InvalidInput, match="POLLINATE_EDGE_DURABILITY"):
        durability_mode("disk")


def test_an_update_racing_a_discarded_round_is_stale_and_leaves_no_folder(tmp_path):
    """A server that still believes a task open (it read it moments ago) while the gateway
    closes it and frees its files: the update is refused as stale, counted in that round, and
    the task's folder is not created again."""
    from registry.edge import EdgeRefusal

    home = tmp_path / "store"
    new_model(home, "freed")
    task, _ = open_round(home, "freed")
    server_side = EdgeStore(Store(home))
    devices = [server_side.enrol("freed")[0] for _ in range(2)]
    server_side.accept(task.task_id, devices[0], delta(500).tobytes(), examples=1)
    gateway = EdgeStore(Store(home))
    gateway.close_task(task.task_id)
    gateway.discard_files(task.task_id)
    with pytest.raises(EdgeRefusal) as refused:
        server_side.accept(task.task_id, devices[1], delta(501).tobytes(), examples=1, task=task)
    assert refused.value.reason == "stale"
    assert not (home / "edge" / task.task_id).exists()
    assert gateway.status("freed")["refused"] == {"stale": 1}


def test_clip_mode_accepts_and_stores_the_clipped_update(home, client):
    new_model(home, "clippy")
    task, base = open_round(home, "clippy", clip=True)
    device = enrol(client, "clippy")
    big = delta(3, scale=10.0)
    assert np.linalg.norm(big) > task.norm_bound
    response = post_update(client, "clippy", task.task_id, device["token"], big.tobytes())
    assert response.status_code == 202, response.text
    assert response.json()["clipped"] is True
    assert response.json()["norm"] == pytest.approx(float(np.linalg.norm(big)), rel=1e-5)
    stored, = EdgeStore(Store(home)).updates(task.task_id)
    assert stored.clipped
    assert float(np.linalg.norm(stored.delta)) == pytest.approx(task.norm_bound, rel=1e-5)
    np.testing.assert_allclose(stored.delta, big * (task.norm_bound / np.linalg.norm(big)), rtol=1e-5)


# --------------------------------------------------------------------------- refusals


def test_every_refusal_is_refused_and_counted(home, client):
    new_model(home, "strict")
    new_model(home, "elsewhere")
    task, base = open_round(home, "strict")
    devices = [enrol(client, "strict") for _ in range(3)]
    stranger = enrol(client, "elsewhere")
    token = devices[0]["token"]
    good = delta(4).tobytes()
    url = f"/v1/federations/strict/tasks/{task.task_id}"
    produced: list[tuple[int, str, httpx.Response]] = []

    def expect(status_code: int, reason: str, response: httpx.Response) -> None:
        assert response.status_code == status_code, (reason, response.status_code, response.text)
        assert isinstance(response.json()["detail"], str) and response.json()["detail"]
        assert response.json()["reason"] == reason
        produced.append((status_code, reason, response))

    # 401: no token, a bad one, one of another model's device (task, weights and update routes)
    expect(401, "unauthorized", client.get("/v1/federations/strict/task"))
    expect(401, "unauthorized", client.get("/v1/federations/strict/task", headers=bearer("garbage")))
    expect(401, "unauthorized", client.get("/v1/federations/strict/task", headers=bearer(stranger["token"])))
    expect(401, "unauthorized", client.get(f"{url}/weights"))
    expect(401, "unauthorized", post_update(client, "strict", task.task_id, None, good))
    expect(401, "unauthorized", post_update(client, "strict", task.task_id, "garbage", good))
    expect(401, "unauthorized", post_update(client, "strict", task.task_id, stranger["token"], good))
    # 404: a task that does not exist, or that belongs to another model
    expect(404, "unknown_task", post_update(client, "strict", "f" * 32, token, good))
    expect(404, "unknown_task", client.get("/v1/federations/strict/tasks/nope/weights", headers=bearer(token)))
    # 413: declared over the limit, and streamed (chunked: no Content-Length) over it
    expect(413, "too_large", post_update(client, "strict", task.task_id, token, b"\0" * (LIMIT + 4)))
    expect(413, "too_large", post_update(client, "strict", task.task_id, token, b"\0" * (4 << 20)))

    def chunks():
        for _ in range(8):
            yield b"\0" * 256

    expect(413, "too_large", post_update(client, "strict", task.task_id, token, chunks()))
    # 422: wrong length, NaN, infinite, norm over the bound, bad examples, bad dtype
    expect(422, "wrong_length", post_update(client, "strict", task.task_id, token, delta(5, size=14).tobytes()))
    expect(422, "wrong_length", post_update(client, "strict", task.task_id, token, good, dtype="float16"))
    nan = delta(6)
    nan[3] = np.nan
    expect(422, "non_finite", post_update(client, "strict", task.task_id, token, nan.tobytes()))
    inf = delta(6)
    inf[0] = np.inf
    expect(422, "non_finite", post_update(client, "strict", task.task_id, token, inf.tobytes()))
    over = delta(7, scale=10.0)
    assert np.linalg.norm(over) > task.norm_bound
    expect(422, "norm", post_update(client, "strict", task.task_id, token, over.tobytes()))
    for examples in (0, -1, "x", "1.5"):
        expect(422, "bad_examples", post_update(client, "strict", task.task_id, token, good, examples=examples))
    missing = client.post(f"{url}/updates", content=good, headers={**OCTETS, **bearer(token)})
    expect(422, "bad_examples", missing)
    expect(422, "bad_dtype", post_update(client, "strict", task.task_id, token, good, dtype="float64"))
    # none of that was recorded; a good update still is, once: the second is a duplicate
    assert EdgeStore(Store(home)).accepted(task.task_id) == 0
    assert post_update(client, "strict", task.task_id, token, good).status_code == 202
    expect(409, "duplicate", post_update(client, "strict", task.task_id, token, good))
    # 409 stale: the gateway closed the round (a device that fetched it earlier still posts)
    EdgeStore(Store(home)).close_task(task.task_id, {"updates": 1})
    expect(409, "stale", post_update(client, "strict", task.task_id, devices[1]["token"], good))
    expect(409, "stale", client.get(f"{url}/weights", headers=bearer(devices[1]["token"])))
    assert client.get("/v1/federations/strict/task", headers=bearer(devices[1]["token"])).status_code == 204
    # 409 stale: past the deadline of the next round's task
    late, _ = open_round(home, "strict", round=2, deadline_s=-1)
    late_refusal = post_update(client, "strict", late.task_id, devices[2]["token"], delta(8).tobytes())
    expect(409, "stale", late_refusal)
    assert "deadline" in late_refusal.json()["detail"]
    # an unknown model: 404, counted under (unknown) so that labels only name real models
    expect(404, "unknown_model", client.get("/v1/federations/no-such-model/task", headers=bearer(token)))
    expect(404, "unknown_model", client.post("/v1/federations/no-such-model/devices"))
    expect(404, "unknown_model", client.get("/v1/federations/Not A Model!/status"))
    expect(422, "bad_enrolment", client.post("/v1/federations/strict/devices", content=b"{not json"))
    expect(422, "bad_enrolment", client.post("/v1/federations/strict/devices", json=[1, 2]))

    wanted: dict[str, int] = {}
    for _, reason, _ in produced:
        if reason != "unknown_model":
            wanted[reason] = wanted.get(reason, 0) + 1
    assert refusal_counts(client, "strict") == wanted
    assert refusal_counts(client, "(unknown)").get("unknown_model", 0) >= 3
    assert all(r.status_code in (401, 404, 409, 413, 422) for _, _, r in produced)
    # /status: the federation's total over its rounds, the current round's (round 2: its stale
    # refusal), and those no task could be named for (401, unknown task, bad enrolment)
    now = status(client, "strict")
    unattributed = {"unauthorized": 7, "unknown_task": 2, "bad_enrolment": 2}
    assert now["refused_unattributed"] == unattributed
    assert now["refused_total"] == {k: v for k, v in wanted.items() if k not in unattributed}
    assert now["round"] == 2 and now["open"] is False and now["accepted"] == 0
    assert now["refused"] == {"stale": 1}
    # the first round kept exactly the one good update
    assert [u.device_id for u in EdgeStore(Store(home)).updates(task.task_id)] == [devices[0]["device_id"]]


def test_the_update_fast_path_answers_as_the_router_and_the_middleware_would(home, client):
    """server/shortcuts.py answers update POSTs before FastAPI's router: through the
    whole app (fast path) and through the router alone (the declared route), the same
    requests get the same status, body and type; on the wire the middleware still adds CORS
    headers and labels the request with the route's template in /metrics."""
    import asyncio

    from server.app import create_app
    from server.config import ServerConfig

    new_model(home, "twin")
    task, _ = open_round(home, "twin")
    devices = [enrol(client, "twin") for _ in range(2)]
    good = delta(40).tobytes()
    app = create_app(ServerConfig(home=home, web_client=None, max_update_bytes=LIMIT))
    cases = [(None, task.task_id, good, "examples=3"), ("garbage", task.task_id, good, "examples=3"),
             (devices[0]["token"], "f" * 32, good, "examples=3"), (devices[0]["token"], task.task_id, good, "examples=x"),
             (devices[0]["token"], task.task_id, good[:-4], "examples=3"),
             (devices[0]["token"], task.task_id, good, "examples=3&dtype=float64"),
             (devices[0]["token"], task.task_id, b"\0" * (LIMIT + 4), "examples=3")]

    async def call(asgi, token, task_id, body, query) -> tuple[int, dict, bytes]:
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())]
        if token:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": f"/v1/federations/twin/tasks/{task_id}/updates", "raw_path": b"", "root_path": "",
                 "query_string": query.encode(), "headers": headers, "server": ("127.0.0.1", 80),
                 "client": ("127.0.0.1", 1), "app": app}
        sent: list[dict] = []
        pieces = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict:
            return next(pieces, {"type": "http.disconnect"})

        async def send(message: dict) -> None:
            sent.append(message)

        await asgi(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    async def both() -> list:
        return [(await call(app, *case), await call(app.router, *case)) for case in cases]

    for fast, routed in asyncio.run(both()):
        assert fast[0] == routed[0] and fast[2] == routed[2], (fast, routed)
        assert fast[1][b"content-type"] == routed[1][b"content-type"] == b"application/json"
    # the same 202 either way, and the second is a duplicate either way
    accepted = asyncio.run(call(app, devices[1]["token"], task.task_id, good, "examples=3"))
    assert accepted[0] == 202 and b'"accepted":1' in accepted[2]
    again = asyncio.run(call(app.router, devices[1]["token"], task.task_id, good, "examples=3"))
    assert again[0] == 409 and b'"reason":"duplicate"' in again[2]

    # over the wire: CORS on answers and refusals, metrics under the route's template
    origin = {"Origin": "https://app.example"}
    ok = client.post(f"/v1/federations/twin/tasks/{task.task_id}/updates", params={"examples": 2}, content=good,
                     headers={**OCTETS, **bearer(devices[0]["token"]), **origin})
    refused = client.post(f"/v1/federations/twin/tasks/{task.task_id}/updates", params={"examples": 2},
                          content=good, headers={**OCTETS, **origin})
    for response in (ok, refused):
        assert response.headers["access-control-allow-origin"] == "*"
        assert "ETag" in response.headers["access-control-expose-headers"]
    assert (ok.status_code, refused.status_code) == (202, 401)
    assert ok.headers["content-type"] == "application/json" and refused.headers["www-authenticate"]
    template = "/v1/federations/{model}/tasks/{task_id}/updates"
    assert metric(client, "pollinate_http_requests_total", route=template, method="POST", status="202") >= 1
    assert metric(client, "pollinate_http_requests_total", route=template, method="POST", status="401") >= 1
    assert client.put(f"/v1/federations/twin/tasks/{task.task_id}/updates").status_code == 405


def test_openapi_documents_the_protocol(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths["/v1/federations/{model}/devices"]) == {"post"}
    assert set(paths["/v1/federations/{model}/task"]) == {"get"}
    assert set(paths["/v1/federations/{model}/tasks/{task_id}/weights"]) == {"get"}
    assert set(paths["/v1/federations/{model}/status"]) == {"get"}
    update = paths["/v1/federations/{model}/tasks/{task_id}/updates"]["post"]
    assert {"202", "401", "404", "409", "413", "422"} <= set(update["responses"])
    assert {p["name"] for p in update["parameters"]} >= {"model", "task_id", "examples", "dtype"}
    assert "application/octet-stream" in update["requestBody"]["content"]
    assert {"DeviceToken", "EnrolToken"} <= set(spec["components"]["securitySchemes"])
    for name in ("EnrolOut", "TaskOut", "UpdateAcceptedOut", "FederationStatusOut", "EdgeErrorOut"):
        assert name in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


# --------------------------------------------------------------------------- durability and concurrency


@pytest.mark.parametrize("durability", [None, "power"])  # None: the default (process)
def test_kill_9_between_updates_loses_none_and_counts_none_twice(tmp_path, durability):
    home = tmp_path / "store"
    new_model(home, "sturdy")
    task, _ = open_round(home, "sturdy")
    sent = {i: delta(100 + i) for i in range(8)}
    first = LiveServer(home, log=tmp_path / "first.log", env={"POLLINATE_EDGE_DURABILITY": durability}).start()
    try:
        with httpx.Client(base_url=first.url, timeout=30) as c:
            devices = [enrol(c, "sturdy", "phone") for _ in range(8)]
            for i in range(4):
                response = post_update(c, "sturdy", task.task_id, devices[i]["token"], sent[i].tobytes(), examples=i + 1)
                assert response.status_code == 202, response.text
    finally:
        first.kill9()  # no shutdown: whatever got a 202 must already be on disk
    with LiveServer(home, log=tmp_path / "second.log") as second, httpx.Client(base_url=second.url, timeout=30) as c:
        for i in range(4):  # same tokens still work; a device already counted is a duplicate
            again = post_update(c, "sturdy", task.task_id, devices[i]["token"], sent[i].tobytes(), examples=i + 1)
            assert again.status_code == 409 and again.json()["reason"] == "duplicate"
        for i in range(4, 8):
            response = post_update(c, "sturdy", task.task_id, devices[i]["token"], sent[i].tobytes(), examples=i + 1)
            assert response.status_code == 202 and response.json()["accepted"] == i + 1
        assert status(c, "sturdy")["accepted"] == 8
        assert status(c, "sturdy")["refused"] == {"duplicate": 4}
    updates = EdgeStore(Store(home)).updates(task.task_id)
    by_device = {u.device_id: u for u in updates}
    assert len(updates) == len(by_device) == 8
    for i, device in enumerate(devices):
        np.testing.assert_array_equal(by_device[device["device_id"]].delta, sent[i])
        assert by_device[device["device_id"]].examples == i + 1
    assert not list((home / "edge" / task.task_id).glob("*.tmp"))


def test_kill_9_while_updates_are_in_flight_counts_each_once(tmp_path):
    """Devices keep posting while the server dies: an update that got its 202 survives; one
    whose answer was lost is simply posted again (202 if it was not recorded, 409 duplicate
    if it was); in the end every device is counted exactly once."""
    home = tmp_path / "store"
    new_model(home, "busy")
    task, _ = open_round(home, "busy")
    first = LiveServer(home, log=tmp_path / "first.log").start()
    with httpx.Client(base_url=first.url, timeout=30) as c:
        devices = [enrol(c, "busy", "phone") for _ in range(16)]
    sent = {d["device_id"]: delta(200 + i) for i, d in enumerate(devices)}
    got_202: set[str] = set()
    some_accepted = threading.Event()
    lock = threading.Lock()

    def post(device: dict) -> None:
        try:
            with httpx.Client(base_url=first.url, timeout=30) as c:
                response = post_update(c, "busy", task.task_id, device["token"], sent[device["device_id"]].tobytes())
        except httpx.HTTPError:
            return  # the server died under this request: no answer
        if response.status_code == 202:
            with lock:
                got_202.add(device["device_id"])
                if len(got_202) >= 4:
                    some_accepted.set()

    threads = [threading.Thread(target=post, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    try:
        assert some_accepted.wait(timeout=30)
    finally:
        first.kill9()
    for t in threads:
        t.join(timeout=60)
    survived = {u.device_id for u in EdgeStore(Store(home)).updates(task.task_id)}
    assert got_202 <= survived  # a 202 is a promise
    with LiveServer(home, log=tmp_path / "second.log") as second, httpx.Client(base_url=second.url, timeout=30) as c:
        for device in devices:  # every device retries, as a client without an answer would
            again = post_update(c, "busy", task.task_id, device["token"], sent[device["device_id"]].tobytes())
            if device["device_id"] in survived:
                assert again.status_code == 409 and again.json()["reason"] == "duplicate", again.text
            else:
                assert again.status_code == 202, again.text
        assert status(c, "busy")["accepted"] == 16
    updates = EdgeStore(Store(home)).updates(task.task_id)
    assert sorted(u.device_id for u in updates) == sorted(sent)
    for update in updates:
        np.testing.assert_array_equal(update.delta, sent[update.device_id])


def test_many_devices_posting_at_once_are_each_counted_once(home, client):
    new_model(home, "crowd")
    task, _ = open_round(home, "crowd")
    devices = [enrol(client, "crowd", "browser") for _ in range(24)]
    start = threading.Barrier(48)
    answers: list[tuple[str, int, dict]] = []
    lock = threading.Lock()

    def send(device: dict, seed: int) -> None:
        body = delta(seed).tobytes()  # each device posts twice at the same moment
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            start.wait(timeout=30)
            response = post_update(c, "crowd", task.task_id, device["token"], body)
        with lock:
            answers.append((device["device_id"], response.status_code, response.json()))

    threads = [threading.Thread(target=send, args=(d, i)) for i, d in enumerate(devices) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert len(answers) == 48
    for device in devices:
        codes = sorted(code for who, code, _ in answers if who == device["device_id"])
        assert codes == [202, 409], (device["device_id"], codes)
    counts = sorted(body["accepted"] for _, code, body in answers if code == 202)
    assert counts == list(range(1, 25))  # each 202 saw its own update counted, once
    updates = EdgeStore(Store(home)).updates(task.task_id)
    assert sorted(u.device_id for u in updates) == sorted(d["device_id"] for d in devices)
    assert status(client, "crowd")["accepted"] == 24
    assert refusal_counts(client, "crowd") == {"duplicate": 24}
    assert metric(client, "pollinate_edge_updates_total", model="crowd") == 24


def test_a_bad_update_limit_is_one_error_line(tmp_path):
    env = {**os.environ, "POLLINATE_MAX_UPDATE_BYTES": "lots", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-m", "pollinate", "serve", "--home", str(tmp_path / "store"), "--port", "0"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: POLLINATE_MAX_UPDATE_BYTES must be a whole number of bytes, got 'lots'"]


def test_fuzzed_protocol_requests_get_no_server_error(home, client):
    """Requests generated from the OpenAPI schema of the five routes, aimed at a real model,
    a real open task and a real device token (and without it): never a 5xx, and every
    refusal is the protocol's JSON with a reason."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    new_model(home, "fuzzed")
    task, _ = open_round(home, "fuzzed", deadline_s=600)
    device = enrol(client, "fuzzed")
    schema = schemathesis.openapi.from_url(f"{client.base_url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations() if op.ok().path.startswith("/v1/federations/")]
    assert len(operations) == 5
    failures: list[str] = []
    statuses: dict[int, int] = {}
    pinned = {"model": "fuzzed", "task_id": task.task_id}
    for operation in operations:
        params = {k: v for k, v in pinned.items() if "{" + k + "}" in operation.path}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(mode, path_parameters=params))
            @settings(max_examples=15, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case):
                for headers in (bearer(device["token"]), {}):
                    try:
                        response = case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=10)
                    except Exception as exc:  # noqa: BLE001 - collect every failure
                        failures.append(f"{case.operation.label}: {str(exc)[:400]}")
                        return
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code >= 400 and response.status_code != 413:
                        body = response.json()
                        if "reason" not in body:
                            failures.append(f"{case.operation.label}: {response.status_code} without a reason")

            try:
                run()
            except Unsatisfiable:
                pass
    assert not failures, "\n".join(failures[:5])
    assert {201, 401, 422} <= set(statuses), statuses


def test_updates_racing_the_close_are_either_counted_or_stale(tmp_path):
    """Writers share transactions (GroupCommit): while the gateway closes the task, every
    update is either recorded and answered with its count, or refused as stale, never both;
    a close commits between batches, so nothing lands after it."""
    from registry.edge import EdgeRefusal

    home = tmp_path / "store"
    new_model(home, "race")
    task, _ = open_round(home, "race")
    edge = EdgeStore(Store(home))
    devices = [edge.enrol("race", "simulated")[0] for _ in range(40)]
    answers: dict[str, object] = {}
    start = threading.Barrier(41)

    def send(device_id: str, seed: int) -> None:
        start.wait(timeout=30)
        try:
            answers[device_id] = edge.accept(task.task_id, device_id, delta(seed).tobytes(), examples=1)[0].accepted
        except EdgeRefusal as refusal:
            answers[device_id] = refusal.reason

    threads = [threading.Thread(target=send, args=(d, i)) for i, d in enumerate(devices)]
    for t in threads:
        t.start()
    start.wait(timeout=30)
    closer = EdgeStore(Store(home))  # the gateway, as another process would
    deadline = time.monotonic() + 30
    while closer.accepted(task.task_id) < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    closer.close_task(task.task_id)
    for t in threads:
        t.join(timeout=60)
    counted = {d for d, a in answers.items() if isinstance(a, int)}
    assert set(answers.values()) - {"stale"} <= set(range(1, 41))
    assert sorted(a for a in answers.values() if isinstance(a, int)) == list(range(1, len(counted) + 1))
    assert {u.device_id for u in EdgeStore(Store(home)).updates(task.task_id)} == counted
    refused = EdgeStore(Store(home)).status("race")["refused"]
    assert refused.get("stale", 0) == len(devices) - len(counted)
    assert not list((home / "edge" / task.task_id).glob(".*.tmp"))
