"""The model store: versions, artifacts, atomicity under real processes, channels.

Everything runs against real SQLite files and real blobs under tmp_path; the concurrency
and crash tests spawn real Python processes (tests/registry_helpers/).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from registry import (
    ArtifactFile,
    ChannelState,
    InvalidInput,
    Lineage,
    NotFound,
    PollinateError,
    Store,
    VersionRecord,
    cohort_bucket,
)

REPO = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "registry_helpers"
CENTRAL = Lineage("central", dataset_fingerprint="f" * 64, hyperparameters={"epochs": 3})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


def keras_only(payload: bytes = b"weights") -> dict:
    return {"keras": {"model.keras": payload}}


def spawn(script: str, *args: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="random")
    return subprocess.Popen(
        [sys.executable, str(HELPERS / script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()


def stored_blobs(home: Path) -> list[Path]:
    return [p for p in (home / "objects").rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- versions


def test_publish_get_and_list(store: Store, tmp_path: Path) -> None:
    shard = tmp_path / "group1-shard1of1.bin"
    shard.write_bytes(b"\x01\x02" * 5000)
    record = store.publish(
        "digits",
        lineage=CENTRAL,
        artifacts={
            "tfjs-layers": {"model.json": b'{"format": "layers-model"}', "group1-shard1of1.bin": shard},
            "keras": {"model.keras": b"keras bytes"},
        },
        metrics={"accuracy": 0.97, "loss": 0.1},
        input_spec={"shape": [8, 8, 1], "dtype": "float32"},
        labels=[str(i) for i in range(10)],
    )
    assert isinstance(record, VersionRecord)
    assert record.version == 1
    assert record.created_at.endswith("Z")
    assert list(record.artifacts) == ["keras", "tfjs-layers"]
    assert [f.name for f in record.artifacts["tfjs-layers"]] == ["group1-shard1of1.bin", "model.json"]
    shard_file = record.artifacts["tfjs-layers"][0]
    assert shard_file == ArtifactFile(
        "group1-shard1of1.bin", hashlib.sha256(shard.read_bytes()).hexdigest(), 10000
    )

    assert store.get_version("digits", 1) == record
    assert store.get_version("digits") == record
    assert Store(store.home).list_versions("digits") == [record]
    json.dumps(record.to_dict())  # JSON-ready
    assert record.to_dict()["artifacts"]["keras"][0]["size"] == len(b"keras bytes")

    # Content-addressed, read-only, reachable by name.
    blob = store.blob_path(shard_file.sha256)
    assert blob == store.home / "objects" / shard_file.sha256[:2] / shard_file.sha256
    assert blob.read_bytes() == shard.read_bytes()
    assert not blob.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert store.artifact_path("digits", 1, "tfjs-layers", "group1-shard1of1.bin") == blob
    with pytest.raises(NotFound):
        store.artifact_path("digits", 1, "tfjs-layers", "nope.bin")
    with pytest.raises(NotFound):
        store.artifact_path("digits", 2, "keras", "model.keras")
    with pytest.raises(NotFound):
        store.blob_path("0" * 64)
    with pytest.raises(InvalidInput):
        store.blob_path("../../etc/passwd")

    with sqlite3.connect(store.home / "registry.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.list_models() == [{"name": "digits", "latest_version": 1, "versions": 1, "channels": {}}]
    assert store.verify() == []


def test_same_bytes_are_stored_once(store: Store) -> None:
    a = store.publish("m", lineage=CENTRAL, artifacts=keras_only(b"same"))
    b = store.publish("m", lineage=CENTRAL, artifacts={"keras": {"model.keras": b"same", "copy.keras": b"same"}})
    assert a.artifacts["keras"][0].sha256 == b.artifacts["keras"][0].sha256
    assert len(stored_blobs(store.home)) == 1


def test_versions_increment_per_model_and_are_never_reused(store: Store) -> None:
    assert [store.publish("a", lineage=CENTRAL, artifacts=keras_only()).version for _ in range(3)] == [1, 2, 3]
    assert store.publish("b", lineage=CENTRAL, artifacts=keras_only()).version == 1
    # A future delete must not hand out 3 again: the counter lives in `models`, not max()+1.
    with sqlite3.connect(store.home / "registry.sqlite") as db:
        db.execute("DELETE FROM artifacts WHERE model = 'a' AND version = 3")
        db.execute("DELETE FROM versions WHERE model = 'a' AND version = 3")
    assert store.get_version("a").version == 2
    assert store.publish("a", lineage=CENTRAL, artifacts=keras_only()).version == 4
    assert [r.version for r in store.list_versions("a")] == [1, 2, 4]
    with pytest.raises(NotFound):
        store.get_version("a", 3)
    with pytest.raises(NotFound):
        store.get_version("nope")
    with pytest.raises(NotFound):
        store.list_versions("nope")


def test_lineage_round_trips(store: Store) -> None:
    store.publish("digits", lineage=CENTRAL, artifacts=keras_only())
    lineage = Lineage(
        "federated",
        parent_version=1,
        round=4,
        dataset_fingerprint="ab" * 32,
        hyperparameters={"lr": 0.01, "local_epochs": 1},
        extra={"strategy": "FedAvg", "clients": 8, "examples": 1437, "per_client": [10, 20]},
    )
    record = store.publish("digits", lineage=lineage, artifacts=keras_only(b"v2"), metrics={"accuracy": 0.9})
    assert record.lineage == lineage
    again = Store(store.home).get_version("digits", 2)
    assert again.lineage == lineage
    assert Lineage.from_dict(again.to_dict()["lineage"]) == lineage
    assert store.get_version("digits", 1).lineage == CENTRAL


def test_metrics_accept_numpy_like_scalars(store: Store) -> None:
    class Scalar:  # what numpy.float32 offers: .tolist()
        def tolist(self) -> float:
            return 0.5

    record = store.publish("m", lineage=CENTRAL, artifacts=keras_only(), metrics={"acc": Scalar()})
    assert record.metrics == {"acc": 0.5}
    assert store.get_version("m").metrics == {"acc": 0.5}


def test_parent_version_must_exist_and_nothing_is_stored(store: Store) -> None:
    with pytest.raises(NotFound, match="parent_version"):
        store.publish("digits", lineage=Lineage("federated", parent_version=1), artifacts=keras_only())
    store.publish("digits", lineage=CENTRAL, artifacts=keras_only(b"v1"))
    with pytest.raises(NotFound, match="parent_version"):
        store.publish("digits", lineage=Lineage("federated", parent_version=5), artifacts=keras_only(b"v?"))
    assert [r.version for r in store.list_versions("digits")] == [1]
    assert len(stored_blobs(store.home)) == 1


BAD_PUBLISHES = {
    "upper-case model": dict(model="Digits"),
    "empty model": dict(model=""),
    "model starting with dash": dict(model="-digits"),
    "model with slash": dict(model="a/b"),
    "model with space": dict(model="a b"),
    "model with newline": dict(model="digits\n"),
    "model too long": dict(model="m" * 65),
    "upper-case format": dict(artifacts={"Keras": {"model.keras": b"x"}}),
    "format with underscore": dict(artifacts={"tf_js": {"model.json": b"x"}}),
    "format too long": dict(artifacts={"f" * 33: {"a": b"x"}}),
    "empty format": dict(artifacts={"keras": {}}),
    "file with slash": dict(artifacts={"keras": {"a.keras": b"ok", "sub/model.keras": b"x"}}),
    "file with backslash": dict(artifacts={"keras": {"a.keras": b"ok", "sub\\model.keras": b"x"}}),
    "dot-dot file": dict(artifacts={"keras": {"a.keras": b"ok", "..": b"x"}}),
    "file with NUL": dict(artifacts={"keras": {"a.keras": b"ok", "a\0b": b"x"}}),
    "empty file name": dict(artifacts={"keras": {"a.keras": b"ok", "": b"x"}}),
    "file name too long": dict(artifacts={"keras": {"a.keras": b"ok", "n" * 256: b"x"}}),
    "missing file": dict(artifacts={"keras": {"a.keras": b"ok", "model.keras": "/no/such/file"}}),
    "source not bytes or path": dict(artifacts={"keras": {"a.keras": b"ok", "model.keras": 42}}),
    "bad lineage source": dict(lineage=Lineage("manual")),
    "negative round": dict(lineage=Lineage("federated", round=-1)),
    "NaN metric": dict(metrics={"loss": float("nan")}),
    "metrics not a dict": dict(metrics=[1, 2]),
    "labels not a list": dict(labels="0123"),
}


@pytest.mark.parametrize("case", list(BAD_PUBLISHES))
def test_bad_input_is_rejected_and_nothing_is_stored(store: Store, case: str) -> None:
    kwargs = dict(model="digits", lineage=CENTRAL, artifacts={"keras": {"model.keras": b"weights"}})
    kwargs.update(BAD_PUBLISHES[case])
    model = kwargs.pop("model")
    with pytest.raises(InvalidInput) as caught:
        store.publish(model, **kwargs)
    assert "\n" not in str(caught.value)
    assert store.list_models() == []
    assert stored_blobs(store.home) == []
    assert list((store.home / "tmp").iterdir()) == []


def test_add_artifacts_attaches_a_new_format_once(store: Store, tmp_path: Path) -> None:
    store.publish("digits", lineage=CENTRAL, artifacts=keras_only(b"keras"))
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(b"TFL3" * 100)
    record = store.add_artifacts("digits", 1, {"tflite-float32": {"model.tflite": tflite}})
    assert list(record.artifacts) == ["keras", "tflite-float32"]
    assert store.get_version("digits", 1) == record
    assert store.artifact_path("digits", 1, "tflite-float32", "model.tflite").read_bytes() == b"TFL3" * 100

    blobs_before = stored_blobs(store.home)
    with pytest.raises(InvalidInput, match="immutable"):
        store.add_artifacts("digits", 1, {"keras": {"other.keras": b"replacement"}})
    with pytest.raises(InvalidInput, match="immutable"):
        store.add_artifacts("digits", 1, {"tflite-float32": {"model.tflite": b"replacement"}})
    assert store.get_version("digits", 1) == record
    assert stored_blobs(store.home) == blobs_before

    with pytest.raises(NotFound):
        store.add_artifacts("digits", 2, {"tflite-int8": {"model.tflite": b"x"}})
    with pytest.raises(NotFound):
        store.add_artifacts("nope", 1, {"tflite-int8": {"model.tflite": b"x"}})
    with pytest.raises(InvalidInput):
        store.add_artifacts("digits", 1, {})
    assert store.verify() == []


def test_verify_reports_missing_and_corrupt_blobs(store: Store) -> None:
    good = store.publish("m", lineage=CENTRAL, artifacts=keras_only(b"good"))
    bad = store.publish("m", lineage=CENTRAL, artifacts={"keras": {"a.keras": b"aaaa", "b.keras": b"bbbb"}})
    assert store.verify() == []
    corrupt = store.blob_path(bad.artifacts["keras"][0].sha256)
    corrupt.chmod(0o644)
    corrupt.write_bytes(b"AAAA")
    store.blob_path(bad.artifacts["keras"][1].sha256).unlink()
    problems = store.verify()
    assert len(problems) == 2
    assert "a.keras" in problems[0] and "corrupt" in problems[0]
    assert "b.keras" in problems[1] and "missing" in problems[1]
    assert not any(f"v{good.version} " in p for p in problems)


# --------------------------------------------------------------------------- processes


def test_concurrent_publishers_get_distinct_contiguous_versions(tmp_path: Path) -> None:
    home, go = tmp_path / "home", tmp_path / "go"  # no Store yet: the processes create it together
    writers, per_writer = 3, 12
    procs = [spawn("publisher.py", home, "digits", per_writer, go, f"w{i}") for i in range(writers)]
    reader = spawn("reader.py", home, "digits", writers * per_writer, go)
    for proc in [*procs, reader]:
        wait_ready(proc)
    go.touch()

    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])

    numbers = sorted(v for versions in results for v in versions)
    assert numbers == list(range(1, writers * per_writer + 1))
    assert all(versions == sorted(versions) for versions in results)
    assert report["problems"] == []
    assert report["seen"] == writers * per_writer
    assert report["passes"] > 1  # it really read while the writers wrote
    store = Store(home)
    assert [r.version for r in store.list_versions("digits")] == numbers
    writer_of = {r.version: r.lineage.extra["writer"] for r in store.list_versions("digits")}
    for i, versions in enumerate(results):
        assert {writer_of[v] for v in versions} == {f"w{i}"}
    assert store.verify() == []


def test_sigkill_mid_publish_leaves_no_partial_version(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = Store(home)
    rng = random.Random()
    for _ in range(5):
        proc = spawn("crasher.py", home, "big")
        wait_ready(proc)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL

    try:
        records = store.list_versions("big")
    except NotFound:
        records = []
    for record in records:
        expect, attach = record.metrics["expect"], record.metrics["attach"]
        counts = {fmt: len(files) for fmt, files in record.artifacts.items()}
        published = {fmt: n for fmt, n in counts.items() if fmt in expect}
        attached = {fmt: n for fmt, n in counts.items() if fmt in attach}
        assert published == expect, f"v{record.version} is partial: {counts}"
        assert attached in ({}, attach), f"v{record.version} has a partial attach: {counts}"
        assert set(counts) <= set(expect) | set(attach)
    assert store.verify() == []

    # Numbers are allocated only in the committing transaction: no gaps, no reuse.
    assert [r.version for r in records] == list(range(1, len(records) + 1))
    after = store.publish("big", lineage=CENTRAL, artifacts=keras_only(b"after the crash"))
    assert after.version == len(records) + 1
    assert store.get_version("big").version == after.version
    assert store.verify() == []


# --------------------------------------------------------------------------- channels


@pytest.fixture
def three(store: Store) -> Store:
    """A model with versions 1, 2, 3."""
    for i in range(3):
        store.publish("digits", lineage=CENTRAL, artifacts=keras_only(f"v{i + 1}".encode()))
    return store


def test_unset_channel_resolves_to_latest(three: Store) -> None:
    assert three.get_channel("digits", "stable") is None
    assert three.resolve("digits") == (3, "latest")
    assert three.resolve("digits", "canary", client_id="c1") == (3, "latest")
    with pytest.raises(NotFound):
        three.resolve("nope")


def test_set_channel_and_full_promote(three: Store) -> None:
    state = three.set_channel("digits", "stable", 1)
    assert isinstance(state, ChannelState)
    assert (state.version, state.candidate_version, state.rollout_percent) == (1, None, None)
    assert three.get_channel("digits", "stable") == state
    assert three.resolve("digits", "stable", "anyone") == (1, "channel")
    assert three.resolve("digits") == (1, "channel")

    three.set_channel("digits", "canary", 3)
    three.set_channel("digits", "stable", 2, rollout_percent=100)  # 100 % is a full promote
    assert three.resolve("digits", "stable", "anyone") == (2, "channel")
    assert three.resolve("digits", "canary") == (3, "channel")
    assert set(three.list_channels("digits")) == {"canary", "stable"}
    assert three.list_channels("digits")["canary"] == three.get_channel("digits", "canary")
    channels = three.list_models()[0]["channels"]
    assert set(channels) == {"canary", "stable"}
    assert channels["stable"]["version"] == 2 and channels["stable"]["candidate_version"] is None
    json.dumps(channels)


def test_staged_rollout_needs_a_version_first(three: Store) -> None:
    with pytest.raises(InvalidInput, match="promote a version fully first"):
        three.set_channel("digits", "stable", 2, rollout_percent=10)
    assert three.get_channel("digits", "stable") is None
    assert three.channel_history("digits") == []


def test_staged_rollout_proportion_and_stickiness(three: Store, tmp_path: Path) -> None:
    three.set_channel("digits", "stable", 1)
    state = three.set_channel("digits", "stable", 2, rollout_percent=20)
    assert (state.version, state.candidate_version, state.rollout_percent) == (1, 2, 20.0)
    assert three.resolve("digits", "stable") == (1, "channel")  # no client id: the main version

    clients = [f"client-{i}" for i in range(10_000)]
    chosen = {c: three.resolve("digits", "stable", c) for c in clients}
    assert set(chosen.values()) == {(1, "channel"), (2, "candidate")}
    share = sum(v == (2, "candidate") for v in chosen.values()) / len(clients) * 100
    assert 18 <= share <= 22

    # Sticky: a new Store instance, and a new process with another hash seed, agree.
    other = Store(three.home)
    sample = clients[:300]
    assert [other.resolve("digits", "stable", c) for c in sample] == [chosen[c] for c in sample]
    code = (
        "import json, sys; from registry import Store; s = Store(sys.argv[1]);"
        "print(json.dumps([s.resolve('digits', 'stable', c)[0] for c in json.loads(sys.argv[2])]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(three.home), json.dumps(sample)],
        env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="123"),
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert json.loads(out) == [chosen[c][0] for c in sample]


def test_cohort_bucket_is_the_documented_hash() -> None:
    digest = hashlib.sha256(b"digits\0stable\0client-42").digest()
    assert cohort_bucket("digits", "stable", "client-42") == (int.from_bytes(digest[:8], "big") % 10_000) / 100
    buckets = [cohort_bucket("m", "c", str(i)) for i in range(2000)]
    assert all(0 <= b <= 99.99 for b in buckets)
    assert len(set(buckets)) > 1500  # spread over the 10,000 buckets


def test_raising_the_percent_keeps_the_earlier_cohort(three: Store) -> None:
    three.set_channel("digits", "stable", 1)
    clients = [f"c{i}" for i in range(1000)]

    def cohort() -> set[str]:
        return {c for c in clients if three.resolve("digits", "stable", c) == (2, "candidate")}

    three.set_channel("digits", "stable", 2, rollout_percent=10)
    small = cohort()
    three.set_channel("digits", "stable", 2, rollout_percent=35)
    large = cohort()
    assert small and small < large
    assert three.get_channel("digits", "stable").version == 1

    # Full promote of the candidate clears the rollout.
    state = three.set_channel("digits", "stable", 2)
    assert (state.version, state.candidate_version, state.rollout_percent) == (2, None, None)
    assert {three.resolve("digits", "stable", c) for c in clients[:200]} == {(2, "channel")}
    with pytest.raises(InvalidInput, match="already"):
        three.set_channel("digits", "stable", 2, rollout_percent=50)


def test_rollback_pops_moves_in_order(three: Store) -> None:
    three.set_channel("digits", "stable", 1)
    three.set_channel("digits", "stable", 2)
    three.set_channel("digits", "stable", 3, rollout_percent=25)

    state = three.rollback("digits", "stable")  # undo the staged rollout
    assert (state.version, state.candidate_version, state.rollout_percent) == (2, None, None)
    state = three.rollback("digits", "stable")  # undo promote of 2
    assert (state.version, state.candidate_version) == (1, None)
    assert three.resolve("digits", "stable", "c") == (1, "channel")

    three.set_channel("digits", "stable", 3)
    assert three.rollback("digits", "stable").version == 1  # back to before promoting 3

    state = three.rollback("digits", "stable")  # the channel did not exist before
    assert state.version is None
    assert three.get_channel("digits", "stable") is None
    assert three.resolve("digits", "stable", "c") == (3, "latest")
    with pytest.raises(InvalidInput, match="no move to roll back"):
        three.rollback("digits", "stable")
    with pytest.raises(InvalidInput):
        three.rollback("digits", "canary")


def test_rollback_restores_a_staged_rollout(three: Store) -> None:
    three.set_channel("digits", "stable", 1)
    three.set_channel("digits", "stable", 2, rollout_percent=30)
    three.set_channel("digits", "stable", 3)
    state = three.rollback("digits", "stable")
    assert (state.version, state.candidate_version, state.rollout_percent) == (1, 2, 30.0)


def test_channel_history_is_kept(three: Store) -> None:
    three.set_channel("digits", "stable", 1)
    three.set_channel("digits", "canary", 2)
    three.set_channel("digits", "stable", 2, rollout_percent=5)
    three.rollback("digits", "stable")
    three.rollback("digits", "stable")

    history = three.channel_history("digits")
    assert [(h["action"], h["channel"], h["version"], h["candidate_version"], h["rollout_percent"])
            for h in history] == [
        ("promote", "stable", 1, None, None),
        ("promote", "canary", 2, None, None),
        ("rollout", "stable", 1, 2, 5.0),
        ("rollback", "stable", 1, None, None),
        ("rollback", "stable", None, None, None),
    ]
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)
    assert [h["action"] for h in three.channel_history("digits", "canary")] == ["promote"]
    assert Store(three.home).channel_history("digits") == history

    with sqlite3.connect(three.home / "registry.sqlite") as db, pytest.raises(sqlite3.DatabaseError):
        db.execute("DELETE FROM channel_history")


@pytest.mark.parametrize("percent", [0, -5, 100.5, float("nan"), float("inf"), True, "50"])
def test_bad_percent_is_refused(three: Store, percent: object) -> None:
    three.set_channel("digits", "stable", 1)
    with pytest.raises(InvalidInput, match="percent"):
        three.set_channel("digits", "stable", 2, rollout_percent=percent)
    assert three.get_channel("digits", "stable").candidate_version is None
    assert len(three.channel_history("digits")) == 1


@pytest.mark.parametrize("channel", ["Stable", "", "a/b", "ca nary", "c" * 33, "canary\n"])
def test_bad_channel_name_is_refused(three: Store, channel: str) -> None:
    for call in (
        lambda: three.set_channel("digits", channel, 1),
        lambda: three.get_channel("digits", channel),
        lambda: three.resolve("digits", channel),
        lambda: three.rollback("digits", channel),
    ):
        with pytest.raises(InvalidInput, match="channel"):
            call()
    assert three.channel_history("digits") == []


def test_unknown_version_or_model_is_not_found(three: Store) -> None:
    with pytest.raises(NotFound, match="no version 9"):
        three.set_channel("digits", "stable", 9)
    with pytest.raises(NotFound):
        three.set_channel("nope", "stable", 1)
    with pytest.raises(InvalidInput):
        three.set_channel("digits", "stable", 0)
    with pytest.raises(NotFound):
        three.get_channel("nope", "stable")
    assert three.channel_history("digits") == []


def test_errors_are_pollinate_errors() -> None:
    assert issubclass(NotFound, PollinateError) and issubclass(InvalidInput, PollinateError)


# --------------------------------------------------------------------------- schema versions


def _as_first_release(home: Path) -> None:
    """Turn a store into exactly what the first release wrote: schema 1, no schema_history."""
    db = sqlite3.connect(home / "registry.sqlite")
    db.execute("DROP TABLE schema_history")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def test_a_new_store_is_at_the_current_schema(store: Store) -> None:
    from registry.store import SCHEMA_VERSION

    assert store.schema_version() == SCHEMA_VERSION
    assert [(h["version"], h["from_version"]) for h in store.schema_history()] == [(SCHEMA_VERSION, 0)]


def test_an_older_store_is_migrated_in_place_and_keeps_its_data(tmp_path: Path) -> None:
    from registry.store import SCHEMA_VERSION

    old = Store(tmp_path / "home")
    old.publish("digits", lineage=CENTRAL, artifacts=keras_only(), metrics={"accuracy": 0.9})
    old.set_channel("digits", "stable", 1)
    _as_first_release(tmp_path / "home")

    store = Store(tmp_path / "home")
    assert store.schema_version() == SCHEMA_VERSION
    assert [(h["version"], h["from_version"]) for h in store.schema_history()] == [
        (v + 1, v) for v in range(1, SCHEMA_VERSION)]
    assert store.get_version("digits", 1).metrics == {"accuracy": 0.9}
    assert store.get_channel("digits", "stable").version == 1
    assert store.verify() == []
    Store(tmp_path / "home")  # opening again is a no-op
    assert len(store.schema_history()) == SCHEMA_VERSION - 1


def test_a_newer_store_is_refused_and_left_untouched(tmp_path: Path) -> None:
    Store(tmp_path / "home").publish("digits", lineage=CENTRAL, artifacts=keras_only())
    db_path = tmp_path / "home" / "registry.sqlite"
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    before = hashlib.sha256(db_path.read_bytes()).hexdigest()
    with pytest.raises(PollinateError, match=r"schema version 99, newer than this Pollinate"):
        Store(tmp_path / "home")
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == before


def test_a_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    db = sqlite3.connect(tmp_path / "home" / "registry.sqlite")
    db.execute("CREATE TABLE notes (body TEXT)")
    db.commit()
    db.close()
    with pytest.raises(PollinateError, match="is not a Pollinate store"):
        Store(tmp_path / "home")


def test_an_old_store_through_the_cli_is_migrated(tmp_path: Path) -> None:
    Store(tmp_path / "home").publish("digits", lineage=CENTRAL, artifacts=keras_only())
    _as_first_release(tmp_path / "home")
    result = subprocess.run([sys.executable, "-m", "pollinate", "models", "list", "--home", str(tmp_path / "home"), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "digits" in result.stdout
