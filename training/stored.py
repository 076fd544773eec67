"""Loading a stored version's Keras model back into memory.

Blobs are named by their sha256 with no extension, and Keras 3 decides the file format from
the extension, so the blob is linked into a scratch folder as `model.keras` first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.tensorflow import import_tensorflow
from registry import Store


def load_keras_model(store: Store, model: str, version: int | None = None):
    """The Keras model of `model` vN (default: the latest), compiled state included."""
    import_tensorflow()
    import keras

    record = store.get_version(model, version)
    blob = store.artifact_path(record.model, record.version, "keras", "model.keras")
    with tempfile.TemporaryDirectory(prefix="pollinate-load-") as scratch:
        link = Path(scratch) / "model.keras"
        os.symlink(blob, link)
        return keras.saving.load_model(link)
