"""Model inputs from the outside world, checked against a version's input spec.

Every way a prediction is asked for (the server's predict route, ``pollinate predict`` on a
CSV or an array file, the try-it page through the server) turns what came in into the exact
array the model's LiteRT artifact takes, and refuses what does not fit with a message that
names what was expected: the shape, the dtype, or the row and column of a table. Written
once here so every path refuses and encodes the same way.

The arrays are MODEL inputs, after the preprocessing the manifest describes (the digits'
pixel scale is applied by the client; a table's categorical one-hot encoding is done by
:func:`encode_rows` from the spec's vocabularies). numpy only (the registry's rule).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from core.errors import InvalidInput

DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64,
          "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64}
FLOAT32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- the spec


def spec_shape(input_spec: Mapping) -> list[int | None]:
    """The spec's shape of one example (no batch axis); ``None`` (or -1) is a free axis."""
    shape = (input_spec or {}).get("shape")
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise InvalidInput("the version's input spec has no shape")
    return [None if d is None or (isinstance(d, int) and d < 0) else int(d) for d in shape]


def spec_dtype(input_spec: Mapping) -> np.dtype:
    name = str((input_spec or {}).get("dtype") or "float32")
    if name not in DTYPES:
        raise InvalidInput(f"the version's input spec has an unsupported dtype {name!r}")
    return np.dtype(DTYPES[name])


def is_tabular(input_spec: Mapping | None) -> bool:
    preprocessing = (input_spec or {}).get("preprocessing") or {}
    return isinstance(preprocessing, Mapping) and preprocessing.get("kind") == "tabular"


def tabular_columns(input_spec: Mapping) -> list[dict]:
    """The table's columns as the spec lists them (``name``, ``type``, ``vocabulary``)."""
    preprocessing = (input_spec or {}).get("preprocessing") or {}
    columns = preprocessing.get("columns") if isinstance(preprocessing, Mapping) else None
    if not is_tabular(input_spec) or not isinstance(columns, list):
        raise InvalidInput("this model does not take table rows (its input spec is not tabular); send 'inputs'")
    return columns


def _shape_text(shape: Sequence) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def expected_text(input_spec: Mapping) -> str:
    """'shape [8, 8, 1] (one example) or [N, 8, 8, 1] (a batch) of float32': for messages."""
    shape = spec_shape(input_spec)
    dtype = spec_dtype(input_spec).name
    return f"shape {_shape_text(shape)} (one example) or {_shape_text(['N', *shape])} (a batch) of {dtype}"


# --------------------------------------------------------------------------- arrays


def _first_bad(mask: np.ndarray) -> str:
    index = tuple(int(i) for i in np.argwhere(mask)[0])
    return "[" + ", ".join(str(i) for i in index) + "]"


def check_inputs(inputs: object, input_spec: Mapping) -> np.ndarray:
    """``inputs`` (one example or a batch, nested lists or an array) as the model's batch.

    Returns a C-contiguous array of the spec's dtype with a leading batch axis. Refuses
    (InvalidInput, naming the expected shape and dtype and what came) ragged lists, text,
    booleans, a wrong shape, an empty batch, non-finite numbers, and for an integer dtype,
    fractions or values out of its range.
    """
    shape = spec_shape(input_spec)
    dtype = spec_dtype(input_spec)
    expected = expected_text(input_spec)
    if inputs is None:
        raise InvalidInput(f"no inputs; expected {expected}")
    if isinstance(inputs, np.ndarray):
        array = inputs
    else:
        try:
            array = np.asarray(inputs)
        except (ValueError, TypeError):
            raise InvalidInput(f"inputs are ragged (lists of different lengths); expected {expected}") from None
    if array.dtype == object:
        raise InvalidInput(f"inputs are ragged or hold non-numbers; expected {expected}")
    if array.dtype.kind in "USV":
        raise InvalidInput(f"inputs must be numbers, got text; expected {expected}")
    if array.dtype.kind == "b":
        raise InvalidInput(f"inputs must be numbers, got booleans; expected {expected}")
    if array.dtype.kind not in "iuf":
        raise InvalidInput(f"inputs must be numbers, got {array.dtype.name}; expected {expected}")

    def fits(got: Sequence[int]) -> bool:
        return len(got) == len(shape) and all(want is None or want == g for want, g in zip(shape, got))

    if fits(array.shape):
        array = array[np.newaxis]
    elif not (array.ndim == len(shape) + 1 and fits(array.shape[1:])):
        raise InvalidInput(f"inputs have shape {list(array.shape)}; expected {expected}")
    if array.shape[0] == 0:
        raise InvalidInput(f"an empty batch; expected {expected}")

    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            raise InvalidInput(f"inputs hold a non-finite value (NaN or infinity) at {_first_bad(~finite)}")
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            out = array.astype(dtype, copy=False)
        finite = np.isfinite(out)
        if not finite.all():  # a float64 beyond float32's range
            raise InvalidInput(f"inputs hold a value at {_first_bad(~finite)} beyond {dtype.name}'s range")
    else:
        info = np.iinfo(dtype)
        if array.dtype.kind == "f":
            fractional = array != np.floor(array)
            if fractional.any():
                raise InvalidInput(f"inputs must be whole numbers ({dtype.name}); a fraction at {_first_bad(fractional)}")
        outside = (array < info.min) | (array > info.max)
        if outside.any():
            raise InvalidInput(f"inputs hold a value at {_first_bad(outside)} outside {dtype.name}'s range")
        out = array.astype(dtype)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- table rows


