"""Proof that every exported file computes what the Keras model computes.

The same held-out inputs go through Keras, every TFLite variant (LiteRT), the on-device
training file's `infer` signature, and TF.js (pure `@tensorflow/tfjs` in Node, cpu and wasm
backends). Per format: max abs difference from Keras, argmax agreement (classifiers), the task
metric, file size and single-sample latency. Two gates decide whether the export may be
published:

- float formats (`tflite-float32`, `tflite-train`, unquantized `tfjs-layers`) must match Keras
  within `FLOAT_TOLERANCE`;
- a quantized classifier may lose at most `MAX_ACCURACY_DROP` accuracy, or one example when
  the held-out set is so small that one example is worth more (12 test rows: 8 points).
  Without labels (a user's model with random inputs) Keras' own predictions are the labels,
  so the check becomes agreement with Keras.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FLOAT_TOLERANCE = 1e-4
MAX_ACCURACY_DROP = 0.02
LATENCY_REPEATS = 50
FLOAT_FORMATS = ("tflite-float32", "tflite-train", "tfjs-layers")


@dataclass
class Check:
    """One format's numbers against Keras."""

    format: str
    runtime: str
    bytes: int
    max_abs_diff: float
    latency_ms: dict
    metric: dict = field(default_factory=dict)
    agreement: float | None = None
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
) -> dict:
    """Run every exported format on x and compare with Keras; returns the export report dict.

    `files` maps a format to its file (TFLite) or folder (`tfjs-layers`, holding model.json)."""
    x = np.asarray(x, dtype=np.float32)
    say = progress or (lambda message: None)
    if "tfjs-layers" in files and tfjs_backends:
        from .node_runner import check_runner

        check_runner()  # no Node or no runner: say so now, not after every other format was checked
    say("keras")
    reference = np.asarray(model.predict(x, batch_size=256, verbose=0))
    keras_metric = task_metric(task, reference, y)
    labels = y if y is not None else (reference.argmax(axis=1) if task == "classification" else None)
    keras_accuracy = task_metric(task, reference, labels).get("accuracy")
    keras_row = {
        "format": "keras",
        "runtime": "keras (TensorFlow)",
        "metric": keras_metric,
        "latency_ms": time_single(lambda row: model(row, training=False), x, latency_repeats),
    }
    checks: list[Check] = []

    def judge(check: Check, outputs: np.ndarray) -> None:
        check.max_abs_diff = float(np.abs(outputs.reshape(reference.shape) - reference).max())
        check.metric = task_metric(task, outputs, y)
        if task == "classification":
            check.agreement = float((outputs.argmax(axis=1) == reference.argmax(axis=1)).mean())
        quantized = check.format not in FLOAT_FORMATS or (check.format == "tfjs-layers" and tfjs_quantized)
        if not quantized:
            check.passed = check.max_abs_diff <= FLOAT_TOLERANCE
            check.gate = f"max abs diff {check.max_abs_diff:.2e} {'≤' if check.passed else '>'} {FLOAT_TOLERANCE:g}"
        elif task == "classification":
            accuracy = task_metric(task, outputs, labels)["accuracy"]
            drop = keras_accuracy - accuracy
            allowed = max(MAX_ACCURACY_DROP, 1.0 / len(x))
            check.passed = drop <= allowed + 1e-12
            what = "accuracy" if y is not None else "agreement with Keras"
            check.gate = f"{what} drop {100 * drop:.2f} pts {'≤' if check.passed else '>'} {100 * allowed:.3g}"
        else:
            check.gate = "quantized regression: reported, not gated"

    for fmt, path in files.items():
        if fmt.startswith("tflite-") and fmt != "tflite-train":
            from .tflite import LiteRTRunner

            say(fmt)
            runner = LiteRTRunner(path)
            check = Check(fmt, "LiteRT", folder_bytes(path), 0.0, time_single(runner.predict_one, x, latency_repeats))
            judge(check, runner.predict(x))
            checks.append(check)
        elif fmt == "tflite-train":
            from .ondevice import OnDeviceTrainer

            say(fmt)
            trainer = OnDeviceTrainer(path)
            check = Check(fmt, "TFLite+Flex", folder_bytes(path), 0.0,
                          time_single(trainer.infer, x, latency_repeats))
            judge(check, np.asarray(trainer.infer(x)))
            checks.append(check)
        elif fmt == "tfjs-layers":
            from .node_runner import run_tfjs

            for backend in tfjs_backends:
                say(f"{fmt} ({backend})")
                run = run_tfjs(path, x, backend=backend, latency_repeats=latency_repeats)
                check = Check(fmt, f"tfjs {run.backend}", folder_bytes(path), 0.0, run.latency_ms)
                judge(check, np.asarray(run.outputs))
                checks.append(check)
    failures = [f"{c.format} [{c.runtime}]: {c.gate}" for c in checks if not c.passed]
    return {
        "task": task,
        "samples": int(len(x)),
        "labelled": y is not None,
        "thresholds": {"float_max_abs_diff": FLOAT_TOLERANCE, "quantized_max_accuracy_drop": MAX_ACCURACY_DROP},
        "keras": keras_row,
        "formats": [c.to_dict() for c in checks],
        "passed": not failures,
        "failures": failures,
    }


def report_markdown(report: dict, *, title: str) -> str:
    """The export report as a short markdown table."""
    metric_name = "accuracy" if report["task"] == "classification" else "mae"
    keras = report["keras"]
    lines = [
        f"# Export report: {title}",
        "",
        f"{report['samples']} held-out inputs ({'labelled' if report['labelled'] else 'unlabelled: metrics are against Keras'}); "
        f"gates: float formats max |diff| ≤ {report['thresholds']['float_max_abs_diff']:g}, quantized classifiers "
        f"lose ≤ {100 * report['thresholds']['quantized_max_accuracy_drop']:g} accuracy points.",
        "",
        f"| format | runtime | bytes | max abs diff | {metric_name} | latency median ms | p90 ms | gate |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        f"| keras | {keras['runtime']} | | 0 | {_fmt(keras['metric'].get(metric_name))} | "
        f"{keras['latency_ms']['median']:.3f} | {keras['latency_ms']['p90']:.3f} | reference |",
    ]
    for row in report["formats"]:
        lines.append(
            f"| {row['format']} | {row['runtime']} | {row['bytes']:,} | {row['max_abs_diff']:.2e} | "
            f"{_fmt(row['metric'].get(metric_name))} | {row['latency_ms']['median']:.3f} | {row['latency_ms']['p90']:.3f} | "
            f"{'✔' if row['passed'] else '✘'} {row['gate']} |"
        )
    lines.append("")
    lines.append("Result: " + ("all gates passed." if report["passed"] else "FAILED: " + "; ".join(report["failures"])))
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"
