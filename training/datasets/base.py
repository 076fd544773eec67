"""The in-memory dataset every room trains and evaluates on.

A `Dataset` holds ready-to-feed float32 arrays (the model's input, after the preprocessing the
client must repeat) plus the description of that preprocessing, so the manifest can tell a
browser or a phone exactly how to build an input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from core.errors import InvalidInput

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)


@dataclass
class Dataset:
    """Train / validation / test arrays and what a client needs to know to reproduce inputs."""

    name: str
    task: str  # "classification" or "regression"
    kind: str  # "image" or "tabular": which models of the zoo apply
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    preprocessing: dict
    labels: list[str] | None = None
    target: str | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)
    # how to load this dataset again (kept in a version's lineage, so export and the
    # federation can rebuild the same splits): {"dataset": name} or {"csv": path, "target": ...}
    recipe: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.labels) if self.labels else 0

    def input_spec(self) -> dict:
        """The manifest's `input`: shape (without the batch axis), dtype and preprocessing."""
        return {
            "shape": list(self.input_shape),
            "dtype": "float32",
            "preprocessing": self.preprocessing,
        }

    def fingerprint(self) -> str:
        """sha256 over every split's arrays (dtype, shape and bytes): the dataset's identity."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            contiguous = np.ascontiguousarray(array)
            digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
            digest.update(contiguous.tobytes())
        return digest.hexdigest()

    def summary(self) -> dict:
        return {
            "name": self.name,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "train": int(len(self.x_train)),
            "validation": int(len(self.x_val)),
            "test": int(len(self.x_test)),
            "classes": self.num_classes or None,
            "target": self.target,
            "fingerprint": self.fingerprint(),
        }


def split_indices(
    n: int,
    *,
    stratify: np.ndarray | None,
    fractions: tuple[float, float] = (0.15, 0.15),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed, seeded train / validation / test indices (stratified by label when given).

    Every class keeps its share in each split, so an 8-image class never ends up missing from
    the test set. Returns sorted index arrays so the order does not depend on the class order.
    """
    val_fraction, test_fraction = fractions
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if stratify is None else [np.flatnonzero(stratify == c) for c in np.unique(stratify)]
    train, val, test = [], [], []
    for group in groups:
        group = rng.permutation(group)
        n_test = int(round(len(group) * test_fraction))
        n_val = int(round(len(group) * val_fraction))
        test.append(group[:n_test])
        val.append(group[n_test : n_test + n_val])
        train.append(group[n_test + n_val :])
    parts = tuple(np.sort(np.concatenate(p)) for p in (train, val, test))
    if any(len(p) == 0 for p in parts):
        raise InvalidInput(f"too few rows ({n}) to make train, validation and test splits")
    return parts
