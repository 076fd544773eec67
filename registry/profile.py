"""A version's reference profile: the fixed bins clients aggregate on, and the training counts.

Devices never send an input. They compute a few summaries of each model input (its
*features*), count them on the bins the manifest's ``monitoring`` grid fixes, and send the
counts; the server compares those counts with the same counts on the training data (drift)
and joins user feedback (field accuracy). Everything here is the contract in
docs/monitoring.md, section 1, written once so the server, the device client, the tests and
the benchmarks compute exactly the same numbers.

numpy only (the registry's rule): no TensorFlow, no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from core.errors import InvalidInput

PROFILE_FORMAT = "profile"
PROFILE_FILE = "profile.json"
SCHEMA = 1

KINDS = ("image", "tabular", "vector")
CLASSIFICATION = "classification"
REGRESSION = "regression"

DECILE_BINS = 10
CONFIDENCE_EDGES = [round(i / 10, 1) for i in range(11)]
LATENCY_MS_EDGES = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
OTHER_CATEGORY = "(other)"
SHARE_FLOOR = 1e-4

IMAGE_FEATURES = (
    "ink_mass", "coverage", "centroid_x", "centroid_y", "spread",
    "rows_0", "rows_1", "rows_2", "rows_3", "cols_0", "cols_1", "cols_2", "cols_3",
)
VECTOR_FEATURES = ("mean", "std", "nonzero")


# --------------------------------------------------------------------------- features


def input_kind(input_spec: Mapping | None) -> str:
    """"image" or "tabular" as the preprocessing says, else "vector"."""
    preprocessing = (input_spec or {}).get("preprocessing") or {}
    kind = preprocessing.get("kind") if isinstance(preprocessing, Mapping) else None
    return kind if kind in ("image", "tabular") else "vector"


def _batch(x: object, input_spec: Mapping | None) -> np.ndarray:
    """x as a float64 batch; a single input (the spec's shape without a batch axis) gets one."""
    array = np.asarray(x, dtype=np.float64)
    shape = (input_spec or {}).get("shape")
    if isinstance(shape, Sequence) and shape and array.ndim == len(shape) and list(array.shape) == list(shape):
        array = array[np.newaxis]
    if array.ndim < 1:
        raise InvalidInput("a batch of inputs needs at least one axis")
    return array


def _image_features(x: np.ndarray) -> dict[str, np.ndarray]:
    if x.ndim == 4:  # N, H, W, C: channels averaged into one plane
        x = x.mean(axis=-1)
    if x.ndim != 3:
        raise InvalidInput(f"image inputs must be N×H×W×C or N×H×W, got shape {list(x.shape)}")
    p = np.clip(x, 0.0, 1.0)
    n, h, w = p.shape
    rows = np.arange(h, dtype=np.float64)
    cols = np.arange(w, dtype=np.float64)
    s = p.sum(axis=(1, 2))
    empty = s == 0
    safe = np.where(empty, 1.0, s)
    row_mass = p.sum(axis=2)  # N, H
    col_mass = p.sum(axis=1)  # N, W
    cy_px = row_mass @ rows / safe
    cx_px = col_mass @ cols / safe
    centroid_x = cx_px / (w - 1) if w > 1 else np.full(n, 0.5)
    centroid_y = cy_px / (h - 1) if h > 1 else np.full(n, 0.5)
    dist2 = (cols[None, None, :] - cx_px[:, None, None]) ** 2 + (rows[None, :, None] - cy_px[:, None, None]) ** 2
    spread = np.sqrt((p * dist2).sum(axis=(1, 2)) / safe) / math.sqrt(h * h + w * w)
    out = {
        "ink_mass": s / (h * w),
        "coverage": (p > 0.5).sum(axis=(1, 2)) / (h * w),
        "centroid_x": np.where(empty, 0.5, centroid_x),
        "centroid_y": np.where(empty, 0.5, centroid_y),
        "spread": np.where(empty, 0.5, spread),
    }
    row_band = (4 * np.arange(h)) // h
    col_band = (4 * np.arange(w)) // w
    for b in range(4):
        out[f"rows_{b}"] = np.where(empty, 0.5, row_mass[:, row_band == b].sum(axis=1) / safe)
    for b in range(4):
        out[f"cols_{b}"] = np.where(empty, 0.5, col_mass[:, col_band == b].sum(axis=1) / safe)
    return {name: out[name] for name in IMAGE_FEATURES}


def _tabular_columns(input_spec: Mapping) -> tuple[list[dict], list[str]]:
    preprocessing = input_spec.get("preprocessing") or {}
    columns = preprocessing.get("columns")
    features = preprocessing.get("features")
    if not isinstance(columns, list) or not isinstance(features, list):
        raise InvalidInput("a tabular input spec needs preprocessing 'columns' and 'features'")
    return columns, features


def _tabular_features(x: np.ndarray, input_spec: Mapping) -> dict[str, np.ndarray]:
    columns, features = _tabular_columns(input_spec)
    x = x.reshape(len(x), -1)
    if x.shape[1] != len(features):
        raise InvalidInput(f"tabular inputs need {len(features)} entries, got {x.shape[1]}")
    index = {name: i for i, name in enumerate(features)}
    out: dict[str, np.ndarray] = {}
    for column in columns:
        name = column["name"]
        if column.get("type") == "categorical":
            vocabulary = list(column.get("vocabulary") or [])
            block = x[:, [index[f"{name}={v}"] for v in vocabulary]] if vocabulary else np.zeros((len(x), 0))
            if vocabulary:
                chosen = block.argmax(axis=1).astype(np.float64)
                none = ~(block > 0).any(axis=1)
                chosen[none] = len(vocabulary)  # "(other)"
            else:
                chosen = np.zeros(len(x))
            out[name] = chosen
        else:
            out[name] = x[:, index[name]].astype(np.float64)
    return out


def _vector_features(x: np.ndarray) -> dict[str, np.ndarray]:
    flat = x.reshape(len(x), -1)
    return {
        "mean": flat.mean(axis=1),
        "std": flat.std(axis=1),
        "nonzero": (flat != 0).mean(axis=1),
    }


def feature_values(x: object, input_spec: Mapping | None) -> dict[str, np.ndarray]:
    """Per feature, an (N,) float array of the batch's values (categorical: category index)."""
    batch = _batch(x, input_spec)
    kind = input_kind(input_spec)
    if kind == "image":
        return _image_features(batch)
    if kind == "tabular":
        return _tabular_features(batch, input_spec)
    return _vector_features(batch)


# --------------------------------------------------------------------------- bins


def decile_edges(values: object) -> list[float]:
    """Edges on the values' deciles (10 bins), valid however the values pile up.

    Every edge is a training value (``inverted_cdf`` deciles), so no reference bin is empty.
    Equal deciles (a point mass, such as "no ink in the left band") are deduplicated; the
    point mass ``e`` then gets a bin of its own, [e, e + δ), when training values lie above
    it before the next edge (or it is the largest value), so a shift into or out of it shows.
    A constant feature gets the single bin [c, c + δ).
    """
    v = np.asarray(values, dtype=np.float64)
    v = np.sort(v[np.isfinite(v)])
    if v.size == 0:
        return [0.0, 1.0]
    q = np.quantile(v, np.linspace(0.0, 1.0, DECILE_BINS + 1), method="inverted_cdf")
    unique, counts = np.unique(q, return_counts=True)
    edges: list[float] = []
    for i, (e, c) in enumerate(zip(unique.tolist(), counts.tolist())):
        edges.append(e)
        nxt = float(unique[i + 1]) if i + 1 < len(unique) else math.inf
        if c > 1 or len(unique) == 1:
            delta = max(1e-9, 1e-6 * abs(e))
            if math.isfinite(nxt):
                delta = min(delta, (nxt - e) / 2)
                above = np.searchsorted(v, e + delta, side="left") < np.searchsorted(v, nxt, side="left")
            else:
                above = True
            if above:
                edges.append(e + delta)
    return [float(e) for e in edges]


def _is_categories(spec: object) -> bool:
    return isinstance(spec, Sequence) and not isinstance(spec, str) and any(isinstance(c, str) for c in spec)


def bin_counts(values: object, edges_or_categories: object) -> np.ndarray:
    """Counts of the values on a grid: ``edges`` (K+1 numbers) or ``categories`` (K names,
    values are category indices). Non-finite values are not counted (a client's error)."""
    spec = edges_or_categories
    if isinstance(spec, Mapping):
        spec = spec["categories"] if "categories" in spec else spec["edges"]
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if _is_categories(spec):
        k = len(spec)
        idx = np.clip(np.round(v).astype(np.int64), 0, k - 1)
        return np.bincount(idx, minlength=k).astype(np.int64)
    edges = np.asarray(spec, dtype=np.float64)
    k = len(edges) - 1
    if k < 1:
        raise InvalidInput("a grid needs at least two edges")
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, k - 1)
    return np.bincount(idx, minlength=k).astype(np.int64)


