"""Edge model monitoring: the reference profile, telemetry and feedback aggregates, drift,
field accuracy, alerts, shadow versions and guardrails (docs/monitoring.md, issue 13).

Real digits (scikit-learn's copy), real SQLite files; the drawn-differently inputs are made
from the digits arrays: shifted two pixels, thickened by a 3×3 dilation, shrunk to 4×4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from registry import profile as P
from training.datasets import load_dataset

# --------------------------------------------------------------------------- drawn differently


def shifted(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each digit moved two pixels up, down, left or right (zeros come in)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    for i in range(len(x)):
        dy, dx = [(2, 0), (-2, 0), (0, 2), (0, -2)][rng.integers(4)]
        out[i, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            x[i, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


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


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_profile(digits):
    outputs = np.eye(10)[digits.y_train]  # a perfect model's probabilities
    return P.build_profile(digits.x_train, outputs, digits.input_spec(), digits.labels, "classification")


def ordinary(digits) -> np.ndarray:
    """300 digits the profile never saw (the test split, then the validation split)."""
    return np.concatenate([digits.x_test, digits.x_val])[:300]


def max_feature_psi(x, profile, spec) -> float:
    grid = P.grid(profile)
    observed = P.observe(x, np.full((len(x), 10), 0.1), grid, spec)["features"]
    return max(P.psi(observed[name], profile["reference"]["features"][name]) for name in observed)


# --------------------------------------------------------------------------- profile


def test_profile_of_digits_has_the_documented_grid(digits, digits_profile):
    profile = digits_profile
    assert profile["schema"] == 1 and profile["kind"] == "image"
    assert [f["name"] for f in profile["features"]] == list(P.IMAGE_FEATURES)
    for feature in profile["features"]:
        edges = feature["edges"]
        assert 2 <= len(edges) <= 11 and all(a < b for a, b in zip(edges, edges[1:])), feature
        counts = profile["reference"]["features"][feature["name"]]
        assert len(counts) == len(edges) - 1 and sum(counts) == len(digits.x_train)
        assert min(counts) > 0  # every reference bin holds training values
    # continuous features: about a tenth of the training data per bin
    ink = profile["reference"]["features"]["ink_mass"]
    assert len(ink) == 10 and max(ink) < 0.13 * len(digits.x_train)
    prediction = profile["prediction"]
    assert prediction == {"task": "classification", "labels": digits.labels,
                          "confidence_edges": [i / 10 for i in range(11)]}
    assert profile["reference"]["prediction"]["classes"] == np.bincount(digits.y_train).tolist()
    assert profile["reference"]["prediction"]["confidence"][-1] == len(digits.x_train)
    assert profile["latency_ms_edges"] == [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
    grid = P.grid(profile)
    assert "reference" not in grid and set(grid) == {"schema", "kind", "features", "prediction", "latency_ms_edges"}
    json.dumps(profile, allow_nan=False)  # plain JSON


def test_image_features_follow_the_definitions():
    spec = {"shape": [4, 4, 1], "preprocessing": {"kind": "image"}}
    x = np.zeros((2, 4, 4, 1))
    x[0, 0, 3, 0] = 1.0  # one pixel, top right
    values = P.feature_values(x, spec)
    assert values["ink_mass"][0] == pytest.approx(1 / 16) and values["coverage"][0] == pytest.approx(1 / 16)
    assert values["centroid_x"][0] == 1.0 and values["centroid_y"][0] == 0.0
    assert values["spread"][0] == 0.0
    assert values["rows_0"][0] == 1.0 and values["cols_3"][0] == 1.0 and values["cols_0"][0] == 0.0
    # an empty canvas: ratios are 0.5, mass and coverage 0
    assert values["ink_mass"][1] == 0 and values["coverage"][1] == 0
    assert all(values[n][1] == 0.5 for n in ("centroid_x", "centroid_y", "spread", "rows_0", "cols_2"))
    # channels are averaged, values clipped to [0, 1]
    rgb = np.zeros((1, 4, 4, 3))
    rgb[0, 1, 1] = [3.0, 0.0, 0.0]
    assert P.feature_values(rgb, {"preprocessing": {"kind": "image"}})["ink_mass"][0] == pytest.approx(1 / 16)


def test_tabular_and_vector_features():
    spec = {"shape": [4], "preprocessing": {
        "kind": "tabular",
        "columns": [{"name": "km", "type": "numeric"},
                    {"name": "city", "type": "categorical", "vocabulary": ["a", "b"], "encoding": "one-hot"}],
        "features": ["km", "city=a", "city=b"]}}
    x = np.array([[1.5, 1, 0], [2.5, 0, 1], [3.5, 0, 0]] * 10, dtype=np.float32)
    assert P.input_kind(spec) == "tabular"
    values = P.feature_values(x, spec)
    assert values["city"][:3].tolist() == [0, 1, 2] and values["km"][:3].tolist() == [1.5, 2.5, 3.5]
    profile = P.build_profile(x, x[:, :1] * 10, spec, None, "regression", targets=x[:, 0] * 10)
    city = profile["features"][1]
    assert city == {"name": "city", "categories": ["a", "b", "(other)"]}
    assert profile["reference"]["features"]["city"] == [10, 10, 10]
    assert profile["prediction"]["task"] == "regression" and sum(profile["reference"]["prediction"]["values"]) == 30
    vector = P.feature_values(np.array([[0, 2, 0, 2]]), {"shape": [4]})
    assert P.input_kind({"shape": [4]}) == "vector"
    assert vector["mean"][0] == 1 and vector["std"][0] == 1 and vector["nonzero"][0] == 0.5


def test_binning_rule_and_repeated_deciles():
    edges = [0.0, 1.0, 2.0]
    assert P.bin_counts([-5, 0, 0.5, 1, 1.99, 2, 7, np.nan, np.inf], edges).tolist() == [3, 4]
    assert P.bin_counts([0, 1, 2, 2], ["a", "b", "(other)"]).tolist() == [1, 1, 2]
    # a point mass at 0 (half the values) gets its own bin; edges stay increasing
    values = np.concatenate([np.zeros(500), np.linspace(0.1, 1, 500)])
    e = P.decile_edges(values)
    assert all(a < b for a, b in zip(e, e[1:])) and len(e) - 1 <= 10
    assert P.bin_counts(values, e)[0] == 500
    assert P.decile_edges(np.full(20, 3.0))[0] == 3.0 and len(P.decile_edges(np.full(20, 3.0))) == 2


def test_statistics():
    assert P.psi([10, 20, 30], [10, 20, 30]) == 0.0
    assert P.js_divergence([5, 5], [5, 5]) == 0.0
    assert P.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0, abs=0.01)
    a, r = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    assert P.psi([50, 50], [90, 10]) == pytest.approx(float(np.sum((a - r) * np.log(a / r))))
    assert P.psi([0, 0], [1, 1]) == 0.0  # no data, no drift
    low, high = P.wilson(80, 100)
    assert low == pytest.approx(0.7112, abs=1e-3) and high == pytest.approx(0.8666, abs=1e-3)
    assert P.wilson(0, 0) == (0.0, 1.0)
    # 70/200 against 85/200 (pooled): z = -1.54, one-sided p = 0.062
    assert P.p_worse(70, 200, 85, 200) == pytest.approx(0.0619, abs=1e-3)
    assert P.p_worse(85, 200, 70, 200) > 0.9
    assert P.p_worse(50, 100, 50, 100) == pytest.approx(0.5)
    assert P.p_worse(0, 0, 10, 10) == 1.0


def test_drawn_differently_digits_drift_and_ordinary_ones_do_not(digits, digits_profile):
    """The issue's drift acceptance: PSI ≥ 0.2 on some feature for ~300 shifted, thick or
    tiny digits; < 0.1 on every feature for 300 ordinary held-out digits."""
    spec = digits.input_spec()
    x = ordinary(digits)
    assert len(x) == 300
    assert max_feature_psi(x, digits_profile, spec) < 0.1
    for make in (shifted, thick, tiny):
        assert max_feature_psi(make(x), digits_profile, spec) >= 0.2, make.__name__


# --------------------------------------------------------------------------- the monitor (real SQLite)

HOUR = 3600.0
T0 = 498_889 * 3600.0  # the start of an hour in 2026, so windows are predictable


def publish_digits(store, digits, profile, versions: int = 1) -> None:
    """Versions of "digits" with the real digits profile (the Keras file is a stand-in: the
    monitor never loads a model)."""
    from registry import Lineage

    for _ in range(versions):
        store.publish("digits", lineage=Lineage(source="central"),
                      artifacts={"keras": {"model.keras": b"not a model"},
                                 "profile": {"profile.json": json.dumps(profile).encode()}},
                      input_spec=digits.input_spec(), labels=digits.labels)


@pytest.fixture
def monitored(tmp_path, digits, digits_profile):
    from registry import Store
    from registry.monitoring import Monitor

    store = Store(tmp_path / "home")
    publish_digits(store, digits, digits_profile, versions=2)
    return Monitor(store)


def client_batches(x, grid, spec, version, *, size=100, outputs=None):
    """What a client sends: per 100 predictions, the histograms of that batch."""
    for start in range(0, len(x), size):
        chunk = x[start:start + size]
        out = outputs[start:start + size] if outputs is not None else np.eye(10)[np.arange(len(chunk)) % 10]
        body = P.observe(chunk, out, grid, spec)
        body.update(version=version, errors=0, latency_ms=[0, 0, len(chunk), 0, 0, 0, 0, 0, 0, 0, 0])
        yield body


def monitor_tables(store) -> dict[str, list]:
    import sqlite3

    db = sqlite3.connect(store.db_path)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND"
                                          " (name LIKE 'monitor_%' OR name LIKE 'channel%')")]
        return {n: sorted(db.execute(f"SELECT * FROM {n}").fetchall(), key=repr) for n in sorted(names)}
    finally:
        db.close()


def test_the_migration_adds_the_monitoring_tables(monitored):
    from registry.store import SCHEMA_VERSION

    assert SCHEMA_VERSION >= 4 and monitored.store.schema_version() == SCHEMA_VERSION
    assert {"monitor_windows", "monitor_counts", "monitor_recent", "monitor_alerts", "monitor_config",
            "monitor_guardrails", "monitor_shadow", "channel_shadows",
            "channel_history_reasons"} <= set(monitor_tables(monitored.store))


def test_grid_is_the_profile_without_reference(monitored, digits_profile):
    assert monitored.grid("digits", 1) == P.grid(digits_profile)
    monitored.store.publish("digits", lineage=__import__("registry").Lineage(source="central"),
                            artifacts={"keras": {"model.keras": b"x"}})
    assert monitored.grid("digits", 3) is None


def test_batches_merge_by_adding_counts(monitored, digits):
    spec = digits.input_spec()
    grid = monitored.grid("digits", 1)
    x = ordinary(digits)[:200]
    first, second = list(client_batches(x, grid, spec, 1))
    assert monitored.ingest_telemetry("digits", first, now=T0) == {"accepted": True, "window": "2026-11-30T01:00:00Z"}
    monitored.ingest_telemetry("digits", second, now=T0 + 60)
    report = monitored.report("digits")
    v1 = report["versions"]["1"]
    assert v1["predictions"] == 200 and v1["errors"] == 0 and v1["batches"] == 2
    # the aggregate is the sum: the same as one batch of 200
    import sqlite3

    db = sqlite3.connect(monitored.store.db_path)
    stored = {(s, b): c for s, b, c in db.execute(
        "SELECT series, bin, count FROM monitor_counts WHERE series = 'feature:ink_mass'")}
    whole = P.observe(x, np.eye(10)[np.arange(200) % 10], grid, spec)["features"]["ink_mass"]
    assert [stored.get(("feature:ink_mass", i), 0) for i in range(10)] == whole
    # batches commute, per hour window
    monitored.ingest_telemetry("digits", first, now=T0 + HOUR)
    assert len(monitored.timeline("digits", bucket="hour")["versions"]["1"]) == 2
    assert monitored.timeline("digits", bucket="day")["versions"]["1"][0]["predictions"] == 300
    assert v1["latency_ms"]["p50"] is not None and 2 <= v1["latency_ms"]["p50"] <= 5


def _bad_bodies(grid):
    good = {"version": 1, "predictions": 10, "errors": 0,
            "features": {"ink_mass": [1] * 10}, "prediction": {"classes": [1] * 10, "confidence": [0] * 9 + [10]}}

    def but(**change):
        body = json.loads(json.dumps(good))
        for key, value in change.items():
            if value is KeyError:
                body.pop(key)
            else:
                body[key] = value
        return body

    return {
        "not an object": [1, 2, 3],
        "unknown key": but(inputs=[0.1, 0.2]),
        "no version": but(version=KeyError),
        "unknown version": but(version=9),
        "bool version": but(version=True),
        "too many predictions": but(predictions=10_001),
        "negative predictions": but(predictions=-1),
        "float predictions": but(predictions=10.0),
        "wrong length": but(features={"ink_mass": [1] * 9}),
        "negative count": but(features={"ink_mass": [-1] + [1] * 9}),
        "fractional count": but(features={"ink_mass": [0.5] + [1] * 9}),
        "counts over predictions": but(features={"ink_mass": [2] * 10}),
        "unknown feature": but(features={"pixels": [1] * 10}),
        "feature as floats": but(features={"ink_mass": [0.12, 0.33, 0.1, 0.0, 0.2, 0.1, 0.9, 0.1, 0.1, 0.1]}),
        "prediction wrong length": but(prediction={"classes": [1] * 11}),
        "prediction unknown key": but(prediction={"values": [1] * 10}),
        "classes over predictions": but(prediction={"classes": [5] * 10}),
        "long client id": but(client_id="x" * 65),
        "latency wrong length": but(latency_ms=[1] * 12),
        "shadow agreed over compared": but(shadow={"version": 2, "compared": 5, "agreed": 6}),
        "shadow unknown version": but(shadow={"version": 7, "compared": 5, "agreed": 5}),
        "shadow unknown key": but(shadow={"version": 2, "compared": 5, "agreed": 5, "input": "x"}),
        "recent long id": but(recent=[{"id": "a" * 65, "prediction": "7"}]),
        "recent unknown label": but(recent=[{"id": "a1", "prediction": "seven"}]),
        "recent with input": but(recent=[{"id": "a1", "prediction": "7", "pixels": [0.0] * 64}]),
        "recent too many": but(recent=[{"id": f"id{i}", "prediction": "7"} for i in range(101)]),
    }


def test_refused_batches_change_nothing(monitored, digits):
    from core.errors import InvalidInput, NotFound

    spec = digits.input_spec()
    grid = monitored.grid("digits", 1)
    monitored.ingest_telemetry("digits", next(client_batches(ordinary(digits)[:50], grid, spec, 1)), now=T0)
    monitored.ingest_feedback("digits", {"version": 1, "prediction": "7", "label": "7"}, now=T0)
    before = monitor_tables(monitored.store)
    for why, body in _bad_bodies(grid).items():
        with pytest.raises(InvalidInput):
            monitored.ingest_telemetry("digits", body, now=T0)
            pytest.fail(f"accepted: {why}")
    with pytest.raises(NotFound):
        monitored.ingest_telemetry("nope", {"version": 1, "predictions": 1})
    for body in ({"version": 1, "prediction": "7"}, {"version": 1, "prediction": "7", "label": "x"},
                 {"version": 1, "prediction": 7, "label": "7"}, {"prediction_id": "never", "label": "7"},
                 {"version": 1, "prediction": "7", "label": "7", "image": "x"},
                 {"prediction_id": "a1", "version": 1, "label": "7"}, "seven"):
        with pytest.raises(InvalidInput):
            monitored.ingest_feedback("digits", body, now=T0)
    with pytest.raises(NotFound):
        monitored.ingest_feedback("nope", {"version": 1, "prediction": "7", "label": "7"})
    assert monitor_tables(monitored.store) == before


def test_no_raw_input_is_stored(monitored, digits):
    """After real batches, recent ids and feedback, every value of every monitoring table is
    an integer, a short string, or one of the few floats the monitor computes itself."""
    spec = digits.input_spec()
    grid = monitored.grid("digits", 1)
    x = ordinary(digits)
    for i, body in enumerate(client_batches(x, grid, spec, 1)):
        body["recent"] = [{"id": f"p{i}-{k}", "prediction": str(k), "confidence": 0.5} for k in range(10)]
        body["shadow"] = {"version": 2, "compared": body["predictions"], "agreed": body["predictions"] - 3,
                          "latency_ms": [0, 0, body["predictions"]] + [0] * 8}
        monitored.ingest_telemetry("digits", body, now=T0)
    monitored.ingest_feedback("digits", {"prediction_id": "p0-3", "label": "3"}, now=T0)
    monitored.configure("digits", min_accuracy=0.9, min_feedback=1)
    monitored.check_alerts("digits", now=T0 + 60)
    float_columns = {"monitor_windows": {8, 9}, "monitor_recent": {4, 5}, "monitor_alerts": {5, 6},
                     "monitor_guardrails": {3}}
    long_text = {("monitor_alerts", 7), ("monitor_config", 1)}  # our own messages and settings
    tables = monitor_tables(monitored.store)
    assert sum(len(rows) for rows in tables.values()) > 0
    for table, rows in tables.items():
        for row in rows:
            for i, value in enumerate(row):
                if value is None or isinstance(value, int):
                    continue
                if isinstance(value, float):
                    assert i in float_columns.get(table, set()), (table, row)
                    continue
                assert isinstance(value, str), (table, row)
                assert len(value) <= 64 or (table, i) in long_text, (table, row)
    # the counts are bounded by the grid, not by how many predictions were made
    bins = sum(P.bins_of(f) for f in grid["features"]) + 10 + 10 + 11 + 11
    assert len(tables["monitor_counts"]) <= bins


def test_feedback_gives_field_accuracy_with_a_wilson_interval(monitored, digits):
    for i in range(100):
        label = "3" if i < 80 else "5"
        monitored.ingest_feedback("digits", {"version": 1, "prediction": "3", "label": label}, now=T0)
    accuracy = monitored.report("digits")["versions"]["1"]["field_accuracy"]
    low, high = P.wilson(80, 100)
    assert accuracy == {"value": 0.8, "low": low, "high": high, "n": 100}
    # a late label joins its prediction through the id sent in `recent`, once
    body = {"version": 2, "predictions": 1, "recent": [{"id": "late-1", "prediction": "4", "confidence": 0.9}]}
    monitored.ingest_telemetry("digits", body, now=T0)
    monitored.ingest_feedback("digits", {"prediction_id": "late-1", "label": "4"}, now=T0 + 3 * 24 * HOUR)
    assert monitored.report("digits")["versions"]["2"]["field_accuracy"]["n"] == 1
    from core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="prediction_id"):
        monitored.ingest_feedback("digits", {"prediction_id": "late-1", "label": "4"}, now=T0 + 4 * 24 * HOUR)
    # ids expire after 7 days
    monitored.ingest_telemetry("digits", {"version": 2, "predictions": 1,
                                          "recent": [{"id": "old", "prediction": "4"}]}, now=T0)
    with pytest.raises(InvalidInput, match="expired"):
        monitored.ingest_feedback("digits", {"prediction_id": "old", "label": "4"}, now=T0 + 8 * 24 * HOUR)


def test_drift_alert_on_shifted_digits_not_on_ordinary_ones(monitored, digits):
    spec = digits.input_spec()
    grid = monitored.grid("digits", 1)
    x = ordinary(digits)
    for body in client_batches(x, grid, spec, 1):
        monitored.ingest_telemetry("digits", body, now=T0)
    report = monitored.report("digits")
    assert not any(d["alert"] for name, d in report["versions"]["1"]["drift"].items() if name != "prediction")
    assert [a for a in monitored.check_alerts("digits", now=T0 + 60) if a["subject"] != "prediction"] == []

    for body in client_batches(shifted(x), grid, spec, 2):
        monitored.ingest_telemetry("digits", body, now=T0)
    drift = monitored.report("digits", version=2)["versions"]["2"]["drift"]
    assert max(d["psi"] for d in drift.values()) >= 0.2 and any(d["alert"] for d in drift.values())
    new = monitored.check_alerts("digits", now=T0 + 60)
    assert new and {a["version"] for a in new if a["kind"] == "drift" and a["subject"] != "prediction"} == {2}
    assert monitored.check_alerts("digits", now=T0 + 120) == []  # not repeated while raised
    assert all(a["cleared_at"] is None for a in monitored.alerts("digits", open_only=True))
    # below min_predictions nothing is raised
    monitored.configure("digits", min_predictions=100_000)
    assert monitored.check_alerts("digits", now=T0 + 180) == []
    assert monitored.alerts("digits", open_only=True) == []  # the condition no longer holds: cleared


def _feedback(monitor, version, correct, wrong, now=None, sources=20):
    """Feedback from `sources` addresses in turn: a guardrail weighs no source over its share
    (10 %), so a decision needs at least ten of them (issue 19)."""
    for i in range(correct + wrong):
        monitor.ingest_feedback("digits", {"version": version, "prediction": "1",
                                           "label": "1" if i < correct else "2"}, now=now,
                                source=(f"192.0.2.{i % sources}", ""))


def test_guardrail_rolls_back_a_worse_candidate_with_its_reason(monitored):
    store = monitored.store
    store.set_channel("digits", "stable", 1)
    store.set_channel("digits", "stable", 2, rollout_percent=20)
    monitored.set_guardrails("digits", "stable", ["field_accuracy"])
    _feedback(monitored, 1, 135, 15)   # 90 %
    _feedback(monitored, 2, 50, 20)    # 71 %, but fewer than 100 items: not yet judged
    assert monitored.enforce("digits") == []
    _feedback(monitored, 2, 55, 25)    # 105 / 150 = 70 %
    rolled = monitored.enforce("digits")
    assert len(rolled) == 1 and rolled[0]["metric"] == "field_accuracy" and rolled[0]["p"] < 0.05
    assert (rolled[0]["channel"], rolled[0]["candidate"], rolled[0]["version"]) == ("stable", 2, 1)
    state = store.get_channel("digits", "stable")
    assert (state.version, state.candidate_version) == (1, None)
    last = store.channel_history("digits")[-1]
    assert last["action"] == "rollback" and "guardrail field_accuracy" in last["reason"]
    assert monitored.enforce("digits") == []  # nothing staged any more
    with store._read() as db:  # the rollout is over: its tallies (address pseudonyms) are gone
        assert db.execute("SELECT COUNT(*) FROM guardrail_tallies").fetchone()[0] == 0


def test_guardrail_keeps_an_equal_candidate(monitored):
    store = monitored.store
    store.set_channel("digits", "stable", 1)
    store.set_channel("digits", "stable", 2, rollout_percent=50)
    monitored.set_guardrails("digits", "stable", ["field_accuracy", "error_rate"])
    _feedback(monitored, 1, 170, 30)
    _feedback(monitored, 2, 170, 30)
    assert monitored.enforce("digits") == []
    assert store.get_channel("digits", "stable").candidate_version == 2
    assert store.channel_history("digits")[-1]["reason"] is None


def test_shadow_version_and_agreement(monitored):
    from core.errors import InvalidInput

    store = monitored.store
    with pytest.raises(InvalidInput, match="not set"):
        monitored.set_shadow("digits", "stable", 2)
    store.set_channel("digits", "stable", 1)
    state = monitored.set_shadow("digits", "stable", 2)
    assert state.shadow_version == 2 and store.get_channel("digits", "stable").shadow_version == 2
    assert store.list_channels("digits")["stable"].to_dict()["shadow_version"] == 2
    monitored.ingest_telemetry("digits", {"version": 1, "predictions": 100,
                                          "shadow": {"version": 2, "compared": 100, "agreed": 93,
                                                     "latency_ms": [0, 0, 0, 100] + [0] * 7}}, now=T0)
    shadow = monitored.report("digits")["versions"]["1"]["shadow"]
    assert shadow["version"] == 2 and shadow["agreement"] == 0.93 and 5 <= shadow["latency_ms"]["p50"] <= 10
    store.set_channel("digits", "stable", 2)  # moves keep the shadow
    assert store.get_channel("digits", "stable").shadow_version == 2
    assert monitored.set_shadow("digits", "stable", None).shadow_version is None


# --------------------------------------------------------------------------- the CLI


def test_monitor_cli_report_configure_guardrail_shadow_history(tmp_path, digits, digits_profile):
    from registry import Store
    from registry.monitoring import Monitor
    from tests.conftest import cli_json, run_cli

    home = tmp_path / "home"
    store = Store(home)
    publish_digits(store, digits, digits_profile, versions=2)
    monitor = Monitor(store)
    grid = monitor.grid("digits", 1)
    for body in client_batches(shifted(ordinary(digits)), grid, digits.input_spec(), 1):
        monitor.ingest_telemetry("digits", body)

    report = cli_json("monitor", "digits", home=home)
    assert set(report) >= {"model", "versions", "alerts", "channels"}
    assert report["versions"]["1"]["predictions"] == 300 and report["versions"]["1"]["drift"]["centroid_x"]["alert"]
    assert any(a["kind"] == "drift" for a in report["alerts"])
    table = run_cli("monitor", "digits", home=home, check=True).stdout
    assert "in the field" in table and "ALERT" in table and "alert" in table

    config = cli_json("monitor", "configure", "digits", "--psi", "0.3", "--min-accuracy", "0.8",
                      "--webhook", "http://127.0.0.1:9/hook", "--retrain", "pollinate federate run --rounds 1",
                      home=home)["config"]
    assert config["psi"] == 0.3 and config["min_accuracy"] == 0.8
    assert config["retrain_command"] == ["pollinate", "federate", "run", "--rounds", "1"]
    bad = run_cli("monitor", "configure", "digits", "--js", "2", home=home)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr

    plots = run_cli("monitor", "digits", "--plot", str(tmp_path / "plots"), home=home, check=True)
    assert plots.returncode == 0
    for name in ("volume.png", "field_accuracy.png", "drift_over_time.png", "drift_features.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cli_json("models", "promote", "digits", "1", "--channel", "stable", home=home)
    refused = run_cli("models", "promote", "digits", "2", "--guardrail", "field_accuracy", home=home)
    assert refused.returncode == 2 and "--percent" in refused.stderr
    refused = run_cli("models", "promote", "digits", "2", "--percent", "20", "--guardrail", "speed", home=home)
    assert refused.returncode == 2 and "speed" in refused.stderr
    state = cli_json("models", "promote", "digits", "2", "--percent", "20", "--guardrail", "field_accuracy",
                     home=home)
    assert state["candidate_version"] == 2
    assert Monitor(Store(home)).guardrails("digits")["stable"]["metrics"] == ["field_accuracy"]

    shadow = cli_json("models", "shadow", "digits", "--channel", "stable", "--version", "2", home=home)
    assert shadow["shadow_version"] == 2
    assert run_cli("models", "shadow", "digits", home=home).returncode == 2

    _feedback(monitor, 1, 140, 10)
    _feedback(monitor, 2, 100, 50)
    enforced = run_cli("monitor", "digits", "--enforce", home=home, check=True).stdout
    assert "rolled back" in enforced and "guardrail field_accuracy" in enforced
    history = cli_json("models", "history", "digits", home=home)["history"]
    assert history[-1]["action"] == "rollback" and "guardrail field_accuracy" in history[-1]["reason"]
    assert "guardrail field_accuracy" in run_cli("models", "history", "digits", home=home, check=True).stdout
    assert cli_json("models", "shadow", "digits", "--clear", home=home)["shadow_version"] is None
    assert run_cli("monitor", "nope", home=home).returncode == 2


def test_training_attaches_a_profile_and_models_profile_adds_one(tmp_path):
    """Central training publishes `profile` with the version; `models profile NAME@V` rebuilds
    the training data from the lineage and attaches the same profile to a version without one."""
    from registry import Lineage, Store
    from tests.conftest import cli_json, run_cli

    home = tmp_path / "home"
    cli_json("train", "--dataset", "digits", "--epochs", "1", "--no-export", home=home)
    store = Store(home)
    v1 = store.get_version("digits", 1)
    assert [f.name for f in v1.artifacts["profile"]] == ["profile.json"]
    profile = json.loads(store.artifact_path("digits", 1, "profile", "profile.json").read_text())
    rows = len(__import__("training.datasets", fromlist=["x"]).load_dataset("digits").x_train)
    assert profile["kind"] == "image" and profile["reference"]["rows"] == rows
    assert sum(profile["reference"]["prediction"]["classes"]) == rows

    keras_file = store.artifact_path("digits", 1, "keras", "model.keras")
    store.publish("digits", lineage=Lineage(**v1.lineage.to_dict()), artifacts={"keras": {"model.keras": keras_file}},
                  input_spec=v1.input_spec, labels=v1.labels)
    attached = cli_json("models", "profile", "digits@2", home=home)
    assert attached["version"] == 2 and attached["profile"][0]["name"] == "profile.json"
    again = json.loads(store.artifact_path("digits", 2, "profile", "profile.json").read_text())
    assert again["features"] == profile["features"] and again["reference"]["features"] == profile["reference"]["features"]
    refused = run_cli("models", "profile", "digits@2", home=home)
    assert refused.returncode == 2 and "already has a profile" in refused.stderr


# --------------------------------------------------------------------------- group commit


def test_concurrent_batches_commit_together_and_add_up(monitored, digits):
    """Batches sent at once from many threads are committed by the monitor's one committer,
    many in one transaction: each sender hears only once its group is committed; a refused
    batch in a group is refused alone and the others' counts add up exactly."""
    import threading

    from core.errors import InvalidInput

    spec = digits.input_spec()
    grid = monitored.grid("digits", 1)
    bodies = list(client_batches(ordinary(digits), grid, spec, 1, size=10))
    bad = {"version": 1, "predictions": 1, "features": {"ink_mass": [5] + [0] * 9}}  # counts over predictions
    answers: list = []
    start = threading.Barrier(8)
    groups: list[int] = []
    apply = monitored._apply

    def counting(db, group):
        groups.append(len(group))
        return apply(db, group)

    monitored._apply = counting

    def send(k: int) -> None:
        start.wait()
        for i, body in enumerate(bodies[k::8]):
            try:
                answers.append(monitored.ingest_telemetry("digits", body if i % 3 else bad if k % 2 else body, now=T0))
            except InvalidInput as exc:
                answers.append(exc)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted_bodies = [body for k in range(8) for i, body in enumerate(bodies[k::8]) if i % 3 or k % 2 == 0]
    assert sum(isinstance(a, dict) for a in answers) == len(accepted_bodies)
    assert sum(isinstance(a, InvalidInput) for a in answers) == len(bodies) - len(accepted_bodies) > 0
    v1 = monitored.report("digits")["versions"]["1"]
    assert v1["predictions"] == sum(b["predictions"] for b in accepted_bodies)
    assert v1["batches"] == len(accepted_bodies)
    import sqlite3

    db = sqlite3.connect(monitored.store.db_path)
    stored = dict(db.execute("SELECT bin, count FROM monitor_counts WHERE series = 'feature:centroid_x'"))
    expected = np.sum([b["features"]["centroid_x"] for b in accepted_bodies], axis=0)
    assert [stored.get(i, 0) for i in range(len(expected))] == expected.tolist()
    assert sum(groups) == len(bodies)


