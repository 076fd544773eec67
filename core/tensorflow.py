"""Importing TensorFlow quietly.

The TensorFlow 2.19 wheel registers its CUDA plugins at import time and writes a screenful of
C++ log lines to stderr on a machine without a GPU ("Unable to register cuDNN factory", ...).
They are noise for a CLI user, and they are printed before TF's own log-level setting is read,
so the only way to hide them is to point stderr elsewhere while the import runs. Python
exceptions are unaffected: they are raised after stderr is restored.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

_imported = None


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: int | None = None


@contextlib.contextmanager
def quiet_stderr():
    """Point file descriptor 2 at /dev/null for the block (C++ logging bypasses Python).

    Threads share the descriptor, so the blocks nest process-wide: the first to enter saves
    the real stderr, the last to leave puts it back. (Each block saving and restoring on its
    own lost stderr for good when two threads interleaved: the second saved /dev/null.)"""
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            sys.stderr.flush()
            saved = os.dup(2)
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
            _quiet_saved = saved
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                sys.stderr.flush()
                os.dup2(_quiet_saved, 2)
                os.close(_quiet_saved)
                _quiet_saved = None


def quiet_keras_warnings() -> None:
    """Keras 3.15 on numpy 2 warns on every array conversion; it says nothing about our code.
    Ray and Flower reset warning filters when they start, so callers there call this again."""
    import warnings

    warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")


def import_tensorflow():
    """`import tensorflow` with its import-time C++ noise silenced; returns the module."""
    global _imported
    if _imported is not None:
        return _imported
    if "tensorflow" in sys.modules:
        _imported = sys.modules["tensorflow"]
        return _imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    quiet_keras_warnings()
    with quiet_stderr():
        import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # e.g. SavedModel reload notes on custom gradients
    _imported = tf
    return tf
