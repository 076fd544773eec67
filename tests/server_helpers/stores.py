"""Stores filled with small, real files (no TensorFlow): what the server tests download.

Every format a version can have is here, with the file names the exporter and the
trainer write, so content types, entry files and gzip are exercised on realistic names.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from registry import Lineage, Store

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def model_json(seed: int, shards: list[str]) -> bytes:
    """A TF.js-shaped model.json, a few KB so that gzip applies."""
    layers = [{"class_name": "Dense", "config": {"name": f"dense_{i}", "units": 32 + i, "activation": "relu"}}
              for i in range(40)]
    return json.dumps({
        "format": "layers-model",
        "generatedBy": f"test seed {seed}",
        "modelTopology": {"model_config": {"class_name": "Sequential", "config": {"layers": layers}}},
        "weightsManifest": [{"paths": shards, "weights": [{"name": "w", "shape": [8], "dtype": "float32"}]}],
    }).encode()


def version_files(seed: int, shard_bytes: tuple[int, ...] = (300_000, 1_500_000)) -> dict[str, dict[str, bytes]]:
    """Files of one version: distinct bytes per seed, so every version has its own blobs."""
    rng = random.Random(seed)
    shards = {f"group1-shard{i + 1}of{len(shard_bytes)}.bin": rng.randbytes(n) for i, n in enumerate(shard_bytes)}
    return {
        "tfjs-layers": {"model.json": model_json(seed, sorted(shards)), **shards},
        "tflite-int8": {"model.tflite": rng.randbytes(10_000)},
        "tflite-float32": {"model.tflite": rng.randbytes(20_000)},
        "keras": {"model.keras": rng.randbytes(5_000)},
        "report": {"report.json": json.dumps({"accuracy": 0.9, "seed": seed, "pad": "x" * 2000}).encode(),
                   "confusion.png": PNG + rng.randbytes(100)},
        "export-report": {"export-report.json": json.dumps({"parity": 1e-7, "seed": seed}).encode(),
                          "export-report.md": b"# Export report\n\n" + b"| format | ok |\n" * 100},
        "misc": {"a b#c?.bin": rng.randbytes(1000)},
    }


def publish(store: Store, model: str, seed: int, **kwargs) -> dict:
    """Publish one version; returns {"version", "files": {(fmt, name): bytes}}."""
    files = kwargs.pop("files", None) or version_files(seed)
    record = store.publish(
        model,
        lineage=Lineage("central", hyperparameters={"seed": seed}),
        artifacts=files,
        metrics={"accuracy": 0.9 + seed / 1000},
        input_spec={"shape": [8, 8, 1], "dtype": "float32", "preprocessing": {"kind": "scale", "divide_by": 16}},
        labels=[str(i) for i in range(10)],
        **kwargs,
    )
    return {"version": record.version, "files": {(f, n): b for f, names in files.items() for n, b in names.items()}}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fill(home: Path) -> dict:
    """digits v1, v2 (stable → v1); eta v1 (no channel); rollout v1, v2 (for cohorts)."""
    store = Store(home)
    published = {
        "digits": [publish(store, "digits", 1), publish(store, "digits", 2)],
        "eta": [publish(store, "eta", 3)],
        "rollout": [publish(store, "rollout", 4, files={"tflite-int8": {"model.tflite": b"one"}}),
                    publish(store, "rollout", 5, files={"tflite-int8": {"model.tflite": b"two"}})],
    }
    store.set_channel("digits", "stable", 1)
    store.set_channel("rollout", "stable", 1)
    return published