def bins_of(feature: Mapping) -> int:
    """How many bins a grid feature (or the prediction's edges) has."""
    if "categories" in feature:
        return len(feature["categories"])
    return len(feature["edges"]) - 1


# --------------------------------------------------------------------------- predictions


def _probabilities(outputs: object, labels: Sequence | None) -> np.ndarray:
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    out = out.reshape(len(out), -1)
    if out.shape[1] == 1 and labels is not None and len(labels) == 2:  # one sigmoid unit
        out = np.concatenate([1.0 - out, out], axis=1)
    return out


def prediction_counts(outputs: object, prediction_grid: Mapping, labels: Sequence | None = None) -> dict:
    """The prediction histograms of a batch: classes + confidence, or regression values."""
    if prediction_grid.get("task") == REGRESSION:
        values = np.asarray(outputs, dtype=np.float64).reshape(-1)
        return {"values": bin_counts(values, prediction_grid["edges"]).tolist()}
    labels = prediction_grid.get("labels") or labels or []
    probs = _probabilities(outputs, labels)
    finite = np.isfinite(probs).all(axis=1)
    probs = probs[finite]
    classes = np.bincount(probs.argmax(axis=1), minlength=len(labels))[: len(labels)] if len(probs) else np.zeros(len(labels), np.int64)
    return {
        "classes": [int(c) for c in classes],
        "confidence": bin_counts(probs.max(axis=1) if len(probs) else [], prediction_grid["confidence_edges"]).tolist(),
    }


