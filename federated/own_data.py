"""A SuperNode's own data: `pollinate federate supernode --data FILE`.

A node that joins a deployed federation with local data trains on that file instead of a
partition of a built-in dataset. The file is checked against the model's *input contract*
before the node connects, so a wrong file fails at once, on the node, with one line that says
what is wrong, instead of as a failed reply in round 1 on the server:

- `.npz` with `x` (the model's input, after the preprocessing the manifest describes: shape
  `(n, *input shape)`) and `y` (a class index or label per row, or a number for regression);
- `.csv` with a header: for a tabular model the columns the model was trained on (numeric
  ones as numbers, categorical ones as text; one-hot encoded here with the recorded
  vocabulary; other columns are ignored), for an image model one column per input value in
  row-major order (e.g. 64 pixel columns for an 8×8×1 image, already scaled); plus the label
  column (`--target`, else the dataset's target name, else `label`, `target` or `y`).

The contract (input shape, preprocessing, labels) comes from the model's manifest on a server
(`--server URL`), else from the version in the node's store, else from the built-in dataset of
that name. The checked arrays are written once as an `.npz` under the store
(`flower/own-data/`); the ClientApp loads that file each round (load_prepared) and checks it
against the round's model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.errors import InvalidInput, NotFound, PollinateError

LABEL_COLUMNS = ("label", "target", "y")
RANGE_SLACK = 1e-3  # share of the input range a value may stray outside it (float rounding)


@dataclass(frozen=True)
class InputContract:
    """What a model takes and predicts, as its manifest states it."""

    model: str
    shape: tuple[int, ...]
    preprocessing: dict
    labels: tuple[str, ...] | None
    target: str | None  # the label column's name in the training data, when known
    source: str  # where the contract was read, for messages

    @property
    def classification(self) -> bool:
        return bool(self.labels)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def input_range(self) -> tuple[float, float] | None:
        """[low, high] of the model's input when the preprocessing scales a known source range."""
        p = self.preprocessing or {}
        if "source_range" not in p or "scale" not in p:
            return None
        low, high = (float(v) * float(p["scale"]) + float(p.get("offset", 0.0)) for v in p["source_range"])
        return min(low, high), max(low, high)


def contract_from_spec(model: str, input_spec: dict | None, labels, target: str | None, source: str) -> InputContract:
    spec = input_spec or {}
    if not spec.get("shape"):
        raise InvalidInput(f"{source} records no input shape: own data cannot be checked against it")
    return InputContract(model=model, shape=tuple(int(d) for d in spec["shape"]),
                         preprocessing=dict(spec.get("preprocessing") or {}),
                         labels=tuple(str(v) for v in labels) if labels else None, target=target, source=source)


def resolve_contract(model: str, *, home: Path | None = None, version: int | None = None,
                     server: str | None = None) -> InputContract:
    """The model's input contract: from a server's manifest, the store, or a built-in dataset."""
    if server:
        return _contract_from_server(server.rstrip("/"), model, version)
    record = _stored_version(home, model, version) if home is not None else None
    if record is not None:
        recipe = record.lineage.extra.get("data") or {}
        return contract_from_spec(model, record.input_spec, record.labels, _target_of(recipe),
                                  f"{model} v{record.version}")
    if version is None:
        from training.datasets import BUILTIN, load_dataset

        if model in BUILTIN:
            dataset = load_dataset(model)
            return contract_from_spec(model, dataset.input_spec(), dataset.labels, dataset.target,
                                      f"the built-in dataset {model}")
    where = f"version {version} of " if version is not None else ""
    raise NotFound(f"no {where}model {model!r} to check the data against: train or import it into the store "
                   "(--home), or give --server URL of the pollinate serve that has it")


def _stored_version(home: Path, model: str, version: int | None):
    from registry import open_store

    try:
        return open_store(home).get_version(model, version)
    except NotFound:
        return None


def _target_of(recipe: dict) -> str | None:
    if recipe.get("target"):
        return str(recipe["target"])
    if recipe.get("dataset"):
        from training.datasets import BUILTIN, load_dataset

        if recipe["dataset"] in BUILTIN:
            return load_dataset(recipe["dataset"]).target
    return None


def _contract_from_server(server: str, model: str, version: int | None) -> InputContract:
    import httpx

    url = (f"{server}/v1/models/{model}/versions/{version}/manifest" if version is not None
           else f"{server}/v1/models/{model}/manifest")
    try:
        response = httpx.get(url, timeout=10)
    except httpx.HTTPError as exc:
        raise PollinateError(f"cannot reach {server} for the model's manifest: {exc}") from None
    if response.status_code == 404:
        raise NotFound(f"{server} has no model {model!r}" + (f" version {version}" if version is not None else ""))
    if response.status_code != 200:
        raise PollinateError(f"{url} answered {response.status_code}")
    manifest = response.json()
    recipe = (manifest.get("lineage") or {}).get("extra", {}).get("data") or {}
    target = str(recipe["target"]) if recipe.get("target") else None
    if target is None and recipe.get("dataset"):
        target = _target_of(recipe)
    return contract_from_spec(model, manifest.get("input"), manifest.get("labels"), target,
                              f"{model} v{manifest.get('version')} at {server}")


