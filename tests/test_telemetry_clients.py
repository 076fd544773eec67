"""The clients' side of field monitoring (docs/monitoring.md).

- web_client/lib/telemetry.js computes the monitoring features and histograms exactly like
  registry/profile.py (the reference): node runs the JavaScript on the same inputs and the
  values agree to 1e-6, the histograms exactly.
- the reference device client (federated/device.py) counts the predictions it makes on its
  local data and posts them as telemetry (`--telemetry`); they appear in the version's report.
- real chromium: digits drawn on the demo page, with the telemetry switch on, appear in the
  served version's telemetry, and the page's correction arrives as feedback naming the
  prediction's id.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from tests.conftest import REPO

WEB = REPO / "web_client"
NODE = shutil.which("node")

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")

# node: {cases: [{inputs: [[...flat]], spec, grid?, outputs?}]} on stdin → per case the features
# of each input (and, with a grid, the aggregate's body) on stdout
NODE_SCRIPT = """
import { featureValues, VersionAggregate } from './lib/telemetry.js';
let text = '';
for await (const chunk of process.stdin) text += chunk;
const { cases } = JSON.parse(text);
const out = cases.map(c => {
  const features = c.inputs.map(x => featureValues(Float32Array.from(x), c.spec));
  if (!c.grid) return { features };
  const agg = new VersionAggregate(1, c.grid, c.spec);
  c.inputs.forEach((x, i) => agg.record({ input: Float32Array.from(x), output: c.outputs[i], latencyMs: 1 }));
  return { features, body: agg.body() };
});
process.stdout.write(JSON.stringify(out));
"""


def run_node(cases: list[dict]) -> list[dict]:
    result = subprocess.run([NODE, "--input-type=module", "-e", NODE_SCRIPT], cwd=WEB, input=json.dumps({"cases": cases}),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _digits() -> np.ndarray:
    from training.datasets.digits import load_digits

    return load_digits().x_test.astype(np.float32)


TABULAR_SPEC = {
    "shape": [5],
    "preprocessing": {
        "kind": "tabular",
        "columns": [{"name": "km", "type": "numeric"}, {"name": "city", "type": "categorical", "vocabulary": ["a", "b", "c"]},
                    {"name": "load", "type": "numeric"}],
        "features": ["km", "load", "city=a", "city=b", "city=c"],
    },
}


def _cases() -> list[tuple[str, np.ndarray, dict]]:
    rng = np.random.default_rng(7)
    digits = _digits()
    spec = {"shape": [8, 8, 1], "preprocessing": {"kind": "image"}}
    shifted = np.roll(digits[:40], 2, axis=2)
    noisy = rng.uniform(-0.3, 1.4, size=(30, 5, 7, 3)).astype(np.float32)  # out of [0, 1]: clipped
    sparse = np.where(rng.random((20, 6, 6)) < 0.15, rng.random((20, 6, 6)), 0).astype(np.float32)
    empty = np.zeros((2, 8, 8, 1), np.float32)
    city = rng.integers(0, 4, size=50)
    one_hot = np.stack([city == 0, city == 1, city == 2], axis=1).astype(np.float32)  # 3: "(other)", all zero
    tabular = np.concatenate([rng.normal(10, 3, (50, 1)), rng.normal(0, 1, (50, 1)), one_hot], axis=1).astype(np.float32)
    tokens = np.where(rng.random((40, 24)) < 0.3, 0, rng.integers(1, 500, (40, 24))).astype(np.float32)
    return [
        ("digits", digits[:200], spec),
        ("shifted digits", shifted, spec),
        ("empty images", empty, spec),
        ("5x7 RGB, clipped", noisy, {"shape": [5, 7, 3], "preprocessing": {"kind": "image"}}),
        ("6x6 no channel axis", sparse, {"shape": [6, 6], "preprocessing": {"kind": "image"}}),
        ("tabular with a categorical column", tabular, TABULAR_SPEC),
        ("token ids (vector)", tokens, {"shape": [24], "preprocessing": {"kind": "sequence"}}),
    ]


@needs_node
def test_javascript_features_match_the_python_reference():
    from registry.profile import feature_values

    cases = _cases()
    answers = run_node([{"inputs": x.reshape(len(x), -1).tolist(), "spec": spec} for _, x, spec in cases])
    for (name, x, spec), answer in zip(cases, answers):
        reference = feature_values(x, spec)
        assert set(answer["features"][0]) == set(reference), name
        for feature, values in reference.items():
            got = np.array([row[feature] for row in answer["features"]], dtype=np.float64)
            np.testing.assert_allclose(got, values, rtol=0, atol=1e-6, err_msg=f"{name}: {feature}")


@needs_node
def test_javascript_histograms_match_the_python_reference():
    """The aggregate a browser sends equals registry.profile.observe on the same inputs and
    outputs, on a grid built from the training data (deciles, point masses, categories)."""
    from registry.profile import build_profile, grid, observe

    rng = np.random.default_rng(3)
    digits = _digits()
    image_spec = {"shape": [8, 8, 1], "preprocessing": {"kind": "image"}}
    labels = [str(d) for d in range(10)]

    def probabilities(n: int) -> np.ndarray:
        logits = rng.normal(0, 2, (n, 10))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    train_out = probabilities(len(digits))
    image_grid = grid(build_profile(digits, train_out, image_spec, labels, "classification"))
    seen = np.roll(digits[:150], 1, axis=1)
    seen_out = probabilities(len(seen))

    tab_x = _cases()[5][1]
    tab_y = rng.normal(30, 8, len(tab_x)).astype(np.float32)
    tab_grid = grid(build_profile(tab_x, tab_y[:, None], TABULAR_SPEC, None, "regression", targets=tab_y))
    tab_out = rng.normal(30, 12, (len(tab_x), 1)).astype(np.float32)

    answers = run_node([
        {"inputs": seen.reshape(len(seen), -1).tolist(), "spec": image_spec, "grid": image_grid, "outputs": seen_out.tolist()},
        {"inputs": tab_x.tolist(), "spec": TABULAR_SPEC, "grid": tab_grid, "outputs": tab_out.tolist()},
    ])
    for (x, out, g, spec), answer in zip([(seen, seen_out, image_grid, image_spec), (tab_x, tab_out, tab_grid, TABULAR_SPEC)], answers):
        want = observe(x, out, g, spec)
        body = answer["body"]
        assert body["predictions"] == want["predictions"] == len(x)
        assert body["errors"] == 0
        assert body["features"] == want["features"]
        assert body["prediction"] == want["prediction"]
        assert sum(body["latency_ms"]) == len(x)