# --------------------------------------------------------------------------- the profile


def build_profile(
    x: object,
    outputs: object,
    input_spec: Mapping | None,
    labels: Sequence | None,
    task: str,
    *,
    targets: object = None,
) -> dict:
    """profile.json: the grid (features' bins, prediction bins, latency bins) and the
    reference counts of the training inputs ``x`` and the model's ``outputs`` on them.

    Regression's prediction edges are the deciles of ``targets`` (the training targets)
    when given, else of the predictions.
    """
    if task not in (CLASSIFICATION, REGRESSION):
        raise InvalidInput(f"task must be 'classification' or 'regression', got {task!r}")
    kind = input_kind(input_spec)
    values = feature_values(x, input_spec)
    rows = len(next(iter(values.values()))) if values else 0
    features: list[dict] = []
    if kind == "tabular":
        columns, _ = _tabular_columns(input_spec)
        categorical = {c["name"]: list(c.get("vocabulary") or []) for c in columns if c.get("type") == "categorical"}
    else:
        categorical = {}
    for name, vals in values.items():
        if name in categorical:
            features.append({"name": name, "categories": [*categorical[name], OTHER_CATEGORY]})
        else:
            features.append({"name": name, "edges": decile_edges(vals)})
    if task == CLASSIFICATION:
        if not labels:
            probs = _probabilities(outputs, None)
            labels = [str(i) for i in range(probs.shape[1])]
        prediction = {"task": CLASSIFICATION, "labels": [str(label) for label in labels],
                      "confidence_edges": list(CONFIDENCE_EDGES)}
    else:
        source = targets if targets is not None else outputs
        prediction = {"task": REGRESSION, "edges": decile_edges(np.asarray(source, dtype=np.float64).reshape(-1))}
    reference = {
        "rows": int(rows),
        "features": {f["name"]: bin_counts(values[f["name"]], f).tolist() for f in features},
        "prediction": prediction_counts(outputs, prediction, labels),
    }
    return {
        "schema": SCHEMA,
        "kind": kind,
        "features": features,
        "prediction": prediction,
        "latency_ms_edges": list(LATENCY_MS_EDGES),
        "reference": reference,
    }


