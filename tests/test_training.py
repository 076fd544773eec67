"""Training: datasets, CSV errors, the zoo, reproducibility, and reports that recompute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import InvalidInput
from registry import Store
from training.datasets import load_dataset
from training.datasets.delivery_eta import generate_orders
from training.datasets.tabular import load_csv
from training.stored import load_keras_model

# ---------------------------------------------------------------- datasets


def test_digits_split_is_fixed_stratified_and_scaled():
    first, second = load_dataset("digits"), load_dataset("digits")
    assert first.fingerprint() == second.fingerprint()
    assert first.input_shape == (8, 8, 1)
    assert len(first.x_train) + len(first.x_val) + len(first.x_test) == 1797
    assert first.x_train.min() >= 0.0 and first.x_train.max() <= 1.0
    assert first.preprocessing["scale"] == pytest.approx(1 / 16)
    overall = np.bincount(np.concatenate([first.y_train, first.y_val, first.y_test])) / 1797
    for y in (first.y_train, first.y_val, first.y_test):
        share = np.bincount(y, minlength=10) / len(y)
        assert np.abs(share - overall).max() < 0.02  # every class keeps its share in every split


def test_delivery_eta_is_seeded_and_plausible():
    a, b, c = generate_orders(2000, seed=1), generate_orders(2000, seed=1), generate_orders(2000, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["eta_min"], c["eta_min"])
    assert set(a) == {"distance_km", "hour", "weekday", "city", "prep_time_min", "courier_load", "eta_min"}
    assert a["distance_km"].min() >= 0.2 and a["distance_km"].max() <= 15
    assert set(np.unique(a["hour"])) <= set(range(10, 24))
    assert 15 < a["eta_min"].mean() < 50 and a["eta_min"].min() > 3
    # farther orders take longer: the generator has the structure a model should find
    near, far = a["eta_min"][a["distance_km"] < 1.5], a["eta_min"][a["distance_km"] > 5]
    assert far.mean() > near.mean() + 5
    dataset = load_dataset("delivery-eta")
    assert dataset.task == "regression" and dataset.input_shape == (10,)
    city = [c for c in dataset.preprocessing["columns"] if c["name"] == "city"][0]
    assert city["type"] == "categorical" and len(city["vocabulary"]) == 5


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def mixed_csv(path: Path, rows: int = 60) -> Path:
    rng = np.random.default_rng(0)
    lines = ["size,colour,weight,label,price"]
    for i in range(rows):
        size = rng.uniform(1, 10)
        colour = ["red", "green", "blue"][i % 3]
        label = "big" if size > 5 else "small"
        lines.append(f"{size:.3f},{colour},{rng.uniform(0, 3):.2f},{label},{size * 3 + rng.normal():.2f}")
    return write_csv(path, "\n".join(lines) + "\n")


def test_csv_infers_task_and_encodes_categories(tmp_path):
    path = mixed_csv(tmp_path / "shop.csv")
    classes = load_csv(path, "label")
    assert classes.task == "classification" and classes.labels == ["big", "small"]
    assert classes.preprocessing["features"] == ["size", "weight", "price", "colour=blue", "colour=green", "colour=red"]
    assert classes.x_train.shape[1] == 6 and classes.name == "shop"
    values = load_csv(path, "price")
    assert values.task == "regression" and values.labels is None


@pytest.mark.parametrize(
    "content, target, task, message",
    [
        (None, "label", "auto", "not found"),
        ("", "label", "auto", "empty"),
        ("a,b,label\n", "label", "auto", "no data rows"),
        ("a,b,label\n" + "1,2,x\n" * 20, "nope", "auto", "unknown target column 'nope'"),
        ("a,b,label\n" + "1,2,x\n3,4,y\n" * 10, "label", "regression", "not numeric"),
        ("a,b,label\n" + "1,2,3\n" * 10 + "1,,3\n" + "2,5,4\n" * 10, "label", "auto", "missing or NaN"),
        ("a,b,label\n" + "1,2,3\n" * 10 + "nan,2,3\n" + "2,5,4\n" * 10, "label", "auto", "missing or NaN"),
        ("a,b,label\n1,2,3\n1,2\n", "label", "auto", "2 fields"),
        ("a,b,label\n" + "1,2,x\n" * 20, "label", "auto", "single value"),
    ],
)
def test_csv_errors_are_clear(tmp_path, content, target, task, message):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidInput, match=message):
        load_csv(path, target, task=task)


def test_csv_drop_missing_keeps_clean_rows(tmp_path):
    path = write_csv(tmp_path / "d.csv", "a,b,label\n" + "1,2,3\n2,3,4\n" * 10 + "1,,3\nNaN,1,4\n")
    dataset = load_csv(path, "label", drop_missing=True)
    assert dataset.extra["rows"] == 20


def test_zoo_refuses_a_cnn_on_a_table():
    from training.zoo import build_model

    with pytest.raises(InvalidInput, match="does not apply to tabular"):
        build_model("cnn", load_dataset("delivery-eta"))
    with pytest.raises(InvalidInput, match="unknown model"):
        build_model("transformer", load_dataset("digits"))


# ---------------------------------------------------------------- training + reports


def test_same_seed_trains_the_same_model():
    from training.central import TrainSettings, fit

    dataset = load_dataset("digits")
    weights = []
    for seed in (7, 7, 8):
        model, _ = fit(dataset, TrainSettings(model="mlp", epochs=2, seed=seed))
        weights.append(np.concatenate([w.ravel() for w in model.get_weights()]))
    assert np.array_equal(weights[0], weights[1])
    assert not np.array_equal(weights[0], weights[2])


def _load_report(store: Store, model: str, version: int) -> dict:
    return json.loads(store.artifact_path(model, version, "report", "report.json").read_text())


def test_classification_report_matches_a_recomputation(tmp_path):
    from sklearn import metrics as skm

    from training.central import TrainSettings, train_and_register

    store = Store(tmp_path / "store")
    dataset = load_dataset("digits")
    outcome = train_and_register(store, dataset, TrainSettings(model="cnn", epochs=3, seed=1))
    record = store.get_version("digits", outcome.record.version)
    assert record.lineage.source == "central"
    assert record.lineage.dataset_fingerprint == dataset.fingerprint()
    assert record.lineage.hyperparameters["epochs"] == 3
    assert record.input_spec["shape"] == [8, 8, 1] and record.labels == [str(d) for d in range(10)]
    assert {"report.json", "learning_curves.png", "confusion_matrix.png", "calibration.png"} == {
        f.name for f in record.artifacts["report"]
    }
    for f in record.artifacts["report"]:
        if f.name.endswith(".png"):
            assert store.blob_path(f.sha256).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = _load_report(store, "digits", record.version)
    model = load_keras_model(store, "digits", record.version)
    probabilities = model.predict(dataset.x_test, verbose=0)
    predicted = probabilities.argmax(1)
    test = report["test"]
    assert test["accuracy"] == pytest.approx(skm.accuracy_score(dataset.y_test, predicted))
    assert test["confusion_matrix"] == skm.confusion_matrix(dataset.y_test, predicted, labels=range(10)).tolist()
    precision, recall, _, support = skm.precision_recall_fscore_support(
        dataset.y_test, predicted, labels=range(10), zero_division=0
    )
    assert [c["precision"] for c in test["per_class"]] == pytest.approx(precision)
    assert [c["recall"] for c in test["per_class"]] == pytest.approx(recall)
    assert [c["support"] for c in test["per_class"]] == support.tolist()
    assert test["loss"] == pytest.approx(skm.log_loss(dataset.y_test, probabilities, labels=range(10)), rel=1e-4)
    assert sum(b["count"] for b in test["calibration"]["bins"]) == len(dataset.y_test)
    majority = np.bincount(dataset.y_train).argmax()
    assert report["baseline"]["accuracy"] == pytest.approx((dataset.y_test == majority).mean())
    assert record.metrics["accuracy"] == pytest.approx(test["accuracy"])
    assert len(report["history"]["loss"]) == 3


def test_regression_report_matches_a_recomputation(tmp_path):
    from sklearn import metrics as skm

    from training.central import TrainSettings, train_and_register
    from training.datasets.delivery_eta import load_delivery_eta

    store = Store(tmp_path / "store")
    dataset = load_delivery_eta(n=3000)
    outcome = train_and_register(store, dataset, TrainSettings(model="mlp", epochs=3, seed=0), name="eta-small")
    report = _load_report(store, "eta-small", outcome.record.version)
    assert {f.name for f in outcome.record.artifacts["report"]} >= {"predicted_vs_actual.png", "calibration.png"}
    model = load_keras_model(store, "eta-small", 1)
    predicted = model.predict(dataset.x_test, verbose=0).reshape(-1)
    assert report["test"]["mae"] == pytest.approx(skm.mean_absolute_error(dataset.y_test, predicted), rel=1e-5)
    assert report["test"]["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(dataset.y_test, predicted)), rel=1e-5)
    assert report["test"]["r2"] == pytest.approx(skm.r2_score(dataset.y_test, predicted), abs=1e-5)
    baseline_mae = np.abs(dataset.y_test - dataset.y_train.mean()).mean()
    assert report["baseline"]["mae"] == pytest.approx(baseline_mae, rel=1e-5)
    assert report["mae_reduction"] == pytest.approx(1 - report["test"]["mae"] / baseline_mae, rel=1e-5)
