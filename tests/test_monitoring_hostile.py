"""Field monitoring against hostile senders (issue 19), each defence tested with the attack it
stops, as an attacker would send it: raw HTTP (httpx) against a real `pollinate serve` on
127.0.0.1, over a real SQLite store.

- rate limits are per source address: rotating ``client_id`` buys nothing; X-Forwarded-For
  counts only from a trusted proxy;
- a guardrail weighs only what arrived since the rollout began, and sources rather than items:
  the 1,050-post feedback flood from one address leaves the rollout alone, many honest
  sources reporting a worse candidate still roll it back;
- a value beyond the version's range (``1e308``) is refused and monitoring stays up; a store
  that already holds a non-finite sum still reads, and the window can be purged;
- with ``POLLINATE_MONITOR_AUTH=device`` only enrolled devices' tokens are taken;
- a retried batch (same ``batch_id``) is counted once;
- odd bodies (deep nesting, huge numbers) get 4xx, never a 500.

Every test here fails on the code before issue 19 (commit daf1709): each docstring says how.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import run_cli
from tests.server_helpers.live import LiveServer
from tests.test_monitoring_server import batch, monitored_store, publish_monitored, wait_for

INTERVAL_S = 0.2
RATE = 30
ETA_SPEC = {"shape": [4], "dtype": "float32"}  # a "vector" input: its features are mean, std, nonzero


def publish_eta(store) -> int:
    """delivery-eta v1: a regressor whose training targets are minutes in [5, 90]."""
    from registry import Lineage
    from registry.profile import build_profile

    rng = np.random.default_rng(0)
    x = rng.random((400, 4)).astype(np.float32)
    targets = 5 + 85 * rng.random(400)
    profile = build_profile(x, targets + rng.normal(0, 3, 400), ETA_SPEC, None, "regression", targets=targets)
    record = store.publish("delivery-eta", lineage=Lineage("central"),
                           artifacts={"tflite-float32": {"model.tflite": b"e" * 100},
                                      "profile": {"profile.json": json.dumps(profile).encode()}},
                           metrics={"mae": 3.0}, input_spec=ETA_SPEC, labels=None)
    return record.version


def hostile_store(home: Path) -> dict:
    """digits v1, v2 (stable -> v1), digits-b v1, v2 (stable -> v1), delivery-eta v1."""
    from registry import Store

    made = monitored_store(home)
    store = Store(home)
    b1, b2 = publish_monitored(store, "digits-b", seed=3), publish_monitored(store, "digits-b", seed=4)
    store.set_channel("digits-b", "stable", b1)
    publish_eta(store)
    return {**made, "b_versions": (b1, b2)}


def serve(home: Path, log: Path, **env: str) -> LiveServer:
    return LiveServer(home, log=log, env={"POLLINATE_MONITOR_INTERVAL": str(INTERVAL_S), "POLLINATE_WEB_CLIENT": "off",
                                          "POLLINATE_TRUSTED_PROXIES": None, "POLLINATE_MONITOR_AUTH": None, **env})


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """Behind a trusted proxy (127.0.0.1), with a rate limit no flood below reaches: the
    guardrails, values, batch ids and bodies are tested on their own."""
    root = tmp_path_factory.mktemp("hostile")
    made = hostile_store(root / "store")
    with serve(made["home"], root / "serve.log", POLLINATE_TRUSTED_PROXIES="127.0.0.1",
               POLLINATE_TELEMETRY_RATE="1000000") as live:
        yield {**made, "url": live.url, "log": root / "serve.log"}


def send(url: str, model: str, route: str, body, *, address: str | None = None, token: str | None = None,
         client: httpx.Client | None = None) -> httpx.Response:
    """A raw POST as an attacker writes it: JSON (or bytes) and the headers it likes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if address:
        headers["X-Forwarded-For"] = address
    if token:
        headers["Authorization"] = f"Bearer {token}"
    poster = client or httpx
    return poster.post(f"{url}/v1/models/{model}/{route}", content=content, headers=headers, timeout=30)


