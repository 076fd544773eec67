"""Edge model monitoring: the reference profile, telemetry and feedback aggregates, drift,
field accuracy, alerts, shadow versions and guardrails (docs/monitoring.md, issue 13).

Real digits (scikit-learn's copy), real SQLite files; the drawn-differently inputs are made
from the digits arrays: shifted two pixels, thickened by a 3×3 dilation, shrunk to 4×4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from registry import profile as P
from training.datasets import load_dataset

# --------------------------------------------------------------------------- drawn differently


def shifted(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each digit moved two pixels up, down, left or right (zeros come in)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    for i in range(len(x)):
        dy, dx = [(2, 0), (-2, 0), (0, 2), (0, -2)][rng.integers(4)]
        out[i, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            x[i, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def thick(x: np.ndarray) -> np.ndarray:
    """A thicker pen: every pixel takes the brightest of its 3×3 neighbourhood."""
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.max([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


def tiny(x: np.ndarray) -> np.ndarray:
    """The digit drawn at half size in the middle of the canvas."""
    n, h, w, c = x.shape
    small = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    out = np.zeros_like(x)
    out[:, h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = small
    return out


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_profile(digits):
    outputs = np.eye(10)[digits.y_train]  # a perfect model's probabilities
    return P.build_profile(digits.x_train, outputs, digits.input_spec(), digits.labels, "classification")


def ordinary(digits) -> np.ndarray:
    """300 digits the profile never saw (the test split, then the validation split)."""
    return np.concatenate([digits.x_test, digits.x_val])[:300]


def max_feature_psi(x, profile, spec) -> float:
    grid = P.grid(profile)
    observed = P.observe(x, np.full((len(x), 10), 0.1), grid, spec)["features"]
    return max(P.psi(observed[name], profile["reference"]["features"][name]) for name in observed)


# --------------------------------------------------------------------------- profile


def test_profile_of_digits_has_the_documented_grid(digits, digits_profile):
    profile = digits_profile
    assert profile["schema"] == 1 and profile["kind"] == "image"
    assert [f["name"] for f in profile["features"]] == list(P.IMAGE_FEATURES)
    for feature in profile["features"]:
        edges = feature["edges"]
        assert 2 <= len(edges) <= 11 and all(a < b for a, b in zip(edges, edges[1:])), feature
        counts = profile["reference"]["features"][feature["name"]]
        assert len(counts) == len(edges) - 1 and sum(counts) == len(digits.x_train)
        assert min(counts) > 0  # every reference bin holds training values
    # continuous features: about a tenth of the training data per bin
    ink = profile["reference"]["features"]["ink_mass"]
    assert len(ink) == 10 and max(ink) < 0.13 * len(digits.x_train)
    prediction = profile["prediction"]
    assert prediction == {"task": "classification", "labels": digits.labels,
                          "confidence_edges": [i / 10 for i in range(11)]}
    assert profile["reference"]["prediction"]["classes"] == np.bincount(digits.y_train).tolist()
    assert profile["reference"]["prediction"]["confidence"][-1] == len(digits.x_train)
    assert profile["latency_ms_edges"] == [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
    grid = P.grid(profile)
    assert "reference" not in grid and set(grid) == {"schema", "kind", "features", "prediction", "latency_ms_edges"}
    json.dumps(profile, allow_nan=False)  # plain JSON


def test_image_features_follow_the_definitions():
    spec = {"shape": [4, 4, 1], "preprocessing": {"kind": "image"}}
    x = np.zeros((2, 4, 4, 1))
    x[0, 0, 3, 0] = 1.0  # one pixel, top right
    values = P.feature_values(x, spec)
    assert values["ink_mass"][0] == pytest.approx(1 / 16) and values["coverage"][0] == pytest.approx(1 / 16)
    assert values["centroid_x"][0] == 1.0 and values["centroid_y"][0] == 0.0
    assert values["spread"][0] == 0.0
    assert values["rows_0"][0] == 1.0 and values["cols_3"][0] == 1.0 and values["cols_0"][0] == 0.0
    # an empty canvas: ratios are 0.5, mass and coverage 0
    assert values["ink_mass"][1] == 0 and values["coverage"][1] == 0
    assert all(values[n][1] == 0.5 for n in ("centroid_x", "centroid_y", "spread", "rows_0", "cols_2"))
    # channels are averaged, values clipped to [0, 1]
    rgb = np.zeros((1, 4, 4, 3))
    rgb[0, 1, 1] = [3.0, 0.0, 0.0]
    assert P.feature_values(rgb, {"preprocessing": {"kind": "image"}})["ink_mass"][0] == pytest.approx(1 / 16)


def test_tabular_and_vector_features():
    spec = {"shape": [4], "preprocessing": {
        "kind": "tabular",
        "columns": [{"name": "km", "type": "numeric"},
                    {"name": "city", "type": "categorical", "vocabulary": ["a", "b"], "encoding": "one-hot"}],
        "features": ["km", "city=a", "city=b"]}}
    x = np.array([[1.5, 1, 0], [2.5, 0, 1], [3.5, 0, 0]] * 10, dtype=np.float32)
    assert P.input_kind(spec) == "tabular"
    values = P.feature_values(x, spec)
    assert values["city"][:3].tolist() == [0, 1, 2] and values["km"][:3].tolist() == [1.5, 2.5, 3.5]
    profile = P.build_profile(x, x[:, :1] * 10, spec, None, "regression", targets=x[:, 0] * 10)
    city = profile["features"][1]
    assert city == {"name": "city", "categories": ["a", "b", "(other)"]}
    assert profile["reference"]["features"]["city"] == [10, 10, 10]
    assert profile["prediction"]["task"] == "regression" and sum(profile["reference"]["prediction"]["values"]) == 30
    vector = P.feature_values(np.array([[0, 2, 0, 2]]), {"shape": [4]})
    assert P.input_kind({"shape": [4]}) == "vector"
    assert vector["mean"][0] == 1 and vector["std"][0] == 1 and vector["nonzero"][0] == 0.5


def test_binning_rule_and_repeated_deciles():
    edges = [0.0, 1.0, 2.0]
    assert P.bin_counts([-5, 0, 0.5, 1, 1.99, 2, 7, np.nan, np.inf], edges).tolist() == [3, 4]
    assert P.bin_counts([0, 1, 2, 2], ["a", "b", "(other)"]).tolist() == [1, 1, 2]
    # a point mass at 0 (half the values) gets its own bin; edges stay increasing
    values = np.concatenate([np.zeros(500), np.linspace(0.1, 1, 500)])
    e = P.decile_edges(values)
    assert all(a < b for a, b in zip(e, e[1:])) and len(e) - 1 <= 10
    assert P.bin_counts(values, e)[0] == 500
    assert P.decile_edges(np.full(20, 3.0))[0] == 3.0 and len(P.decile_edges(np.full(20, 3.0))) == 2


def test_statistics():
    assert P.psi([10, 20, 30], [10, 20, 30]) == 0.0
    assert P.js_divergence([5, 5], [5, 5]) == 0.0
    assert P.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0, abs=0.01)
    a, r = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    assert P.psi([50, 50], [90, 10]) == pytest.approx(float(np.sum((a - r) * np.log(a / r))))
    assert P.psi([0, 0], [1, 1]) == 0.0  # no data, no drift
    low, high = P.wilson(80, 100)
    assert low == pytest.approx(0.7112, abs=1e-3) and high == pytest.approx(0.8666, abs=1e-3)
    assert P.wilson(0, 0) == (0.0, 1.0)
    # 70/200 against 85/200 (pooled): z = -1.54, one-sided p = 0.062
    assert P.p_worse(70, 200, 85, 200) == pytest.approx(0.0619, abs=1e-3)
    assert P.p_worse(85, 200, 70, 200) > 0.9
    assert P.p_worse(50, 100, 50, 100) == pytest.approx(0.5)
    assert P.p_worse(0, 0, 10, 10) == 1.0


def test_drawn_differently_digits_drift_and_ordinary_ones_do_not(digits, digits_profile):
    """The issue's drift acceptance: PSI ≥ 0.2 on some feature for ~300 shifted, thick or
    tiny digits; < 0.1 on every feature for 300 ordinary held-out digits."""
    spec = digits.input_spec()
    x = ordinary(digits)
    assert len(x) == 300
    assert max_feature_psi(x, digits_profile, spec) < 0.1
    for make in (shifted, thick, tiny):
        assert max_feature_psi(make(x), digits_profile, spec) >= 0.2, make.__name__
