"""Proof that every exported file computes what the Keras model computes.

The same held-out inputs (in the model's own input dtype: token ids stay integers) go through
Keras, every TFLite variant (LiteRT), the on-device training file's `infer` signature, and
TF.js (pure `@tensorflow/tfjs` in Node, cpu and wasm backends). Per format: max abs difference
from Keras, argmax agreement (classifiers), the task metric, file size and single-sample
latency. Each format is judged on its own (a format that fails is refused, the others stand):

- float formats (`tflite-float32`, `tflite-train`, unquantized TF.js) must match Keras within
  `FLOAT_TOLERANCE`;
- a quantized classifier must (1) agree with Keras' top-1 on at least
  `MIN_CONFIDENT_AGREEMENT` of the rows where Keras is confident (top-1 probability ahead of
  the runner-up by ≥ `CONFIDENT_MARGIN`; all but one row when there are few), and (2) with
  labels, keep its accuracy within `QUANTIZED_ACCURACY_DROP` of Keras' (or one example, if
  that is more); without labels, move no probability by more than `QUANTIZED_MAX_PROB_DIFF`.
  Rows where Keras itself hesitates between two classes say nothing about quantization (a
  near-uniform model flips them by rounding), so they count only through (2). Why labels
  replace the |Δp| bound when there are any: int8 rounding piles up over a deep net's ~50
  layers and moves a few borderline rows' probabilities by 0.2-0.4 while accuracy stays level
  (measured on MobileNetV2/V3Small trained on the digits: int8 within 1 point of Keras, 99% of
  the confident rows agreeing, max |Δp| 0.19-0.42; no single layer at fault in TensorFlow's
  quantization debugger, neither calibration size nor per-tensor weights helped). Labels show
  whether that drift costs anything; without them the strict bound stays. The max |Δp| is
  always reported.
- a quantized regression is reported, not gated.
A format that cannot even run (the runtime refuses the file) fails with the runtime's message.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FLOAT_TOLERANCE = 1e-4
CONFIDENT_MARGIN = 0.1
MIN_CONFIDENT_AGREEMENT = 0.98
QUANTIZED_MAX_PROB_DIFF = 0.1
QUANTIZED_ACCURACY_DROP = 0.02  # 2 points, the budget the int8 targets are stated in
LATENCY_REPEATS = 50
FLOAT_FORMATS = ("tflite-float32", "tflite-train", "tfjs-layers")


@dataclass
class Check:
    """One format's numbers against Keras."""

    format: str
    runtime: str
    bytes: int
    max_abs_diff: float | None
    latency_ms: dict
    metric: dict = field(default_factory=dict)
    agreement: float | None = None
    confident_agreement: float | None = None  # on the rows where Keras is confident (classifiers)
    seconds: float = 0.0  # wall time of this check (load, predict every row, time latency)
    gate: str = ""  # why this row passed or failed
    passed: bool = True

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def latency_stats(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "repeats": len(ordered),
    }


def time_single(predict_one, x: np.ndarray, repeats: int = LATENCY_REPEATS, warmup: int = 5) -> dict:
    """Single-sample latency: what one request on a phone or in a tab costs."""
    samples = []
    for i in range(warmup + repeats):
        row = x[i % len(x)][np.newaxis]
        started = time.perf_counter()
        predict_one(row)
        if i >= warmup:
            samples.append((time.perf_counter() - started) * 1000)
    return latency_stats(samples)


def task_metric(task: str, outputs: np.ndarray, y: np.ndarray | None) -> dict:
    if y is None:
        return {}
    if task == "classification":
        return {"accuracy": float((outputs.argmax(axis=1) == y).mean())}
    error = outputs.reshape(-1) - y.reshape(-1)
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error**2).mean()))}


