"""Lists versions in a loop while writers publish, checking each one is complete.

Every version the publishers write has the formats keras (1 file) and tfjs-layers
(2 files). A reader must never see a version with fewer, or one whose blob is missing
or has the wrong bytes. Prints a JSON report when it has seen ``expected`` versions
(or its deadline passes).
"""

import hashlib
import json
import sys
import time
from pathlib import Path

from registry import NotFound, Store

EXPECTED_FILES = {"keras": 1, "tfjs-layers": 2}


def main(home: str, model: str, expected: int, go_file: str) -> None:
    store = Store(home)
    print("ready", flush=True)
    while not Path(go_file).exists():
        time.sleep(0.005)
    deadline = time.monotonic() + 45
    passes, seen, problems, hashed = 0, 0, [], set()
    while seen < expected and time.monotonic() < deadline:
        try:
            records = store.list_versions(model)
        except NotFound:  # nothing published yet
            records = []
        passes += 1
        seen = len(records)
        for r in records:
            counts = {fmt: len(files) for fmt, files in r.artifacts.items()}
            if counts != EXPECTED_FILES:
                problems.append(f"v{r.version} has {counts}")
            for files in r.artifacts.values():
                for f in files:
                    if f.sha256 in hashed:
                        continue
                    data = store.blob_path(f.sha256).read_bytes()
                    if len(data) != f.size or hashlib.sha256(data).hexdigest() != f.sha256:
                        problems.append(f"v{r.version} {f.name}: bad blob")
                    hashed.add(f.sha256)
    print(json.dumps({"passes": passes, "seen": seen, "problems": problems}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
