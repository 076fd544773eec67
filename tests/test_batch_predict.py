"""`pollinate predict`: batch predictions with a version's shipped TFLite float32 file.

Real models (delivery-eta twice, digits once) trained by the real `pollinate train`, the real
console script in a subprocess, and per-row LiteRT as the reference."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_json, run_cli

from registry import Lineage, Store
from registry.inputs import encode_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """delivery-eta v1 and v2 (two seeds), digits v1, and eta-strict v1: delivery-eta v1's
    files with a spec that refuses unknown categories (as specs written before that rule do)."""
    home = tmp_path_factory.mktemp("predict") / "store"
    cli_json("train", "--dataset", "delivery-eta", "--epochs", "1", home=home)
    cli_json("train", "--dataset", "delivery-eta", "--epochs", "1", "--seed", "1", home=home)
    cli_json("train", "--dataset", "digits", "--model", "cnn", "--epochs", "1", home=home)
    store = Store(home)
    eta = store.get_version("delivery-eta", 1)
    spec = json.loads(json.dumps(eta.input_spec))
    spec["preprocessing"].pop("unknown_category")
    tflite = store.artifact_path("delivery-eta", 1, "tflite-float32", "model.tflite")
    store.publish("eta-strict", lineage=Lineage("central"), artifacts={"tflite-float32": {"model.tflite": tflite}},
                  metrics={}, input_spec=spec, labels=None)
    return home


def per_row(home: Path, model: str, version: int, x: np.ndarray) -> np.ndarray:
    """The reference: the stored tflite-float32 file, one row per invoke (what a phone does)."""
    from ai_edge_litert.interpreter import Interpreter

    path = Store(home).artifact_path(model, version, "tflite-float32", "model.tflite")
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    given = interpreter.get_input_details()[0]["index"]
    taken = interpreter.get_output_details()[0]["index"]
    outputs = []
    for row in x:
        interpreter.set_tensor(given, np.asarray(row[np.newaxis], dtype=np.float32))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(taken)[0].copy())
    return np.asarray(outputs).reshape(len(x), -1)


def orders(n: int, seed: int) -> list[dict]:
    from training.datasets.delivery_eta import generate_orders

    table = generate_orders(n, seed=seed)
    table.pop("eta_min")
    return [{k: str(v[i]) for k, v in table.items()} for i in range(n)]


def write_rows(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_a_csv_equals_per_row_litert_in_the_input_order(tmp_path, home):
    rows = orders(700, seed=11)
    for i, row in enumerate(rows):
        row["order_id"] = f"o{i}"  # a column the model does not take: ignored, said so
    rows[650]["city"] = "Zürich, CH"  # an unknown category: this spec says all-zero; quoted in the file
    columns = ["order_id", "city", "courier_load", "hour", "distance_km", "weekday", "prep_time_min"]
    source = write_rows(tmp_path / "orders.csv", rows, columns)
    text = source.read_text()
    lines = text.splitlines(keepends=True)
    source.write_text("".join(lines[:300]) + "\n" + "".join(lines[300:]))  # a blank line: no row

    out = tmp_path / "eta.csv"
    summary = cli_json("predict", "delivery-eta", "--input", str(source), "--out", str(out),
                       "--batch-size", "64", "--chunk-lines", "128", home=home)
    assert (summary["rows"], summary["version"], summary["columns"]) == (700, 2, ["eta_min"])
    assert summary["ignored_columns"] == ["order_id"] and summary["rows_per_second"] > 0

    spec = Store(home).get_version("delivery-eta", 2).input_spec
    model_rows = [{k: v for k, v in row.items() if k != "order_id"} for row in rows]
    expected = per_row(home, "delivery-eta", 2, encode_rows(model_rows, spec))
    header, got = read_csv(out)
    assert header == ["eta_min"] and len(got) == 700
    assert np.abs(np.asarray(got, dtype=np.float64) - expected).max() <= 1e-5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left

    in_workers = tmp_path / "workers.csv"  # two spawned worker processes, the same bytes in the same order
    summary = cli_json("predict", "delivery-eta", "--input", str(source), "--out", str(in_workers),
                       "--batch-size", "64", "--chunk-lines", "128", "--processes", "2", home=home)
    assert summary["processes"] == 2 and in_workers.read_bytes() == out.read_bytes()

    as_array = tmp_path / "eta.npy"
    cli_json("predict", "delivery-eta", "--input", str(source), "--out", str(as_array), home=home)
    assert np.abs(np.load(as_array) - expected).max() <= 1e-5


def test_digits_from_npy_and_npz(tmp_path, home):
    from sklearn.datasets import load_digits

    x = (load_digits().images[:300] / 16.0).astype(np.float32)[..., np.newaxis]  # model inputs
    np.save(tmp_path / "digits.npy", x)
    np.savez(tmp_path / "digits.npz", x=x)
    expected = per_row(home, "digits", 1, x)

    summary = cli_json("predict", "digits", "--input", str(tmp_path / "digits.npy"), "--out", str(tmp_path / "p.npy"),
                       "--batch-size", "64", "--threads", "1", home=home)
    assert (summary["rows"], summary["threads"], summary["batch_size"]) == (300, 1, 64)
    assert np.abs(np.load(tmp_path / "p.npy") - expected).max() <= 1e-5

    cli_json("predict", "digits", "--input", str(tmp_path / "digits.npz"), "--out", str(tmp_path / "p.csv"), home=home)
    header, got = read_csv(tmp_path / "p.csv")
    labels = Store(home).get_version("digits", 1).labels
    assert header == [f"p_{label}" for label in labels] + ["prediction"]
    probabilities = np.asarray([row[:-1] for row in got], dtype=np.float64)
    assert np.abs(probabilities - expected).max() <= 1e-5
    assert [row[-1] for row in got] == [labels[i] for i in expected.argmax(axis=1)]


def test_an_npy_streams_into_its_npy_and_a_late_bad_row_leaves_nothing(tmp_path, home):
    """.npy → .npy: the header goes first and each chunk is appended as it finishes (batch 64:
    chunks of 1,024 rows, the last one short); a non-finite row in the third chunk, after two
    were written, still leaves neither the output nor a temporary file."""
    spec = Store(home).get_version("delivery-eta", 1).input_spec
    x = encode_rows(orders(2500, seed=3), spec)
    source = tmp_path / "x.npy"
    np.save(source, x)
    out = tmp_path / "y.npy"
    summary = cli_json("predict", "delivery-eta", "--version", "1", "--input", str(source), "--out", str(out),
                       "--batch-size", "64", home=home)
    assert summary["rows"] == 2500
    y = np.load(out, allow_pickle=False)
    assert y.shape == (2500, 1) and y.dtype == np.float32
    assert np.abs(y - per_row(home, "delivery-eta", 1, x)).max() <= 1e-5
    assert out.stat().st_size == np.lib.format.open_memmap(out, mode="r").offset + y.nbytes  # nothing after the rows

    x[2100, 2] = np.nan
    np.save(source, x)
    out.unlink()
    result = run_cli("predict", "delivery-eta", "--version", "1", "--input", str(source), "--out", str(out),
                     "--batch-size", "64", home=home)
    assert result.returncode == 2 and "x.npy" in result.stderr and "[2100, 2]" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_channel_follows_the_channel(tmp_path, home):
    rows = orders(50, seed=3)
    source = write_rows(tmp_path / "rows.csv", rows, list(rows[0]))
    spec = Store(home).get_version("delivery-eta", 1).input_spec
    x = encode_rows(rows, spec)
    for version in (1, 2, 1):
        cli_json("models", "promote", "delivery-eta", str(version), "--channel", "canary", home=home)
        out = tmp_path / f"v{version}.npy"
        summary = cli_json("predict", "delivery-eta", "--channel", "canary", "--input", str(source), "--out", str(out),
                           home=home)
        assert summary["version"] == version and "canary" in summary["chosen"]
        assert np.abs(np.load(out) - per_row(home, "delivery-eta", version, x)).max() <= 1e-5
    assert not np.allclose(np.load(tmp_path / "v1.npy"), np.load(tmp_path / "v2.npy"))
    by_version = cli_json("predict", "delivery-eta", "--version", "2", "--input", str(source),
                          "--out", str(tmp_path / "v.npy"), home=home)
    assert by_version["version"] == 2


@pytest.mark.parametrize("case", ["missing column", "text in a number column", "unknown category",
                                  "too many fields", "non-finite", "digits of the wrong shape"])
def test_a_bad_row_is_one_error_line_exit_2_and_nothing_written(tmp_path, home, case):
    rows = orders(600, seed=5)
    columns = list(rows[0])
    model = "delivery-eta"
    if case == "missing column":
        columns.remove("courier_load")
        want = ["line 1", "'courier_load'"]
    elif case == "text in a number column":
        rows[520]["hour"] = "noon"  # data row 521, line 522: after four chunks of 128 went through
        want = ["line 522", "data row 521", "'hour'", "'noon'"]
    elif case == "unknown category":
        model = "eta-strict"
        rows[9]["city"] = "paris"
        want = ["line 11", "data row 10", "'city'", "unknown category 'paris'"]
    elif case == "too many fields":
        want = ["line 401", "data row 400", "fields"]
    elif case == "non-finite":
        rows[599]["distance_km"] = "nan"
        want = ["line 601", "'distance_km'", "finite"]
    source = write_rows(tmp_path / "rows.csv", rows, columns)
    if case == "too many fields":
        lines = source.read_text().splitlines()
        lines[400] += ",7"
        source.write_text("\n".join(lines) + "\n")
    if case == "digits of the wrong shape":
        model = "digits"
        source = tmp_path / "flat.npy"
        np.save(source, np.zeros((10, 64), np.float32))
        want = ["shape [10, 64]", "[N, 8, 8, 1]"]

    out = tmp_path / "out.csv"
    result = run_cli("predict", model, "--input", str(source), "--out", str(out), "--batch-size", "64", "--chunk-lines", "128", home=home)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in want:
        assert part in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nor a temporary file
    if source.suffix == ".csv" and case != "missing column":  # worker processes refuse the same row the same way
        again = run_cli("predict", model, "--input", str(source), "--out", str(out), "--batch-size", "64", "--chunk-lines", "128",
                        "--processes", "2", home=home)
        assert again.returncode == 2 and again.stderr.strip() == lines[0], again.stderr
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_arguments_exit_2(tmp_path, home):
    source = write_rows(tmp_path / "rows.csv", orders(5, seed=1), list(orders(1, seed=1)[0]))
    cases = [
        (["nope", "--input", str(source), "--out", str(tmp_path / "o.csv")], "nope"),
        (["delivery-eta", "--input", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "o.csv")], "not found"),
        (["delivery-eta", "--input", str(source), "--out", str(tmp_path / "o.json")], ".csv or .npy"),
        (["delivery-eta", "--version", "1", "--channel", "stable", "--input", str(source), "--out", str(tmp_path / "o.csv")],
         "not both"),
        (["delivery-eta", "--channel", "nightly", "--input", str(source), "--out", str(tmp_path / "o.csv")], "nightly"),
        (["digits", "--input", str(source), "--out", str(tmp_path / "o.csv")], "not table rows"),
    ]
    for args, part in cases:
        result = run_cli("predict", *args, home=home)
        assert result.returncode == 2 and part in result.stderr, (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]


def test_predict_never_imports_tensorflow(tmp_path, home):
    source = write_rows(tmp_path / "rows.csv", orders(20, seed=2), list(orders(1, seed=2)[0]))
    import os
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "-X", "importtime", "-m", "pollinate", "predict", "delivery-eta", "--input", str(source),
               "--out", str(tmp_path / "o.csv"), "--home", str(home)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "POLLINATE_HOME": ""})
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "ai_edge_litert" in imported and "numpy" in imported
    assert not imported & {"tensorflow", "keras", "tf_keras", "jax"}

    np.save(tmp_path / "x.npy", encode_rows(orders(20, seed=2), Store(home).get_version("delivery-eta").input_spec))
    command[command.index("--input") + 1] = str(tmp_path / "x.npy")
    command[command.index("--out") + 1] = str(tmp_path / "o.npy")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "POLLINATE_HOME": ""})
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "ai_edge_litert" in imported and "pandas" not in imported  # pandas (~0.2 s) is for CSV input only


def test_the_benchmark_function_runs(tmp_path, home):
    from export.batch_predict import bench

    result = bench(home, 5000, version=1, repeats=1, folder=tmp_path)
    assert result["rows"] == 5000 and result["max_abs_diff_vs_per_row_litert"] <= 1e-5
    assert set(result["rows_per_second"]) >= {"bare", "bare_script", "npy", "cli_npy", "csv", "script_csv"}
    assert {"npy_vs_bare", "cli_npy_vs_bare_script", "csv_vs_script"} <= set(result)  # the like-for-like ratios
    shutil.rmtree(tmp_path, ignore_errors=True)
