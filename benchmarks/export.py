"""Export benchmark: every format of the digits CNN and of a ≥1M-parameter MLP, in one run.

    .venv/bin/python benchmarks/export.py [--repeats 200]

Trains both models on digits (seeded), exports them to TF.js and the four TFLite variants +
the on-device training file, and verifies everything on the 269 held-out test images: size,
max abs diff from Keras, accuracy, and single-sample latency of Keras `model(x)`, LiteRT per
TFLite variant, TensorFlow's interpreter for tflite-train, and TF.js in Node (cpu, wasm).
Ratios are against float32 TFLite (size) and Keras (latency), measured in the same run.
Writes benchmarks/results/export.json and export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

MODELS = [
    # (label, zoo model, width, epochs)
    ("digits CNN", "cnn", None, 15),
    ("digits MLP, width 1536", "mlp", 1536, 15),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed single-sample predictions per format")
    args = parser.parse_args()

    from export.pipeline import ExportOptions, export_model
    from training.central import TrainSettings, fit
    from training.datasets import load_dataset

    dataset = load_dataset("digits")
    results = []
    for label, zoo, width, epochs in MODELS:
        print(f"== {label}: training {epochs} epochs", flush=True)
        model, _ = fit(dataset, TrainSettings(model=zoo, epochs=epochs, seed=0, width=width))
        with tempfile.TemporaryDirectory() as scratch:
            result = export_model(
                model, Path(scratch), task="classification", x_eval=dataset.x_test, y_eval=dataset.y_test,
                calibration=dataset.x_train, options=ExportOptions(latency_repeats=args.repeats), title=label,
                progress=lambda message: print("  ", message, flush=True),
            )
        report = result.report
        keras = report["keras"]
        float32 = next(r for r in report["formats"] if r["format"] == "tflite-float32")
        rows = []
        for row in report["formats"]:
            rows.append({
                "format": row["format"], "runtime": row["runtime"], "bytes": row["bytes"],
                "size_vs_float32": row["bytes"] / float32["bytes"],
                "max_abs_diff": row["max_abs_diff"], "accuracy": row["metric"]["accuracy"],
                "accuracy_drop_points": 100 * (keras["metric"]["accuracy"] - row["metric"]["accuracy"]),
                "latency_ms_median": row["latency_ms"]["median"], "latency_ms_p90": row["latency_ms"]["p90"],
                "latency_vs_keras": row["latency_ms"]["median"] / keras["latency_ms"]["median"],
                "passed": row["passed"],
            })
        results.append({
            "model": label, "parameters": int(model.count_params()),
            "keras": {"accuracy": keras["metric"]["accuracy"], "latency_ms_median": keras["latency_ms"]["median"],
                      "latency_ms_p90": keras["latency_ms"]["p90"]},
            "formats": rows,
        })

    big = results[-1]
    int8 = next(r for r in big["formats"] if r["format"] == "tflite-int8")
    summary = {
        "mlp_parameters": big["parameters"],
        "mlp_int8_size_vs_float32": int8["size_vs_float32"],
        "mlp_int8_accuracy_drop_points": int8["accuracy_drop_points"],
        "target": "int8 ≤ 0.3× float32 size, ≤ 1 point accuracy loss on the ≥1M model",
        "target_met": int8["size_vs_float32"] <= 0.3 and int8["accuracy_drop_points"] <= 1.0,
    }
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "samples": int(len(dataset.x_test)), "latency_repeats": args.repeats,
               "models": results, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(payload, indent=2) + "\n")

    lines = ["# Export benchmark", "",
             f"`benchmarks/export.py`: {len(dataset.x_test)} held-out digits test images, {args.repeats} timed "
             f"single-sample predictions per format after warm-up, {os.cpu_count()} CPUs. Latency ratio is against "
             "Keras `model(x)` in the same run; size ratio against float32 TFLite.", ""]
    for result in results:
        keras = result["keras"]
        lines += [f"## {result['model']} ({result['parameters']:,} parameters)", "",
                  "| format | runtime | bytes | × float32 | max abs diff | accuracy | median ms | p90 ms | × Keras latency |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| keras | Keras `model(x)` | | | 0 | {keras['accuracy']:.4f} | {keras['latency_ms_median']:.3f} | "
                  f"{keras['latency_ms_p90']:.3f} | 1.00 |"]
        for r in result["formats"]:
            lines.append(f"| {r['format']} | {r['runtime']} | {r['bytes']:,} | {r['size_vs_float32']:.2f} | "
                         f"{r['max_abs_diff']:.1e} | {r['accuracy']:.4f} | {r['latency_ms_median']:.3f} | "
                         f"{r['latency_ms_p90']:.3f} | {r['latency_vs_keras']:.3f} |")
        lines.append("")
    lines.append(f"Target ({summary['target']}): int8 is {summary['mlp_int8_size_vs_float32']:.3f}× the float32 size "
                 f"and loses {summary['mlp_int8_accuracy_drop_points']:.2f} points: "
                 f"{'met' if summary['target_met'] else 'NOT met'}.")
    (RESULTS / "export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