def _unknown_is_zero(input_spec: Mapping) -> bool:
    """The spec says an unknown category becomes an all-zero one-hot block."""
    rule = ((input_spec or {}).get("preprocessing") or {}).get("unknown_category")
    return isinstance(rule, str) and "zero" in rule.lower()


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _category(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return None


def encode_rows(rows: object, input_spec: Mapping) -> np.ndarray:
    """Table rows ``[{column: value}]`` as the model's feature batch (``preprocessing.features``).

    Numeric columns become float32 numbers (numbers, or text that parses as one: CSV cells);
    a categorical column becomes a one-hot block over its ``vocabulary``. An unknown category
    is an all-zero block when the spec's ``unknown_category`` says so, refused otherwise.
    Refusals name the row (0-based, "row 3") and the column.
    """
    columns = tabular_columns(input_spec)
    features = ((input_spec or {}).get("preprocessing") or {}).get("features")
    if not isinstance(features, list):
        raise InvalidInput("the version's tabular input spec lists no features")
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or isinstance(rows, str):
        raise InvalidInput("rows must be a list of objects {column: value}")
    if len(rows) == 0:
        raise InvalidInput("no rows; send at least one {column: value} object")
    index = {name: i for i, name in enumerate(features)}
    names = [str(c["name"]) for c in columns]
    known = set(names)
    unknown_zero = _unknown_is_zero(input_spec)
    plan = []  # (name, kind, feature index | {category: feature index})
    for column in columns:
        name = str(column["name"])
        if column.get("type") == "categorical":
            vocabulary = [str(v) for v in column.get("vocabulary") or []]
            plan.append((name, "categorical", {v: index[f"{name}={v}"] for v in vocabulary}))
        else:
            plan.append((name, "numeric", index[name]))

    out = np.zeros((len(rows), len(features)), dtype=np.float32)
    for r, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidInput(f"row {r}: expected an object {{column: value}}, got {type(row).__name__}")
        extra = [str(k) for k in row if str(k) not in known]
        if extra:
            raise InvalidInput(f"row {r}: unknown column {extra[0]!r}; the columns are: {', '.join(names)}")
        for name, kind, where in plan:
            if name not in row:
                raise InvalidInput(f"row {r}: missing column {name!r}")
            value = row[name]
            if kind == "numeric":
                number = _number(value)
                if number is None:
                    raise InvalidInput(f"row {r}, column {name!r}: {value!r} is not a number")
                if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
                    raise InvalidInput(f"row {r}, column {name!r}: {value!r} is not a finite number")
                out[r, where] = number
            else:
                category = _category(value)
                if category is None:
                    raise InvalidInput(f"row {r}, column {name!r}: {value!r} is not a category (text)")
                position = where.get(category)
                if position is not None:
                    out[r, position] = 1.0
                elif not unknown_zero:
                    raise InvalidInput(
                        f"row {r}, column {name!r}: unknown category {category!r}; expected one of: "
                        + ", ".join(where)
                    )
    shape = spec_shape(input_spec)
    if len(shape) == 1 and shape[0] in (None, len(features)):
        return out
    return np.ascontiguousarray(out.reshape((len(rows), *[len(features) if d is None else d for d in shape])))


# --------------------------------------------------------------------------- identity


def input_digest(array: np.ndarray) -> str:
    """sha256 of an input batch's canonical bytes (dtype, shape, C-order little-endian data):
    the same numbers give the same digest however they were sent (lists, rows or a file)."""
    contiguous = np.ascontiguousarray(array)
    if contiguous.dtype.byteorder == ">":
        contiguous = contiguous.astype(contiguous.dtype.newbyteorder("<"))
    digest = hashlib.sha256()
    digest.update(f"{contiguous.dtype.str}{list(contiguous.shape)}".encode())
    digest.update(contiguous.tobytes())
    return digest.hexdigest()
