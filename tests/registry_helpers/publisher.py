"""Publishes N small versions as soon as the go-file appears, then prints their numbers.

Spawned several at once by tests/test_registry.py to race real processes on one store.
"""

import json
import sys
import time
from pathlib import Path

from registry import Lineage, Store


def main(home: str, model: str, count: int, go_file: str, tag: str) -> None:
    store = Store(home)
    print("ready", flush=True)
    while not Path(go_file).exists():
        time.sleep(0.005)
    versions = []
    for i in range(count):
        record = store.publish(
            model,
            lineage=Lineage("central", extra={"writer": tag, "i": i}),
            artifacts={
                "keras": {"model.keras": f"{tag}-{i}-keras".encode() * 200},
                "tfjs-layers": {
                    "model.json": f'{{"writer": "{tag}", "i": {i}}}'.encode(),
                    "group1-shard1of1.bin": f"{tag}-{i}-bin".encode() * 500,
                },
            },
        )
        versions.append(record.version)
    print(json.dumps(versions), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
