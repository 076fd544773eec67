"""Publishes multi-MB versions in an endless loop, waiting to be SIGKILLed.

Each iteration publishes a version with two formats of several fresh random files, then
attaches a third format with add_artifacts. The expected shape is written into metrics,
so the test can tell a complete version from a partial one after the kill.
"""

import os
import sys

from registry import Lineage, Store

MB = 1 << 20
PUBLISHED = {"keras": 1, "tflite-float32": 3}  # format -> number of files
ATTACHED = {"tfjs-layers": 2}


def files(count: int, size: int) -> dict[str, bytes]:
    return {f"part{j}.bin": os.urandom(size) for j in range(count)}


def main(home: str, model: str) -> None:
    store = Store(home)
    print("ready", flush=True)
    while True:
        record = store.publish(
            model,
            lineage=Lineage("central"),
            artifacts={fmt: files(n, 3 * MB) for fmt, n in PUBLISHED.items()},
            metrics={"expect": PUBLISHED, "attach": ATTACHED},
        )
        store.add_artifacts(
            model, record.version, {fmt: files(n, 2 * MB) for fmt, n in ATTACHED.items()}
        )
        print(record.version, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