def grid(profile: Mapping) -> dict:
    """The manifest's ``monitoring`` block, less the telemetry and feedback URLs."""
    return {key: profile[key] for key in ("schema", "kind", "features", "prediction", "latency_ms_edges")}


def observe(x: object, outputs: object, grid_: Mapping, input_spec: Mapping | None) -> dict:
    """What a client sends for a batch it predicted: ``predictions`` and the histograms
    (``features`` and ``prediction``) on the version's grid. Used by the Python device
    client, the tests and the benchmarks; a JavaScript client computes the same."""
    values = feature_values(x, input_spec)
    features = {}
    for feature in grid_["features"]:
        features[feature["name"]] = bin_counts(values[feature["name"]], feature).tolist()
    prediction = prediction_counts(outputs, grid_["prediction"])
    n = len(next(iter(values.values()))) if values else 0
    return {"predictions": int(n), "features": features, "prediction": prediction}


# --------------------------------------------------------------------------- statistics


def _shares(counts: object) -> np.ndarray | None:
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = c.sum()
    if total <= 0:
        return None
    return np.maximum(c / total, SHARE_FLOOR)


def psi(observed: object, reference: object) -> float:
    """Population stability index Σ (a − r)·ln(a / r) on shares floored at 1e-4 (0 with no data)."""
    a, r = _shares(observed), _shares(reference)
    if a is None or r is None:
        return 0.0
    if a.shape != r.shape:
        raise InvalidInput(f"psi needs histograms of one length, got {a.size} and {r.size}")
    return float(np.sum((a - r) * np.log(a / r)))


def js_divergence(observed: object, reference: object) -> float:
    """Jensen–Shannon divergence (base 2, in [0, 1]) of the floored shares (0 with no data)."""
    a, r = _shares(observed), _shares(reference)
    if a is None or r is None:
        return 0.0
    if a.shape != r.shape:
        raise InvalidInput(f"js_divergence needs histograms of one length, got {a.size} and {r.size}")
    m = (a + r) / 2
    value = 0.5 * np.sum(a * np.log2(a / m)) + 0.5 * np.sum(r * np.log2(r / m))
    return float(min(1.0, max(0.0, value)))


def wilson(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) with no trials."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def p_worse(cand_successes: float, cand_n: float, base_successes: float, base_n: float) -> float:
    """One-sided two-proportion z-test (pooled): the p-value of "the candidate's rate is
    lower than the baseline's". 1.0 when either side has no trials or nothing varies."""
    if cand_n <= 0 or base_n <= 0:
        return 1.0
    p_c, p_b = cand_successes / cand_n, base_successes / base_n
    pooled = (cand_successes + base_successes) / (cand_n + base_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / cand_n + 1 / base_n))
    if se == 0:
        return 1.0 if p_c >= p_b else 0.0
    return normal_cdf((p_c - p_b) / se)
