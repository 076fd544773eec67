"""A SuperNode's own data (`pollinate federate supernode --data FILE`): the file is checked
against the model's input contract before the node connects; good CSV and .npz files are
prepared for training, bad ones stop the command with one `error:` line and exit 2."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from core.errors import InvalidInput
from federated.own_data import input_shape_of, load_own_data, load_prepared, prepare, resolve_contract
from registry import Lineage, Store
from training.datasets import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def contract():
    return resolve_contract("digits")  # no store: the built-in dataset's contract


def _digits_csv(path: Path, dataset, rows: int = 30, *, label: str = "digit", columns: int = 64, cell=None) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"p{i}" for i in range(columns)] + [label])
        for i, (x, y) in enumerate(zip(dataset.x_train[:rows], dataset.y_train[:rows])):
            values = [f"{v:.4f}" for v in x.reshape(-1)[:columns]]
            if cell is not None and i == 3:
                values[5] = cell
            writer.writerow(values + [str(int(y))])
    return path


def _register_digits(home: Path, dataset) -> int:
    """A digits version in the store (its files do not matter here, its input spec does)."""
    scratch = home.parent / "model.keras"
    scratch.write_bytes(b"not a model: only the input spec is read")
    record = Store(home).publish("digits", lineage=Lineage(source="central", extra={"data": {"dataset": "digits"}}),
                                 artifacts={"keras": {"model.keras": scratch}}, input_spec=dataset.input_spec(),
                                 labels=dataset.labels)
    return record.version


# ---------------------------------------------------------------- good files


def test_good_npz_and_csv_are_prepared_for_training(tmp_path, digits, contract):
    npz = tmp_path / "mine.npz"
    np.savez(npz, x=digits.x_train[:40], y=digits.y_train[:40])
    prepared, count = prepare(npz, contract, tmp_path / "prepared")
    assert count == 40
    x, y = load_prepared(str(prepared))
    assert x.shape == (40, 8, 8, 1) and x.dtype == np.float32
    assert np.array_equal(y, digits.y_train[:40])
    assert prepare(npz, contract, tmp_path / "prepared")[0] == prepared  # same data, same file

    # CSV: 64 pixel columns (already scaled) and the dataset's label column; labels by name work too
    x, y = load_own_data(_digits_csv(tmp_path / "mine.csv", digits), contract)
    assert x.shape == (30, 8, 8, 1) and np.allclose(x, digits.x_train[:30], atol=1e-4)
    assert np.array_equal(y, digits.y_train[:30])
    x2, y2 = load_own_data(_digits_csv(tmp_path / "label.csv", digits, label="label"), contract)
    assert np.array_equal(y2, y)


def test_tabular_csv_is_encoded_with_the_models_vocabulary(tmp_path):
    from training.datasets.delivery_eta import generate_orders

    tabular = resolve_contract("delivery-eta")
    assert not tabular.classification and tabular.target == "eta_min"
    orders = generate_orders(25, seed=5)
    path = tmp_path / "orders.csv"
    names = list(orders)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["order_id", *names])  # an extra column is ignored
        for i in range(25):
            writer.writerow([f"o{i}", *[orders[n][i] for n in names]])
    x, y = load_own_data(path, tabular)
    assert x.shape == (25, *tabular.shape) and np.isfinite(x).all()
    assert np.allclose(y, orders["eta_min"].astype(np.float32))
    city = tabular.preprocessing["columns"][-1]  # numeric columns first, then the one-hot blocks
    assert city["name"] == "city" and city["type"] == "categorical"
    assert np.array_equal(x[:, -len(city["vocabulary"]):].sum(axis=1), np.ones(25))

    (tmp_path / "short.csv").write_text("distance_km,eta_min\n1.5,20\n")
    with pytest.raises(InvalidInput, match="lacks the model's column"):
        load_own_data(tmp_path / "short.csv", tabular)


def test_the_contract_comes_from_the_store_or_a_server(tmp_path, digits):
    from server_helpers.live import LiveServer

    home = tmp_path / "store"
    version = _register_digits(home, digits)
    stored = resolve_contract("digits", home=home)
    assert stored.source == f"digits v{version}" and stored.shape == (8, 8, 1) and stored.target == "digit"
    with LiveServer(home, log=tmp_path / "server.log") as server:
        remote = resolve_contract("digits", server=server.url, version=version)
        assert remote.shape == stored.shape and remote.labels == stored.labels and server.url in remote.source
        with pytest.raises(Exception, match="no model 'nothing'"):
            resolve_contract("nothing", server=server.url)


def test_the_cli_checks_before_connecting(tmp_path, digits):
    """--check stops after the check; without it the node would connect (not tested here)."""
    home = tmp_path / "store"
    npz = tmp_path / "mine.npz"
    np.savez(npz, x=digits.x_train[:20], y=digits.y_train[:20])
    result = run_cli("federate", "supernode", "--data", str(npz), "--check", home=home)
    assert result.returncode == 0, result.stderr
    assert "own data: 20 examples" in result.stdout and "digits" in result.stdout
    good_csv = _digits_csv(tmp_path / "mine.csv", digits)
    result = run_cli("federate", "supernode", "--data", str(good_csv), "--check", home=home)
    assert result.returncode == 0 and "own data: 30 examples" in result.stdout, result.stderr


# ---------------------------------------------------------------- bad files


def _bad_files(folder: Path, dataset) -> dict[str, tuple[Path, str]]:
    x, y = dataset.x_train[:20], dataset.y_train[:20]
    files = {}

    def npz(name: str, message: str, **arrays) -> None:
        np.savez(folder / name, **arrays)
        files[name] = (folder / name, message)

    npz("no-labels.npz", "no array y", x=x)
    npz("flat.npz", "reshape each row to [8, 8, 1]", x=x.reshape(20, -1), y=y)
    npz("wrong-shape.npz", "x has shape [20, 4, 4, 1]", x=x[:, :4, :4], y=y)
    npz("raw-pixels.npz", "apply its preprocessing", x=x * 16, y=y)
    npz("nan.npz", "NaN", x=np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y=y)
    npz("label-range.npz", "label '12' is not one of the model's 10 classes", x=x, y=np.where(np.arange(20) == 4, 12, y))
    npz("length.npz", "one label per example", x=x, y=y[:10])
    npz("text-x.npz", "x must hold numbers", x=np.array([["a"] * 4] * 20), y=y)
    files["63-columns.csv"] = (_digits_csv(folder / "63-columns.csv", dataset, columns=63), "has 63 input column(s)")
    files["no-label.csv"] = (_digits_csv(folder / "no-label.csv", dataset, label="class"), "no label column")
    files["text-cell.csv"] = (_digits_csv(folder / "text-cell.csv", dataset, cell="dark"), "'dark' is not a number")
    (folder / "broken.npz").write_bytes(b"this is not a zip archive")
    files["broken.npz"] = (folder / "broken.npz", "not a readable .npz")
    (folder / "data.txt").write_text("1,2,3\n")
    files["data.txt"] = (folder / "data.txt", "must be a .csv")
    (folder / "header-only.csv").write_text("p0,p1,digit\n")
    files["header-only.csv"] = (folder / "header-only.csv", "at least one data row")
    files["missing.npz"] = (folder / "missing.npz", "data file not found")
    return files


def test_bad_files_are_refused_with_what_is_wrong(tmp_path, digits, contract):
    for name, (path, message) in _bad_files(tmp_path, digits).items():
        with pytest.raises(InvalidInput, match=None) as caught:
            load_own_data(path, contract)
        assert message in str(caught.value), (name, str(caught.value))
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["raw-pixels.npz", "label-range.npz", "63-columns.csv", "broken.npz", "data.txt"])
def test_bad_files_stop_the_cli_with_one_error_line(tmp_path, digits, name):
    path, message = _bad_files(tmp_path, digits)[name]
    result = run_cli("federate", "supernode", "--data", str(path), "--superlink", "127.0.0.1:9", home=tmp_path / "store")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "store" / "flower" / "nodes").exists()  # nothing prepared, no node started


def test_supernode_modes_are_exclusive(tmp_path):
    result = run_cli("federate", "supernode", "--gateway", "gw", "--partition-id", "0", "--num-partitions", "2",
                     home=tmp_path / "store")
    assert result.returncode == 2 and "give one of" in result.stderr
    result = run_cli("federate", "supernode", "--gateway", "bad name!", home=tmp_path / "store")
    assert result.returncode == 2 and "gateway name" in result.stderr


def test_prepared_data_must_fit_the_rounds_model(tmp_path, digits, contract):
    prepared, _ = prepare(_digits_csv(tmp_path / "mine.csv", digits), contract, tmp_path / "prepared")
    architecture = '{"class_name": "Functional", "config": {"layers": [{"class_name": "InputLayer", "config": {"batch_shape": [null, 8, 8, 1]}}]}}'
    assert input_shape_of(architecture) == (8, 8, 1)
    load_prepared(str(prepared), architecture)
    with pytest.raises(InvalidInput, match="model takes"):
        load_prepared(str(prepared), architecture.replace("8, 8, 1", "64"))