# ---------------------------------------------------------------- reading and checking a file


def load_own_data(path: Path, contract: InputContract, target: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 model input, y) from a user's file, checked against the contract; InvalidInput
    with one line that says what is wrong otherwise."""
    path = Path(path)
    if not path.exists():
        raise InvalidInput(f"data file not found: {path}")
    if path.is_dir():
        raise InvalidInput(f"expected a .csv or .npz file, got a directory: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _read_npz(path)
    elif suffix == ".csv":
        x, y = _read_csv(path, contract, target)
    else:
        raise InvalidInput(f"{path.name}: own data must be a .csv (the model's columns and a label column) "
                           "or an .npz (arrays x and y)")
    return check_arrays(x, y, contract, path.name)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise InvalidInput(f"{path.name} is not a readable .npz file (np.savez writes a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise InvalidInput(f"{path.name} has no array {' or '.join(missing)}; it holds "
                                   f"{', '.join(archive.files) or 'nothing'} (expected x: inputs, y: labels)")
            return archive["x"], archive["y"]
    except InvalidInput:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InvalidInput(f"{path.name} is not a readable .npz file ({exc})") from None
    except ValueError as exc:  # object arrays need pickle, which a data file may not use
        raise InvalidInput(f"{path.name}: {exc}; save plain numeric arrays (np.savez(path, x=..., y=...))") from None


def _read_csv(path: Path, contract: InputContract, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise InvalidInput(f"{path.name} is not UTF-8 text; save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise InvalidInput(f"{path.name} is not a readable CSV: {exc}") from None
    if len(rows) < 2:
        raise InvalidInput(f"{path.name} needs a header line and at least one data row")
    header = [name.strip() for name in rows[0]]
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InvalidInput(f"{path.name} line {number}: {len(row)} fields, the header has {len(header)}")
    columns = {name: [row[i].strip() for row in rows[1:]] for i, name in enumerate(header)}
    label = _label_column(header, contract, target, path.name)
    y = np.asarray(columns.pop(label), dtype=object)
    if contract.preprocessing.get("kind") == "tabular":
        return _encode_tabular(columns, contract, path.name), y
    if len(columns) != contract.size:
        raise InvalidInput(f"{path.name} has {len(columns)} input column(s) besides the label {label!r}; "
                           f"{contract.source} takes {contract.size} values per row (shape "
                           f"{list(contract.shape)}, row-major)")
    return _numeric_block(columns, list(columns), path.name).reshape((-1, *contract.shape)), y


def _label_column(header: list[str], contract: InputContract, target: str | None, name: str) -> str:
    if target:
        if target not in header:
            raise InvalidInput(f"{name} has no column {target!r} (--target); its columns: {', '.join(header)}")
        return target
    for candidate in ((contract.target,) if contract.target else ()) + LABEL_COLUMNS:
        if candidate in header:
            return candidate
    wanted = " or ".join(repr(c) for c in ((contract.target,) if contract.target else ()) + LABEL_COLUMNS)
    raise InvalidInput(f"{name} has no label column ({wanted}); name it with --target COLUMN")


def _numeric_block(columns: dict[str, list[str]], names: list[str], name: str) -> np.ndarray:
    out = np.empty((len(columns[names[0]]) if names else 0, len(names)), dtype=np.float32)
    for j, column in enumerate(names):
        for i, text in enumerate(columns[column]):
            try:
                out[i, j] = float(text)
            except ValueError:
                raise InvalidInput(f"{name} row {i + 1}, column {column!r}: {text!r} is not a number") from None
    return out


def _encode_tabular(columns: dict[str, list[str]], contract: InputContract, name: str) -> np.ndarray:
    """The model's feature vector, built as training built it: numeric columns, then each
    categorical column's one-hot block over the recorded vocabulary (unknown values: all zero)."""
    spec = contract.preprocessing.get("columns") or []
    missing = [c["name"] for c in spec if c["name"] not in columns]
    if missing:
        raise InvalidInput(f"{name} lacks the model's column(s) {', '.join(missing)} "
                           f"({contract.source} takes {', '.join(c['name'] for c in spec)})")
    blocks = []
    for column in spec:
        if column.get("type") == "categorical":
            vocabulary = list(column.get("vocabulary") or [])
            index = {v: i for i, v in enumerate(vocabulary)}
            one_hot = np.zeros((len(columns[column["name"]]), len(vocabulary)), dtype=np.float32)
            for i, value in enumerate(columns[column["name"]]):
                if value in index:
                    one_hot[i, index[value]] = 1.0
            blocks.append(one_hot)
        else:
            blocks.append(_numeric_block(columns, [column["name"]], name))
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((0, 0), np.float32)
    if x.shape[1:] != contract.shape:
        raise InvalidInput(f"{name}: the columns encode to {x.shape[1]} features, {contract.source} takes "
                           f"{list(contract.shape)}")
    return x