def folder_bytes(path: Path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def model_inputs(x) -> np.ndarray:
    """Samples as the model takes them: float64 → float32, integers (token ids) unchanged."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float64 or not np.issubdtype(x.dtype, np.number) else x


def confident_rows(reference: np.ndarray) -> np.ndarray:
    """Rows where Keras' top-1 probability leads the runner-up by at least CONFIDENT_MARGIN."""
    top2 = np.sort(reference, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) >= CONFIDENT_MARGIN


def quantized_classifier_gate(outputs: np.ndarray, reference: np.ndarray,
                              y: np.ndarray | None = None) -> tuple[bool, str, float | None]:
    """(passed, why, confident agreement): see the module docstring. `y`: labels (class ids)."""
    max_diff = float(np.abs(outputs - reference).max())
    confident = confident_rows(reference)
    count = int(confident.sum())
    agreement = None
    parts, passed = [], True
    if count:
        same = outputs[confident].argmax(axis=1) == reference[confident].argmax(axis=1)
        agreement = float(same.mean())
        allowed = max(1.0 - MIN_CONFIDENT_AGREEMENT, 1.0 / count)
        ok = 1.0 - agreement <= allowed + 1e-12
        passed &= ok
        parts.append(f"top-1 agreement {100 * agreement:.1f}% on {count} confident rows "
                     f"{'≥' if ok else '<'} {100 * (1 - allowed):.3g}%")
    else:
        parts.append(f"no confident rows (Keras' top-2 margin < {CONFIDENT_MARGIN:g} everywhere)")
    if y is not None and len(y):
        labels = np.asarray(y).reshape(-1)
        keras_accuracy = float((reference.argmax(axis=1) == labels).mean())
        accuracy = float((outputs.argmax(axis=1) == labels).mean())
        allowed = max(QUANTIZED_ACCURACY_DROP, 1.0 / len(labels))
        ok = keras_accuracy - accuracy <= allowed + 1e-12
        passed &= ok
        parts.append(f"accuracy {100 * accuracy:.1f}% vs Keras {100 * keras_accuracy:.1f}% "
                     f"({'within' if ok else 'more than'} {100 * allowed:.3g} points)")
        parts.append(f"max |Δp| {max_diff:.3f} (reported)")
    else:
        ok = max_diff <= QUANTIZED_MAX_PROB_DIFF
        passed &= ok
        parts.append(f"max |Δp| {max_diff:.3f} {'≤' if ok else '>'} {QUANTIZED_MAX_PROB_DIFF:g} (no labels)")
    return passed, "; ".join(parts), agreement


def verify_export(
    model,
    files: dict[str, Path],
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    task: str,
    tfjs_quantized: bool = False,
    tfjs_backends: tuple[str, ...] = ("cpu", "wasm"),
    latency_repeats: int = LATENCY_REPEATS,
    progress=None,
    quantized_formats: tuple[str, ...] = (),
) -> dict:
    """Run every exported format on x and compare with Keras; returns the export report dict.

    `files` maps a format to its file (TFLite) or folder (TF.js formats, holding model.json).
    The report's `refused` maps each format that failed (its gate, or could not run) to why;
    `formats` has one row per format and runtime (TF.js: per backend)."""
    x = model_inputs(x)
    say = progress or (lambda message: None)
    if any(f.startswith("tfjs") for f in files) and tfjs_backends:
        from .node_runner import check_runner

        check_runner()  # no Node or no runner: say so now, not after every other format was checked
    say("keras")
    reference = np.asarray(model.predict(x, batch_size=256, verbose=0))
    keras_metric = task_metric(task, reference, y)
    keras_row = {
        "format": "keras",
        "runtime": "keras (TensorFlow)",
        "metric": keras_metric,
        "latency_ms": time_single(lambda row: model(row, training=False), x, latency_repeats),
    }
    checks: list[Check] = []
    refused: dict[str, str] = {}

    def judge(check: Check, outputs: np.ndarray) -> None:
        outputs = np.asarray(outputs, dtype=np.float32).reshape(reference.shape)
        check.max_abs_diff = float(np.abs(outputs - reference).max())
        check.metric = task_metric(task, outputs, y)
        if task == "classification":
            check.agreement = float((outputs.argmax(axis=1) == reference.argmax(axis=1)).mean())
        quantized = (check.format not in FLOAT_FORMATS and not check.format.startswith("tfjs")) \
            or check.format in quantized_formats or (check.format == "tfjs-layers" and tfjs_quantized)
        if not quantized:
            check.passed = check.max_abs_diff <= FLOAT_TOLERANCE
            check.gate = f"max abs diff {check.max_abs_diff:.2e} {'≤' if check.passed else '>'} {FLOAT_TOLERANCE:g}"
        elif task == "classification":
            check.passed, check.gate, check.confident_agreement = quantized_classifier_gate(outputs, reference, y)
        else:
            check.gate = "quantized regression: reported, not gated"

    def attempt(fmt: str, runtime: str, path: Path, run) -> None:
        """One format on one runtime; an error in the runtime refuses this format only."""
        check = Check(fmt, runtime, folder_bytes(path), None, {})
        started = time.perf_counter()
        try:
            outputs, latency = run()
            check.latency_ms = latency
            judge(check, outputs)
        except Exception as exc:  # a runtime refusing the file is a verdict on this format
            from .tflite import first_line

            check.passed = False
            check.gate = f"could not run in {runtime}: {first_line(exc)}"
        check.seconds = time.perf_counter() - started
        checks.append(check)
        if not check.passed:
            reason = f"[{runtime}] {check.gate}"
            refused[fmt] = f"{refused[fmt]}; {reason}" if fmt in refused else reason

    for fmt, path in files.items():
        if fmt.startswith("tflite-") and fmt != "tflite-train":
            def run_litert(path=path):
                from .tflite import LiteRTRunner

                runner = LiteRTRunner(path)
                return runner.predict(x), time_single(runner.predict_one, x, latency_repeats)

            say(fmt)
            attempt(fmt, "LiteRT", path, run_litert)
        elif fmt == "tflite-train":
            def run_flex(path=path):
                from .ondevice import OnDeviceTrainer

                trainer = OnDeviceTrainer(path)
                return np.asarray(trainer.infer(x)), time_single(trainer.infer, x, latency_repeats)

            say(fmt)
            attempt(fmt, "TFLite+Flex", path, run_flex)
        elif fmt.startswith("tfjs"):
            for backend in tfjs_backends:
                def run_node(path=path, backend=backend):
                    from .node_runner import run_tfjs

                    run = run_tfjs(path, x, backend=backend, latency_repeats=latency_repeats)
                    return np.asarray(run.outputs), run.latency_ms

                say(f"{fmt} ({backend})")
                attempt(fmt, f"tfjs {backend}", path, run_node)
    # A TF.js format that passes on one backend and fails on another is delivered with that
    # backend named as a gap (the manifest says so and pollinate.js picks another backend):
    # e.g. TF.js 4.22's wasm backend cannot run a GRU graph model's TensorList loop; cpu can.
    backend_gaps: dict[str, dict[str, str]] = {}
    for fmt in [f for f in files if f.startswith("tfjs") and f in refused]:
        rows = [c for c in checks if c.format == fmt]
        if any(c.passed for c in rows):
            backend_gaps[fmt] = {c.runtime.removeprefix("tfjs "): c.gate for c in rows if not c.passed}
            del refused[fmt]
    failures = [f"{c.format} [{c.runtime}]: {c.gate}" for c in checks
                if not c.passed and c.format not in backend_gaps]
    return {
        "task": task,
        "samples": int(len(x)),
        "input_dtype": str(x.dtype),
        "labelled": y is not None,
        "thresholds": {"float_max_abs_diff": FLOAT_TOLERANCE, "confident_margin": CONFIDENT_MARGIN,
                       "min_confident_agreement": MIN_CONFIDENT_AGREEMENT,
                       "quantized_max_prob_diff": QUANTIZED_MAX_PROB_DIFF,
                       "quantized_accuracy_drop": QUANTIZED_ACCURACY_DROP},
        "keras": keras_row,
        "formats": [c.to_dict() for c in checks],
        "refused": refused,
        "backend_gaps": backend_gaps,
        "passed": not failures,
        "failures": failures,
    }


def gates_sentence(thresholds: dict) -> str:
    return (f"float formats max |diff| ≤ {thresholds['float_max_abs_diff']:g}; quantized classifiers agree on top-1 "
            f"for ≥ {100 * thresholds['min_confident_agreement']:g}% of the rows where Keras is confident (margin ≥ "
            f"{thresholds['confident_margin']:g}) and, with labels, lose at most "
            f"{100 * thresholds.get('quantized_accuracy_drop', 0.02):g} points of accuracy (without: move no probability "
            f"by more than {thresholds['quantized_max_prob_diff']:g})")


def report_markdown(report: dict, *, title: str) -> str:
    """The export report as a short markdown table, then the outcome per format."""
    metric_name = "accuracy" if report["task"] == "classification" else "mae"
    keras = report["keras"]
    lines = [
        f"# Export report: {title}",
        "",
        f"{report['samples']} held-out inputs ({'labelled' if report['labelled'] else 'unlabelled: metrics are against Keras'}); "
        f"gates: {gates_sentence(report['thresholds'])}.",
        "",
        f"| format | runtime | bytes | max abs diff | top-1 agreement | {metric_name} | latency median ms | p90 ms | gate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        f"| keras | {keras['runtime']} | | 0 | | {_fmt(keras['metric'].get(metric_name))} | "
        f"{keras['latency_ms']['median']:.3f} | {keras['latency_ms']['p90']:.3f} | reference |",
    ]
    for row in report["formats"]:
        latency = row["latency_ms"] or {}
        lines.append(
            f"| {row['format']} | {row['runtime']} | {row['bytes']:,} | {_fmt(row['max_abs_diff'], '.2e')} | "
            f"{_fmt(row.get('agreement'))} | {_fmt(row['metric'].get(metric_name))} | {_fmt(latency.get('median'), '.3f')} | "
            f"{_fmt(latency.get('p90'), '.3f')} | {'✔' if row['passed'] else '✘'} {row['gate']} |"
        )
    outcome = report.get("outcome")
    lines.append("")
    if outcome:
        lines.append(f"Outcome: **{outcome['status']}** of {len(outcome['requested'])} requested formats delivered.")
        lines.append("")
        if outcome["delivered"]:
            lines.append("Delivered: " + ", ".join(outcome["delivered"]) + ".")
        for fmt, why in outcome["refused"].items():
            lines.append(f"- refused `{fmt}` ({why['stage']}): {why['reason']}")
        for fmt, gaps in (outcome.get("backend_gaps") or {}).items():
            for backend, why in gaps.items():
                lines.append(f"- `{fmt}` delivered, but not for the TF.js {backend} backend (clients use another): {why}")
    else:
        lines.append("Result: " + ("all gates passed." if report["passed"] else "FAILED: " + "; ".join(report["failures"])))
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)