def test_a_late_label_in_the_same_group_as_its_batch(monitored):
    """A feedback queued right behind the batch that lists its id (one transaction) joins it;
    a second feedback on that id in the same group is refused."""
    import sqlite3
    import time

    from core.errors import InvalidInput

    groups: list[int] = []
    apply = monitored._apply
    monitored._apply = lambda db, group: groups.append(len(group)) or apply(db, group)
    # another connection holds the write lock: the committer takes a first item and waits for
    # it, and the three below queue up behind it, to be taken as one group
    blocker = sqlite3.connect(monitored.store.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    first = monitored._submit("feedback", "digits", {"version": 1, "prediction": "7", "label": "7"}, T0)
    time.sleep(0.3)
    batch = {"version": 1, "predictions": 1, "recent": [{"id": "g-1", "prediction": "2", "confidence": 0.5}]}
    futures = [monitored._submit("telemetry", "digits", batch, T0),
               monitored._submit("feedback", "digits", {"prediction_id": "g-1", "label": "2"}, T0),
               monitored._submit("feedback", "digits", {"prediction_id": "g-1", "label": "3"}, T0)]
    blocker.execute("ROLLBACK")
    blocker.close()
    assert first.result()["accepted"]
    assert futures[0].result()["accepted"] and futures[1].result()["accepted"]
    with pytest.raises(InvalidInput, match="prediction_id"):
        futures[2].result()
    assert max(groups) >= 3, groups  # read once every future is answered: the group's is applied last
    assert monitored.report("digits")["versions"]["1"]["field_accuracy"]["n"] == 2


def test_an_answered_batch_survives_a_kill(tmp_path, digits, digits_profile):
    """A batch is answered once committed: a process killed (SIGKILL) right after the answer
    loses nothing (WAL with synchronous=NORMAL: the commit is in the log, in the OS's cache)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from registry import Store
    from registry.monitoring import Monitor

    home = tmp_path / "home"
    publish_digits(Store(home), digits, digits_profile)
    script = textwrap.dedent(f"""
        import sys, time
        from registry import Store
        from registry.monitoring import Monitor
        monitor = Monitor(Store({str(home)!r}))
        for i in range(20):
            monitor.ingest_telemetry("digits", {{"version": 1, "predictions": 7, "errors": 1}})
            print(i, flush=True)
        time.sleep(60)
    """)
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root,
                             env={**os.environ, "PYTHONPATH": str(root)})
    try:
        for i in range(20):
            assert child.stdout.readline().strip() == str(i)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    v1 = Monitor(Store(home)).report("digits")["versions"]["1"]
    assert (v1["batches"], v1["predictions"], v1["errors"]) == (20, 140, 20)