def _parse_labels(values: np.ndarray, contract: InputContract, name: str) -> np.ndarray:
    """Class indices (from a label's text or its index) or regression targets."""
    values = np.asarray(values).reshape(-1)
    if contract.classification:
        index = {label: i for i, label in enumerate(contract.labels)}
        out = np.empty(len(values), dtype=np.int64)
        for i, value in enumerate(values.tolist()):
            text = value.decode() if isinstance(value, bytes) else str(value).strip()
            if text in index:
                out[i] = index[text]
                continue
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is None or not number.is_integer() or not 0 <= number < len(contract.labels):
                raise InvalidInput(f"{name} row {i + 1}: label {text!r} is not one of the model's "
                                   f"{len(contract.labels)} classes ({_label_list(contract.labels)}, "
                                   f"or their index 0..{len(contract.labels) - 1})")
            out[i] = int(number)
        return out
    try:
        out = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name}: the targets must be numbers (the model predicts a number)") from None
    if not np.isfinite(out).all():
        row = int(np.flatnonzero(~np.isfinite(out))[0])
        raise InvalidInput(f"{name} row {row + 1}: the target is NaN or infinite")
    return out


def _label_list(labels) -> str:
    labels = list(labels)
    return ", ".join(labels) if len(labels) <= 12 else ", ".join(labels[:10]) + ", …"


def check_arrays(x, y, contract: InputContract, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Shape, dtype, finite values, value range and labels of (x, y) against the contract."""
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise InvalidInput(f"{name}: x must hold numbers, it holds {x.dtype}")
    if x.ndim == 0 or len(x) == 0:
        raise InvalidInput(f"{name}: x holds no examples")
    if tuple(x.shape[1:]) != contract.shape:
        hint = ""
        if x.ndim == 2 and x.shape[1] == contract.size:
            hint = f"; reshape each row to {list(contract.shape)}"
        raise InvalidInput(f"{name}: x has shape {list(x.shape)}, {contract.source} takes "
                           f"(n, {', '.join(map(str, contract.shape))}){hint}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput(f"{name}: x holds {int((~np.isfinite(x)).sum())} NaN or infinite value(s)")
    span = contract.input_range()
    if span is not None:
        low, high = span
        slack = RANGE_SLACK * max(high - low, 1e-6)
        if float(x.min()) < low - slack or float(x.max()) > high + slack:
            p = contract.preprocessing
            raise InvalidInput(f"{name}: x holds values in [{float(x.min()):.4g}, {float(x.max()):.4g}], the model "
                               f"takes [{low:.4g}, {high:.4g}]: apply its preprocessing "
                               f"({p.get('formula', 'x = pixel * scale + offset')}, scale {p['scale']:.6g}, "
                               f"offset {p.get('offset', 0.0)})")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(x):
        raise InvalidInput(f"{name}: y must hold one label per example: x has {len(x)} rows, y has shape {list(y.shape)}")
    return x, _parse_labels(y, contract, name)


# ---------------------------------------------------------------- the prepared file


def prepare(path: Path, contract: InputContract, folder: Path, target: str | None = None) -> tuple[Path, int]:
    """Check `path` and write its arrays, ready to train on, as FOLDER/<digest>.npz;
    returns (that file, the number of examples)."""
    x, y = load_own_data(path, contract, target)
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": contract.model, "shape": contract.shape}).encode())
    for array in (x, y):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{digest.hexdigest()[:24]}.npz"
    if not out.exists():
        scratch = out.with_suffix(".tmp.npz")
        np.savez(scratch, x=x, y=y)
        scratch.replace(out)
    return out, int(len(x))


def load_prepared(path: str, architecture: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The prepared arrays (cached per process), checked against the round's model input."""
    x, y = _load_prepared(str(path))
    if architecture:
        expected = input_shape_of(architecture)
        if expected is not None and tuple(x.shape[1:]) != expected:
            raise InvalidInput(f"this node's data has inputs of shape {list(x.shape[1:])}, the federation's "
                               f"model takes {list(expected)}")
    return x, y


@lru_cache(maxsize=4)
def _load_prepared(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["x"].astype(np.float32), archive["y"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"this node's prepared data {path} cannot be read ({exc}); restart it with --data") from None


def input_shape_of(architecture: str) -> tuple[int, ...] | None:
    """The input shape (without the batch axis) a Keras model JSON declares, without Keras."""
    try:
        config = json.loads(architecture)
    except ValueError:
        return None
    for layer in (config.get("config") or {}).get("layers", []):
        if layer.get("class_name") == "InputLayer":
            cfg = layer.get("config") or {}
            shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            if shape:
                return tuple(int(d) for d in shape[1:])
    return None
