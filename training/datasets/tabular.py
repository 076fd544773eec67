"""Tables (a user's CSV, or a generated one) turned into model inputs.

Numeric columns pass through as they are (the model normalises them itself, see the zoo);
categorical columns are one-hot encoded with a vocabulary recorded in the input spec, so a
browser or a phone can build the same vector: numeric columns first, in table order, then each
categorical column's one-hot block.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from core.errors import InvalidInput

from .base import CLASSIFICATION, REGRESSION, TASKS, Dataset, split_indices

SPLIT_SEED = 0
MAX_CLASSES_INFERRED = 20  # an integer target with at most this many values is read as classes
MISSING = {"", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A"}


def _as_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def read_csv_columns(path: Path) -> dict[str, list[str]]:
    """Read a CSV into {column: [raw strings]}, with clear errors for what users get wrong."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"CSV file not found: {path}")
    if path.is_dir():
        raise InvalidInput(f"expected a CSV file, got a directory: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise InvalidInput(f"{path} is not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise InvalidInput(f"{path} is not a readable CSV: {exc}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise InvalidInput(f"{path} is empty: expected a header line and data rows")
    header = [name.strip() for name in rows[0]]
    if len(rows) == 1:
        raise InvalidInput(f"{path} has a header but no data rows")
    if any(not name for name in header):
        raise InvalidInput(f"{path}: the header has an empty column name")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise InvalidInput(f"{path}: duplicate column names: {', '.join(duplicates)}")
    columns: dict[str, list[str]] = {name: [] for name in header}
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InvalidInput(
                f"{path} line {line_number}: {len(row)} fields, the header has {len(header)}"
            )
        for name, cell in zip(header, row):
            columns[name].append(cell.strip())
    return columns


def _missing_rows(values: list[str]) -> list[int]:
    out = []
    for i, text in enumerate(values):
        if text in MISSING:
            out.append(i)
        else:
            number = _as_float(text)
            if number is not None and not math.isfinite(number):
                out.append(i)
    return out


def infer_task(values: list[str]) -> str:
    """Classification for text targets or few integer values; regression otherwise."""
    numbers = [_as_float(v) for v in values]
    if any(n is None for n in numbers):
        return CLASSIFICATION
    distinct = set(numbers)
    if len(distinct) <= MAX_CLASSES_INFERRED and all(float(n).is_integer() for n in distinct):
        return CLASSIFICATION
    return REGRESSION


def encode_table(
    columns: dict[str, list[str]],
    target: str,
    *,
    name: str,
    task: str = "auto",
    drop_missing: bool = False,
    description: str = "",
    source: str = "",
) -> Dataset:
    """Turn raw string columns into a Dataset with a fixed, stratified (classification) split."""
    if target not in columns:
        available = ", ".join(columns)
        raise InvalidInput(f"unknown target column {target!r}; the columns are: {available}")
    if task not in (*TASKS, "auto"):
        raise InvalidInput(f"unknown task {task!r}; use classification, regression or auto")
    features = [c for c in columns if c != target]
    if not features:
        raise InvalidInput("the table has no feature columns besides the target")

    missing = sorted({row for c in columns for row in _missing_rows(columns[c])})
    if missing:
        if not drop_missing:
            first = missing[0]
            where = [c for c in columns if first in _missing_rows(columns[c])]
            raise InvalidInput(
                f"{len(missing)} row(s) have missing or NaN values (first: data row {first + 1}, "
                f"column {where[0]!r}); clean them or pass --drop-missing"
            )
        keep = sorted(set(range(len(columns[target]))) - set(missing))
        columns = {c: [values[i] for i in keep] for c, values in columns.items()}
    n_rows = len(columns[target])
    if n_rows < 10:
        raise InvalidInput(f"only {n_rows} usable row(s); need at least 10 to train and evaluate")

    y_raw = columns[target]
    if task == "auto":
        task = infer_task(y_raw)
    labels = None
    if task == REGRESSION:
        numbers = [_as_float(v) for v in y_raw]
        bad = [i for i, n in enumerate(numbers) if n is None]
        if bad:
            raise InvalidInput(
                f"target column {target!r} is not numeric (data row {bad[0] + 1}: {y_raw[bad[0]]!r}); "
                "regression needs a numeric target"
            )
        y = np.asarray(numbers, dtype=np.float32)
    else:
        distinct = sorted(set(y_raw), key=lambda v: (_as_float(v) is None, _as_float(v) or 0.0, v))
        if len(distinct) < 2:
            raise InvalidInput(f"target column {target!r} has a single value; nothing to classify")
        labels = distinct
        index = {label: i for i, label in enumerate(labels)}
        y = np.asarray([index[v] for v in y_raw], dtype=np.int64)

    numeric, categorical = [], []
    for column in features:
        values = columns[column]
        (numeric if all(_as_float(v) is not None for v in values) else categorical).append(column)
    blocks, spec_columns, feature_names = [], [], []
    for column in numeric:
        blocks.append(np.asarray([float(v) for v in columns[column]], dtype=np.float32)[:, None])
        spec_columns.append({"name": column, "type": "numeric"})
        feature_names.append(column)
    for column in categorical:
        vocabulary = sorted(set(columns[column]))
        index = {v: i for i, v in enumerate(vocabulary)}
        one_hot = np.zeros((n_rows, len(vocabulary)), dtype=np.float32)
        one_hot[np.arange(n_rows), [index[v] for v in columns[column]]] = 1.0
        blocks.append(one_hot)
        spec_columns.append({"name": column, "type": "categorical", "vocabulary": vocabulary, "encoding": "one-hot"})
        feature_names.extend(f"{column}={v}" for v in vocabulary)
    x = np.concatenate(blocks, axis=1)

    stratify = y if task == CLASSIFICATION and np.bincount(y).min() >= 3 else None
    train, val, test = split_indices(n_rows, stratify=stratify, seed=SPLIT_SEED)
    return Dataset(
        name=name,
        task=task,
        kind="tabular",
        x_train=x[train], y_train=y[train],
        x_val=x[val], y_val=y[val],
        x_test=x[test], y_test=y[test],
        labels=labels,
        target=target,
        description=description,
        preprocessing={
            "kind": "tabular",
            "columns": spec_columns,
            "features": feature_names,
            "normalization": "in-model",
            "unknown_category": "all-zero one-hot block",
        },
        extra={"source": source, "rows": n_rows},
    )


def load_csv(path: Path, target: str, *, task: str = "auto", name: str | None = None, drop_missing: bool = False) -> Dataset:
    path = Path(path)
    columns = read_csv_columns(path)
    return encode_table(
        columns,
        target,
        name=name or _name_from_path(path),
        task=task,
        drop_missing=drop_missing,
        description=f"user CSV {path.name}, target {target!r}",
        source=str(path.name),
    )


def _name_from_path(path: Path) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in path.stem.lower()).strip("-._")
    return stem or "csv"