def versions_report(url: str, model: str) -> dict:
    answer = httpx.get(f"{url}/v1/models/{model}/monitor", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["report"]["versions"]


# ---------------------------------------------------------------------------- rate limits by address


def test_rotating_client_ids_get_no_more_than_one_address(tmp_path):
    """500 telemetry posts from one address, each with a new client_id: at most the address's
    minute of burst (30) is accepted, the rest get 429; another address still gets through.
    Before issue 19 the bucket was the client_id's: all 500 were accepted."""
    made = monitored_store(tmp_path / "store")
    v1, _ = made["versions"]
    body = batch(made["home"], v1, 0, 5)
    with serve(made["home"], tmp_path / "serve.log", POLLINATE_TELEMETRY_RATE=str(RATE),
               POLLINATE_TRUSTED_PROXIES="127.0.0.1") as live, httpx.Client() as client:
        started = time.monotonic()
        statuses = [send(live.url, "digits", "telemetry", {**body, "client_id": uuid.uuid4().hex}, client=client,
                         address="198.51.100.20").status_code for _ in range(500)]
        refilled = (time.monotonic() - started) * RATE / 60
        assert set(statuses) == {202, 429}
        assert statuses.count(202) <= RATE + 1 + refilled, statuses.count(202)
        assert send(live.url, "digits", "telemetry", body, address="198.51.100.21", client=client).status_code == 202
        # the same holds for feedback, a bucket of its own
        fed = [send(live.url, "digits", "feedback", {"version": v1, "prediction": "1", "label": "1",
                                                     "client_id": uuid.uuid4().hex},
                    address="198.51.100.20", client=client).status_code for _ in range(RATE + 20)]
        assert fed.count(429) >= 19 - refilled


def test_x_forwarded_for_from_an_untrusted_peer_changes_nothing(tmp_path):
    """With no trusted proxy, a direct caller (127.0.0.1) writing a new X-Forwarded-For on
    every post is still one address: the flood is limited as if the header were not there.
    Before issue 19 uvicorn believed X-Forwarded-For from 127.0.0.1 (its default) and the
    bucket was the client_id's: all accepted. (This needs server/serving.py's change that
    turns uvicorn's own proxy-header handling off, as well as server/addresses.py.)"""
    made = monitored_store(tmp_path / "store")
    v1, _ = made["versions"]
    body = batch(made["home"], v1, 0, 5)
    with serve(made["home"], tmp_path / "serve.log", POLLINATE_TELEMETRY_RATE=str(RATE)) as live, \
            httpx.Client() as client:
        started = time.monotonic()
        statuses = [send(live.url, "digits", "telemetry", {**body, "client_id": f"c{i}"}, client=client,
                         address=f"203.0.113.{i % 250}").status_code for i in range(RATE + 40)]
        refilled = (time.monotonic() - started) * RATE / 60
        assert statuses.count(202) <= RATE + 1 + refilled, statuses
        assert statuses.count(429) >= 39 - refilled


# ---------------------------------------------------------------------------- guardrails


def test_a_feedback_flood_from_one_address_leaves_the_rollout_alone(proxied):
    """The attack of issue 19: `models promote digits 2 --percent 10 --guardrail
    field_accuracy`, honest feedback from 20 addresses (both versions 90 % right), then 1,050
    posts of "the candidate was wrong" from one address with rotating client_ids. All are
    accepted (202) — the limit here is out of the way — yet the rollout stays: one source
    holds at most 10 % of the candidate's count and sources, not items, are weighed. Then 30
    honest addresses report the candidate really worse (50 % against 90 %): it is rolled back.
    Before issue 19 the flood rolled the candidate back within seconds."""
    from registry import Store
    from registry.monitoring import Monitor

    v1, v2 = proxied["versions"]
    store = Store(proxied["home"])
    store.set_channel("digits", "stable", v2, rollout_percent=10)
    monitor = Monitor(store)
    monitor.set_guardrails("digits", "stable", ["field_accuracy"])
    url = proxied["url"]
    with httpx.Client() as client:
        def feedback(version: int, right: bool, address: str, **extra) -> None:
            answer = send(url, "digits", "feedback", {"version": version, "prediction": "4",
                                                      "label": "4" if right else "9", **extra},
                          address=address, client=client)
            assert answer.status_code == 202, answer.text

        for i in range(120):
            feedback(v1, i % 10 != 0, f"192.0.2.{i % 20}")
            feedback(v2, i % 10 != 0, f"192.0.2.{i % 20}")
        for i in range(1050):
            feedback(v2, False, "198.51.100.66", client_id=f"rotating-{i}")
        time.sleep(6 * INTERVAL_S + 0.5)  # the server's own checks ran after the last batch
        state = store.get_channel("digits", "stable")
        assert (state.version, state.candidate_version) == (v1, v2), "the flood rolled the candidate back"
        assert monitor.enforce("digits") == []
        status = httpx.get(f"{url}/v1/models/digits/monitor", timeout=30).json()["guardrails"]["stable"]
        side = status["metrics"]["field_accuracy"]["candidate"]
        assert side["received"] == 1050 + 120 and side["sources"] == 21
        assert side["n"] < 120 / 0.9 + 1  # the flooder holds at most 10 % of what counts

        for i in range(300):  # really worse, seen by 30 addresses
            feedback(v1, i % 10 != 0, f"203.0.113.{i % 30}")
            feedback(v2, i % 2 == 0, f"203.0.113.{i % 30}")
        state = wait_for(lambda: (s := store.get_channel("digits", "stable")) and s.candidate_version is None and s,
                         what="the rollback")
    assert state.version == v1
    last = store.channel_history("digits", "stable")[-1]
    assert last["action"] == "rollback" and "field_accuracy" in last["reason"] and "sources" in last["reason"]


def test_items_sent_before_the_rollout_began_are_not_counted(proxied):
    """600 "the candidate was wrong" items from 30 addresses arrive before the rollout (in
    the same UTC hour); after it begins, honest feedback from 20 addresses finds both versions
    equal: the guardrail keeps the candidate. Before issue 19 the guardrail summed whole hour
    windows from the rollout's start, so those 600 items rolled it back."""
    from registry import Store
    from registry.monitoring import Monitor

    b1, b2 = proxied["b_versions"]
    store = Store(proxied["home"])
    url = proxied["url"]
    with httpx.Client() as client:
        for i in range(600):
            answer = send(url, "digits-b", "feedback", {"version": b2, "prediction": "4", "label": "9"},
                          address=f"198.18.0.{i % 30}", client=client)
            assert answer.status_code == 202, answer.text
        store.set_channel("digits-b", "stable", b2, rollout_percent=10)
        Monitor(store).set_guardrails("digits-b", "stable", ["field_accuracy"])
        for i in range(200):
            for version in (b1, b2):
                answer = send(url, "digits-b", "feedback", {"version": version, "prediction": "4",
                                                            "label": "4" if i % 10 else "9"},
                              address=f"192.0.2.{100 + i % 20}", client=client)
                assert answer.status_code == 202, answer.text
    time.sleep(6 * INTERVAL_S + 0.5)
    assert Monitor(store).enforce("digits-b") == []
    state = store.get_channel("digits-b", "stable")
    assert (state.version, state.candidate_version) == (b1, b2)
    counted = Monitor(store).guardrail_status("digits-b")["stable"]["metrics"]["field_accuracy"]["candidate"]
    assert counted["received"] == 200  # the 600 before the rollout are in the windows, not in the guardrail
    assert versions_report(url, "digits-b")[str(b2)]["feedback"] == 800


# ---------------------------------------------------------------------------- values that make sense


def test_1e308_is_refused_and_monitoring_stays_up(proxied):
    """`{"version":1,"prediction":30.5,"label":1e308}` got 202 before issue 19, and from then on
    every GET /monitor answered 500 and `pollinate monitor` showed MAE inf. Now values beyond
    the version's range (its training targets, 5-90 minutes, widened by their width each way:
    -80 to 175), non-finite ones (JSON's Infinity and NaN, which Python's parser takes) and
    configured bounds are refused with 422, and nothing is stored."""
    from registry import Store
    from registry.monitoring import Monitor

    url = proxied["url"]
    before = versions_report(url, "delivery-eta").get("1", {}).get("feedback", 0)
    refused = {
        "1e308 label": {"version": 1, "prediction": 30.5, "label": 1e308},
        "1e308 prediction": {"version": 1, "prediction": 1e308, "label": 30.5},
        "far below": {"version": 1, "prediction": 30.5, "label": -1e6},
        "beyond the margin": {"version": 1, "prediction": 30.5, "label": 180},
        "Infinity": b'{"version": 1, "prediction": 30.5, "label": Infinity}',
        "NaN": b'{"version": 1, "prediction": NaN, "label": 30.5}',
        "a string": {"version": 1, "prediction": 30.5, "label": "30"},
        "a bool": {"version": 1, "prediction": True, "label": 30.5},
    }
    for what, body in refused.items():
        answer = send(url, "delivery-eta", "feedback", body, address="198.51.100.30")
        assert answer.status_code == 422, (what, answer.text)
        assert isinstance(answer.json()["detail"], str) and answer.json()["detail"], what
    recent = {"version": 1, "predictions": 1, "recent": [{"id": "eta-1", "prediction": 1e308}]}
    assert send(url, "delivery-eta", "telemetry", recent, address="198.51.100.30").status_code == 422
    assert send(url, "delivery-eta", "telemetry", {"version": 1, "predictions": 1, "errors": 10_000},
                address="198.51.100.30").status_code == 422
    assert send(url, "delivery-eta", "feedback", {"version": 1, "prediction": 30.5, "label": 41},
                address="198.51.100.30").status_code == 202
    versions = versions_report(url, "delivery-eta")
    assert versions["1"]["feedback"] == before + 1
    assert 0 < versions["1"]["field_mae"]["value"] < 100

    # an operator's bound: nothing over an hour
    Monitor(Store(proxied["home"])).configure("delivery-eta", max_value=60)
    late = send(url, "delivery-eta", "feedback", {"version": 1, "prediction": 30.5, "label": 61},
                address="198.51.100.30")
    assert late.status_code == 422 and "max_value" in late.json()["detail"]
    Monitor(Store(proxied["home"])).configure("delivery-eta", max_value=None)


def test_an_old_store_with_a_non_finite_sum_still_reads_and_can_be_purged(tmp_path):
    """A store written before issue 19 holds a window whose error sums are inf (the 1e308
    feedback). GET /monitor answers 200 (it answered 500 before issue 19), the report leaves
    that window's feedback out and names it, `pollinate monitor` prints no `inf`, and
    `pollinate monitor purge` (which did not exist) removes the window."""
    from registry import Store
    from registry.monitoring import Monitor, hours_ago, window_of

    home = tmp_path / "store"
    store = Store(home)
    publish_eta(store)
    monitor = Monitor(store)
    good_at, bad_at = hours_ago(3), hours_ago(1)
    for label in (40, 44):
        monitor.ingest_feedback("delivery-eta", {"version": 1, "prediction": 42.0, "label": label}, now=good_at)
    monitor.ingest_feedback("delivery-eta", {"version": 1, "prediction": 42.0, "label": 50}, now=bad_at)
    with sqlite3.connect(store.db_path) as db:  # what the 1e308 feedback left in an old store
        db.execute("UPDATE monitor_windows SET abs_error = ?, sq_error = ? WHERE window = ?",
                   (float("inf"), float("inf"), window_of(bad_at)))
    with serve(home, tmp_path / "serve.log") as live:
        answer = httpx.get(f"{live.url}/v1/models/delivery-eta/monitor", timeout=30)
        assert answer.status_code == 200, answer.text
        numbers = answer.json()["report"]["versions"]["1"]
        assert numbers["field_mae"]["value"] == pytest.approx(2.0) and numbers["field_mae"]["n"] == 2
        assert numbers["excluded_windows"] == [window_of(bad_at)]
        assert "Infinity" not in answer.text and "NaN" not in answer.text
    shown = run_cli("monitor", "delivery-eta", home=home, check=True)
    assert " inf" not in shown.stdout and "purge" in shown.stdout

    bad = run_cli("monitor", "purge", "delivery-eta", "--version", "1", home=home)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "--since" in bad.stderr
    assert "Traceback" not in bad.stderr
    hour = window_of(bad_at)
    purged = json.loads(run_cli("monitor", "purge", "delivery-eta", "--version", "1", "--since", hour,
                                "--until", hour, "--json", home=home, check=True).stdout)
    assert purged["removed"]["windows"] == 1 and purged["removed"]["feedback"] == 1
    assert purged["windows"][0]["window"] == hour and purged["windows"][0]["finite"] is False
    after = Monitor(Store(home)).report("delivery-eta")["versions"]["1"]
    assert "excluded_windows" not in after and after["feedback"] == 2


# ---------------------------------------------------------------------------- enrolled devices only


def test_device_mode_takes_only_enrolled_devices_tokens(tmp_path):
    """POLLINATE_MONITOR_AUTH=device: telemetry and feedback without a token, with a made-up
    one or with a device token of another model get 401 with a JSON detail and change
    nothing; an enrolled device's token gets 202. Before issue 19 anyone got 202."""
    made = monitored_store(tmp_path / "store")
    v1, _ = made["versions"]
    body = batch(made["home"], v1, 0, 5)
    with serve(made["home"], tmp_path / "serve.log", POLLINATE_MONITOR_AUTH="device") as live:
        def enrol(model: str) -> str:
            answer = httpx.post(f"{live.url}/v1/federations/{model}/devices", json={"kind": "device"}, timeout=30)
            assert answer.status_code in (200, 201), answer.text
            return answer.json()["token"]

        token, other = enrol("digits"), enrol("plain")
        for what, credential in {"none": None, "made up": "x" * 43, "another model's": other}.items():
            for route, payload in (("telemetry", body), ("feedback", {"version": v1, "prediction": "1", "label": "1"})):
                answer = send(live.url, "digits", route, payload, token=credential)
                assert answer.status_code == 401, (what, route, answer.text)
                assert answer.json()["detail"] and answer.headers["www-authenticate"] == "Bearer"
        assert versions_report(live.url, "digits") == {}
        assert send(live.url, "digits", "telemetry", body, token=token).status_code == 202
        assert send(live.url, "digits", "feedback", {"version": v1, "prediction": "1", "label": "1"},
                    token=token).status_code == 202
        numbers = versions_report(live.url, "digits")[str(v1)]
        assert (numbers["predictions"], numbers["feedback"]) == (5, 1)


# ---------------------------------------------------------------------------- idempotent writes


def test_a_retried_batch_is_counted_once(proxied):
    """A batch sent again with the same batch_id (its answer was lost) is answered 202 with
    "duplicate": true and counted once — also a feedback naming a prediction_id, whose retry
    would otherwise be refused as already answered. A refused batch does not use up its id;
    a malformed id is refused. Before issue 19 `batch_id` was an unknown field (422)."""
    _, v2 = proxied["versions"]
    url = proxied["url"]
    before = versions_report(url, "digits").get(str(v2), {"predictions": 0, "feedback": 0})
    body = {**batch(proxied["home"], v2, 0, 7), "batch_id": uuid.uuid4().hex,
            "recent": [{"id": "retry-1", "prediction": "3", "confidence": 0.9}]}
    first = send(url, "digits", "telemetry", body, address="198.51.100.40")
    again = send(url, "digits", "telemetry", body, address="198.51.100.40")
    assert (first.status_code, again.status_code) == (202, 202), (first.text, again.text)
    assert "duplicate" not in first.json() and again.json()["duplicate"] is True
    assert again.json()["window"] == first.json()["window"]

    label = {"prediction_id": "retry-1", "label": "3", "batch_id": "fb-" + uuid.uuid4().hex}
    answers = [send(url, "digits", "feedback", label, address="198.51.100.40") for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202], [a.text for a in answers]
    assert [a.json().get("duplicate", False) for a in answers] == [False, True, True]

    refused_id = uuid.uuid4().hex  # refused for its version first: the id is still free
    assert send(url, "digits", "telemetry", {**body, "batch_id": refused_id, "version": 99},
                address="198.51.100.40").status_code == 422
    assert "duplicate" not in send(url, "digits", "telemetry", {**body, "batch_id": refused_id},
                                   address="198.51.100.40").json()
    for bad in ("short", "x" * 65, "has space in it!!", 12345678901234567):
        answer = send(url, "digits", "telemetry", {**body, "batch_id": bad}, address="198.51.100.40")
        assert answer.status_code == 422 and "batch_id" in answer.json()["detail"], bad
    after = versions_report(url, "digits")[str(v2)]
    assert after["predictions"] == before["predictions"] + 14 and after["feedback"] == before["feedback"] + 1


def test_one_batch_id_twice_in_one_group_is_counted_once(tmp_path):
    """Two copies of a batch that arrive together (a client's retry racing its first try)
    land in one committer group: the ids are looked up before the group and claimed after it,
    so the second copy must see the first's claim. Counted once, the copy answered as a
    duplicate; an id refused in the group stays free."""
    from registry import Store
    from registry.monitoring import Monitor, _Pending

    made = monitored_store(tmp_path / "store")
    v1, _ = made["versions"]
    monitor = Monitor(Store(made["home"]))
    now = time.time()
    body = {**batch(made["home"], v1, 0, 5), "batch_id": uuid.uuid4().hex}
    refused = {**body, "batch_id": uuid.uuid4().hex, "version": 99}
    group = [_Pending("telemetry", "digits", dict(body), now, None), _Pending("telemetry", "digits", dict(body), now, None),
             _Pending("telemetry", "digits", refused, now, None)]
    db = sqlite3.connect(Store(made["home"]).db_path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    results, failed, _ = monitor._apply(db, group)
    db.execute("COMMIT")
    assert "duplicate" not in results[group[0]] and results[group[1]]["duplicate"] is True
    assert group[2] in failed
    ids = {row[0] for row in db.execute("SELECT batch_id FROM monitor_batches")}
    assert ids == {body["batch_id"]}  # the refused one's id is still free
    assert monitor.report("digits")["versions"][str(v1)]["predictions"] == 5


# ---------------------------------------------------------------------------- bodies


def test_odd_bodies_get_4xx_never_500(proxied):
    """Deep nesting (a RecursionError in the parser: 500 before issue 19, whether or not the
    app's JSON bounds catch it first), a 5,000-digit integer (past Python's int conversion
    limit), a huge float and non-object bodies: each gets 4xx with a JSON detail."""
    v1, _ = proxied["versions"]
    url = proxied["url"]
    deep = b'{"version": 1, "predictions": 1, "features": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    cases = {
        "deep telemetry": ("telemetry", deep),
        "deep feedback": ("feedback", b"[" * 20000 + b"]" * 20000),
        "huge integer": ("telemetry", b'{"version": ' + b"9" * 5000 + b', "predictions": 1}'),
        "huge float": ("telemetry", b'{"version": 1, "predictions": 1e999}'),
        "a string": ("feedback", b'"hello"'),
        "latin-1": ("feedback", b'{"label": "\xff"}'),
    }
    for what, (route, body) in cases.items():
        answer = send(url, "digits", route, body, address="198.51.100.50")
        assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text[:200])
        assert answer.json()["detail"], what
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
