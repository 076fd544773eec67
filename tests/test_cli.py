"""The `pollinate` console script, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_json, run_cli

from registry import Store


def test_help_is_fast_and_does_not_import_tensorflow():
    probe = "import sys, pollinate.cli; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.split() == ["False", "False"]
    started = time.perf_counter()
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "models" in result.stdout
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--csv", "missing.csv", "--target", "y"], "CSV file not found"),
        (["--csv", "{empty}", "--target", "y"], "is empty"),
        (["--csv", "{good}", "--target", "nope"], "unknown target column 'nope'"),
        (["--csv", "{good}", "--target", "colour", "--task", "regression"], "not numeric"),
        (["--csv", "{nan}", "--target", "y"], "missing or NaN"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--dataset", "delivery-eta", "--model", "cnn"], "does not apply to tabular"),
        (["--dataset", "digits", "--epochs", "0"], "--epochs must be at least 1"),
        (["--dataset", "digits", "--name", "Bad Name!"], "model name"),
    ],
)
def test_bad_training_input_is_one_line_and_stores_nothing(tmp_path, home, args, message):
    files = {
        "{empty}": tmp_path / "empty.csv",
        "{good}": tmp_path / "good.csv",
        "{nan}": tmp_path / "nan.csv",
    }
    files["{empty}"].write_text("")
    files["{good}"].write_text("x,colour,y\n" + "".join(f"{i},{'rb'[i % 2]},{i * 2}\n" for i in range(30)))
    files["{nan}"].write_text("x,y\n" + "".join(f"{i},{i}\n" for i in range(20)) + "3,nan\n")
    args = [str(files.get(a, a)) for a in args]
    result = run_cli("train", *args, home=home)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not home.exists() or Store(home).list_models() == []


@pytest.mark.slow
def test_digits_cnn_reaches_95_percent_in_15_epochs(home):
    started = time.perf_counter()
    summary = cli_json("train", "--dataset", "digits", "--model", "cnn", "--epochs", "15", home=home)
    elapsed = time.perf_counter() - started
    assert summary["model"] == "digits" and summary["version"] == 1
    assert summary["metrics"]["accuracy"] >= 0.95
    assert summary["baseline"]["accuracy"] == pytest.approx(0.10, abs=0.02)
    assert elapsed < 120
    assert set(summary["artifacts"]) >= {"keras", "report"}


@pytest.mark.slow
def test_delivery_eta_beats_the_mean_by_30_percent(home):
    summary = cli_json("train", "--dataset", "delivery-eta", "--epochs", "10", home=home)
    assert summary["model"] == "delivery-eta"
    assert summary["metrics"]["mae"] <= 0.7 * summary["baseline"]["mae"]


@pytest.mark.slow
def test_csv_training_and_the_models_commands(tmp_path, home):
    csv = tmp_path / "fruit.csv"
    rows = ["weight,colour,kind"] + [
        f"{100 + (i % 7) * 20 + (40 if i % 2 else 0)},{'red' if i % 2 else 'green'},{'apple' if i % 2 else 'pear'}"
        for i in range(80)
    ]
    csv.write_text("\n".join(rows) + "\n")
    first = cli_json("train", "--csv", str(csv), "--target", "kind", "--epochs", "3", home=home)
    second = cli_json("train", "--csv", str(csv), "--target", "kind", "--epochs", "3", home=home)
    assert (first["model"], first["version"], second["version"]) == ("fruit", 1, 2)

    listed = cli_json("models", "list", home=home)["models"]
    assert [(m["name"], m["latest_version"]) for m in listed] == [("fruit", 2)]
    shown = cli_json("models", "show", "fruit", "--version", "1", home=home)
    assert shown["version"] == 1 and shown["labels"] == ["apple", "pear"]
    assert shown["input_spec"]["preprocessing"]["features"] == ["weight", "colour=green", "colour=red"]

    assert cli_json("models", "promote", "fruit", "1", "--channel", "stable", home=home)["version"] == 1
    staged = cli_json("models", "promote", "fruit", "2", "--channel", "stable", "--percent", "25", home=home)
    assert (staged["version"], staged["candidate_version"], staged["rollout_percent"]) == (1, 2, 25)
    back = cli_json("models", "rollback", "fruit", "--channel", "stable", home=home)
    assert (back["version"], back["candidate_version"]) == (1, None)
    moves = cli_json("models", "history", "fruit", home=home)["history"]
    assert [m["action"] for m in moves] == ["promote", "rollout", "rollback"]

    copied = cli_json("models", "files", "fruit", "--format", "report", "--out", str(tmp_path / "out"), home=home)
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["dataset"]["name"] == "fruit" and len(copied["files"]) >= 3

    human = run_cli("models", "show", "fruit", home=home, check=True).stdout
    assert "fruit v2" in human and "central" in human

    bad = run_cli("models", "promote", "fruit", "9", "--channel", "stable", home=home)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    bad = run_cli("models", "promote", "fruit", "1", "--channel", "Stable!", home=home)
    assert bad.returncode == 2 and "channel" in bad.stderr
    bad = run_cli("models", "show", "nothing", home=home)
    assert bad.returncode == 2 and "nothing" in bad.stderr


@pytest.mark.slow
def test_demo_trains_exports_federates_and_points_channels(home):
    summary = cli_json("demo", "--epochs", "5", "--rounds", "1", "--clients", "3", "--no-serve", home=home)
    assert summary["training"]["model"] == "digits"
    assert summary["channels"]["stable"]["version"] == summary["training"]["version"]
    assert summary["federation"]["versions"] == [summary["training"]["version"] + 1]
    assert summary["channels"]["canary"]["version"] == summary["federation"]["versions"][0]
    assert "tfjs-layers" in summary["training"]["artifacts"]


def test_models_show_says_who_contributed_to_a_federated_round(tmp_path):
    """A federated version names its Flower clients, edge updates (devices, gateways) and own-data nodes."""
    from registry import Lineage

    home = tmp_path / "home"
    extra = {"clients": [0, 1, "gw-a"], "examples": 420, "rejected": 1,
             "edge": {"updates": 7, "devices": 6, "examples": 210, "gateways": {"gw-a": {"updates": 7}}},
             "own_data": {"nodes": 2, "examples": 150}}
    Store(home).publish("fed", lineage=Lineage("federated", round=3, extra=extra),
                        artifacts={"keras": {"model.keras": b"k"}})
    human = run_cli("models", "show", "fed", home=home, check=True).stdout
    line = next(line for line in human.splitlines() if line.startswith("clients"))
    assert "3 Flower client(s), 420 examples" in line
    assert "7 edge update(s) from 6 device(s), 210 examples, via 1 gateway(s)" in line
    assert "2 own-data node(s), 150 examples" in line and "1 rejected" in line


def test_quiet_stderr_from_interleaved_threads_gives_stderr_back():
    """Device threads create TFLite interpreters (quietly) while the main thread prints
    progress: one thread entering while another is inside must not leave fd 2 at /dev/null."""
    import os
    import threading

    from core.tensorflow import quiet_stderr

    before = os.fstat(2)
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()

    def a():
        with quiet_stderr():
            a_inside.set()
            b_inside.wait(5)
        a_left.set()

    def b():
        a_inside.wait(5)
        with quiet_stderr():
            b_inside.set()
            a_left.wait(5)
            assert os.fstat(2).st_ino != before.st_ino  # still quiet: b is inside

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
