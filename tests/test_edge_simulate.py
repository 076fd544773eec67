"""`pollinate federate simulate --edge-browsers N --edge-devices M`: Flower's simulation engine
with a gateway node beside the ordinary clients, a real `pollinate serve` on loopback over the
same store, simulated browsers (web_client/tools/fleet.mjs: TF.js in Node) and TFLite devices
(the reference device client's interpreter), one of them late. The published versions count
the edge updates, the late one is refused as stale and counted, and nothing is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, processes_naming

from registry import Store


@pytest.fixture(scope="module")
def start_store(tmp_path_factory) -> Path:
    """A small digits model (an MLP, 16 units) with the files devices train: tfjs-layers for
    browsers, tflite-train for phones."""
    from export.pipeline import ExportOptions, export_version
    from training.central import TrainSettings, train_and_register
    from training.datasets import load_dataset

    home = tmp_path_factory.mktemp("edge-sim") / "template"
    store = Store(home)
    train_and_register(store, load_dataset("digits"), TrainSettings(model="mlp", epochs=3, width=16))
    export_version(store, "digits", 1, options=ExportOptions(formats=("tfjs-layers", "tflite-train"),
                                                              tfjs_backends=("cpu",), latency_repeats=1))
    return home


def _simulate(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("POLLINATE_HOME", None)
    return subprocess.run([sys.executable, "-m", "pollinate", "federate", "simulate", "--dataset", "digits",
                           *args, "--home", str(home)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_simulation_with_browsers_and_tflite_devices_counts_their_updates(tmp_path, start_store):
    import shutil

    from registry.edge import EdgeStore

    home = tmp_path / "store"
    shutil.copytree(start_store, home)
    result = _simulate(home, "--from", "digits@1", "--clients", "2", "--rounds", "2", "--edge-gateways", "1",
                       "--edge-browsers", "2", "--edge-devices", "2", "--edge-behaviour", "browser-1=late",
                       "--min-updates", "3", "--round-deadline", "240", "--formats", "", "--json")
    # (the gateway answers at 3 updates; the long deadline only matters on a loaded machine)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout)
    versions = [v for v in Store(home).list_versions("digits") if v.lineage.source == "federated"]
    assert [v.lineage.round for v in versions] == [1, 2] and summary["versions"] == [2, 3]
    for version in versions:
        edge = version.lineage.extra["edge"]
        # the late browser is not in: one browser and both phones per round, through the one gateway
        assert edge["updates"] == 3 and edge["devices"] == 3
        assert edge["gateways"]["sim-gw-0"]["kinds"] == {"browser": 1, "phone": 2}
        assert version.lineage.extra["failed"] == 0
    assert [r["edge_updates"] for r in summary["rounds"]] == [3, 3]
    # the progress lines count them
    for n in (1, 2):
        assert f"round {n}/2: " in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("edge: 3 updates from 3 devices") == 2, result.stderr[-3000:]
    assert [sorted(r["clients"]) for r in summary["rounds"]] == [[0, 1], [0, 1]]  # the own-data clients trained too
    kinds = summary["edge"]["kinds"]
    assert kinds["browser"]["statuses"] == {"accepted": 2, "stale": 2}  # browser-1 was late both rounds
    assert kinds["tflite"]["statuses"] == {"accepted": 4}
    for kind in ("browser", "tflite"):
        assert kinds[kind]["train_seconds_mean"] > 0 and kinds[kind]["bytes_up_mean"] > 0
        assert kinds[kind]["bytes_down_mean"] > kinds[kind]["bytes_up_mean"]  # model files and base weights came down
    assert summary["edge"]["errors"] == []
    status = EdgeStore(Store(home)).status("digits")
    assert status["refused_total"] == {"stale": 2}  # the server counted the late posts as stale
    events = json.loads(Path(summary["files"]["edge-updates.json"]).read_text())
    late = [e for e in events if e["device"] == "browser-1"]
    assert [(e["round"], e["status"], e["behaviour"]) for e in late] == [(1, "stale", "late"), (2, "stale", "late")]
    assert processes_naming(home) == []  # serve, the fleet, the SuperLink and Flower's helpers are gone


def test_edge_simulation_options_are_checked_in_one_line(tmp_path):
    for args, message in [
        (["--edge-browsers", "1", "--from-scratch"], "--from"),
        (["--edge-devices", "1", "--edge-gateways", "0"], "--edge-gateways"),
        (["--edge-browsers", "1", "--edge-behaviour", "phone-9=late"], "no device"),
        (["--edge-browsers", "1", "--edge-behaviour", "browser-0=sleepy"], "behaviour must be one of"),
        (["--edge-browsers", "1", "--edge-late", "0.7", "--edge-drop", "0.7"], "at most 1"),
        (["--edge-late", "0.1"], "need --edge-browsers or --edge-devices"),
    ]:
        result = _simulate(tmp_path / "store", *args, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)
