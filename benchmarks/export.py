"""Export benchmark: every format of the digits CNN and of a trained MobileNetV2 (α=0.35, 96×96), in one run.

    .venv/bin/python benchmarks/export.py [--repeats 100] [--imagenet]

Per model and format: what was delivered or refused (why), size, max abs diff and top-1
agreement against Keras, accuracy on the held-out digits, single-sample latency (LiteRT per TFLite variant,
TensorFlow's interpreter for tflite-train, TF.js cpu and wasm in pure `@tensorflow/tfjs` under
Node), and wall time to make and to verify each format. Ratios are against the Keras reference
measured in the same run (its `.keras` file size and `model(x)` latency). The TF.js graph and
weight-quantized formats are included when the TF.js exporter provides them
(`export.tfjs.write_tfjs_any`). `--imagenet` adds MobileNetV2 (α=0.35) and MobileNetV3Small at
224×224 (TFLite variants only).

No pretrained weights offline, so the 96×96 MobileNetV2 (weights=None) is trained here for a
few epochs on the digits, each 8×8 image repeated to 96×96 and 3 channels and scaled to [-1, 1]
(what V2 takes); it is verified on the held-out digits with their labels, so quantized formats
are judged on a model that has learned something. The random-weight 96×96 case it replaces is
dropped: random deep nets amplify rounding, so its refusals (int8 at 66.7% agreement) said
little about a shipped model, and it cost another three minutes. The `--imagenet` cases stay
random-weight (batch-norm statistics from a batch, random images): size and latency at
224×224, not accuracy. Trained models' `.keras` files hold Adam's state too (about 3× the
weights), which the size ratios are against.
Writes benchmarks/results/export.json and export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def digits_cnn():
    from training.central import TrainSettings, fit
    from training.datasets import load_dataset

    dataset = load_dataset("digits")
    model, _ = fit(dataset, TrainSettings(model="cnn", epochs=15, seed=0))
    return model, dataset.x_test, dataset.y_test, dataset.x_train


def digits_images(x: np.ndarray, size: int, arch: str) -> np.ndarray:
    """8×8 grey digits in [0, 1] as the architecture's input: nearest-neighbour repeat to
    size×size, 3 channels; V2 takes [-1, 1], V3Small rescales [0, 255] itself."""
    factor = size // 8
    x = np.repeat(np.repeat(np.repeat(x, factor, axis=1), factor, axis=2), 3, axis=3)
    return x * 255 if arch == "MobileNetV3Small" else x * 2 - 1


def trained_mobilenet(arch: str, size: int, epochs: int = 5):
    """keras.applications' MobileNetV2 (α=0.35) or MobileNetV3Small, weights=None, trained with
    Adam (cosine-decayed from 3e-3) on the digits' training split; batch-norm momentum 0.9 so
    the moving statistics catch up within so few steps."""
    import keras

    from training.datasets import load_dataset

    dataset = load_dataset("digits")
    keras.utils.set_random_seed(0)
    kwargs = {"alpha": 0.35} if arch == "MobileNetV2" else {}
    model = getattr(keras.applications, arch)(input_shape=(size, size, 3), weights=None, classes=10, **kwargs)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    x_train = digits_images(dataset.x_train, size, arch)
    steps = epochs * -(-len(x_train) // 32)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(x_train, dataset.y_train, epochs=epochs, batch_size=32, verbose=2)
    print(f"   trained in {time.perf_counter() - started:.1f} s", flush=True)
    return model, digits_images(dataset.x_test, size, arch), dataset.y_test, x_train


def random_mobilenet(arch: str, size: int, samples: int = 32):
    """Random weights, batch-norm statistics from one batch (a fresh one's outputs saturate to a
    constant, which every format matches trivially), random images."""
    import keras

    keras.utils.set_random_seed(0)
    kwargs = {"alpha": 0.35} if arch == "MobileNetV2" else {}
    model = getattr(keras.applications, arch)(input_shape=(size, size, 3), weights=None, classes=10, **kwargs)
    rng = np.random.default_rng(0)
    scale = 255 if arch == "MobileNetV3Small" else 1  # V3 rescales [0, 255] itself
    x = rng.random((samples, size, size, 3), dtype=np.float32) * scale
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0  # one training-mode call sets the moving statistics to the batch's
    model(x, training=True)
    for layer in norms:
        layer.momentum = 0.99
    return model, x, None, rng.random((200, size, size, 3), dtype=np.float32) * scale


def formats_available(with_train: bool = True) -> tuple[str, ...]:
    from export import tfjs
    from export.pipeline import ALL_FORMATS, KNOWN_FORMATS

    formats = KNOWN_FORMATS if hasattr(tfjs, "write_tfjs_any") else ALL_FORMATS
    return tuple(f for f in formats if with_train or f != "tflite-train")


def run_model(label, model, x, y, calibration, formats, repeats):
    from export.pipeline import ExportOptions, export_model

    with tempfile.TemporaryDirectory() as scratch:
        keras_path = Path(scratch) / "model.keras"
        model.save(keras_path)
        keras_bytes = keras_path.stat().st_size
        started = time.perf_counter()
        result = export_model(
            model, Path(scratch) / "out", task="classification", x_eval=x, y_eval=y, calibration=calibration,
            options=ExportOptions(formats=formats, latency_repeats=repeats), title=label,
            progress=lambda message: print("  ", message, flush=True),
        )
        wall = time.perf_counter() - started
    report = result.report
    keras = report["keras"]
    outcome = report["outcome"]
    rows = []
    for row in report["formats"]:
        latency = row["latency_ms"] or {}
        rows.append({
            "format": row["format"], "runtime": row["runtime"], "bytes": row["bytes"],
            "size_vs_keras": row["bytes"] / keras_bytes,
            "max_abs_diff": row["max_abs_diff"], "agreement": row["agreement"],
            "accuracy": row["metric"].get("accuracy"),
            "latency_ms_median": latency.get("median"), "latency_ms_p90": latency.get("p90"),
            "latency_vs_keras": latency["median"] / keras["latency_ms"]["median"] if latency else None,
            "make_seconds": report["make_seconds"].get(row["format"]), "verify_seconds": row["seconds"],
            "delivered": row["format"] in outcome["delivered"], "gate": row["gate"],
        })
    return {
        "model": label, "parameters": int(model.count_params()), "samples": int(len(x)),
        "keras": {"bytes": keras_bytes, "accuracy": keras["metric"].get("accuracy"),
                  "latency_ms_median": keras["latency_ms"]["median"], "latency_ms_p90": keras["latency_ms"]["p90"]},
        "formats": rows, "outcome": outcome, "export_seconds": wall, "stage_seconds": report["seconds"],
    }


def markdown(payload: dict) -> str:
    def num(value, spec):
        return "" if value is None else format(value, spec)

    lines = ["# Export benchmark", "",
             f"`benchmarks/export.py`: {payload['latency_repeats']} timed single-sample predictions per format after "
             f"warm-up, {payload['machine']['cpus']} CPUs. Ratios are against Keras in the same run: size against the "
             "`.keras` file, latency against `model(x)`. *make s* is the time to write the format (the TFLite "
             "variants share one trace, counted in the first), *verify s* the time to load it, predict every sample "
             "and time the latency. No pretrained weights offline: the 96×96 MobileNetV2 (weights=None) is trained "
             "here for a few epochs on the digits (8×8 repeated to 96×96×3, scaled to [-1, 1]) and verified on the "
             "held-out digits with their labels, so *accuracy* is per format; the 224×224 cases (`--imagenet`) keep "
             "random weights with batch statistics from a batch on random images: size and latency only. The trained "
             "models' `.keras` files hold Adam's state too (about 3× the weights). The gates withhold a format "
             "that drifts too far (rows marked refused are not delivered).", ""]
    for result in payload["models"]:
        keras = result["keras"]
        outcome = result["outcome"]
        lines += [f"## {result['model']} ({result['parameters']:,} parameters, {result['samples']} samples)", "",
                  f"Export wall time {result['export_seconds']:.1f} s; delivered {len(outcome['delivered'])} of "
                  f"{len(outcome['requested'])} formats ({outcome['status']}).", "",
                  "| format | runtime | bytes | × keras | max abs diff | top-1 agree | accuracy | median ms | p90 ms | "
                  "× Keras latency | make s | verify s | outcome |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                  f"| keras | Keras `model(x)` | {keras['bytes']:,} | 1.00 | 0 | | {num(keras['accuracy'], '.4f')} | "
                  f"{keras['latency_ms_median']:.3f} | {keras['latency_ms_p90']:.3f} | 1.00 | | | reference |"]
        for r in result["formats"]:
            verdict = "ok" if r["delivered"] else f"refused: {r['gate']}"
            lines.append(
                f"| {r['format']} | {r['runtime']} | {r['bytes']:,} | {r['size_vs_keras']:.2f} | "
                f"{num(r['max_abs_diff'], '.1e')} | {num(r['agreement'], '.3f')} | {num(r['accuracy'], '.4f')} | "
                f"{num(r['latency_ms_median'], '.3f')} | {num(r['latency_ms_p90'], '.3f')} | "
                f"{num(r['latency_vs_keras'], '.3f')} | {num(r['make_seconds'], '.2f')} | {r['verify_seconds']:.2f} | "
                f"{verdict} |")
        shown = {r["format"] for r in result["formats"]}
        for fmt, why in outcome["refused"].items():
            if fmt not in shown:
                lines.append(f"| {fmt} | | | | | | | | | | | | refused ({why['stage']}): {why['reason']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed single-sample predictions per format")
    parser.add_argument("--imagenet", action="store_true", help="also MobileNetV2/V3Small at 224×224 (TFLite only)")
    args = parser.parse_args()

    from core.tensorflow import import_tensorflow

    import_tensorflow()
    cases = [("digits CNN", digits_cnn, formats_available()),
             ("MobileNetV2 α=0.35, 96×96, trained on digits", lambda: trained_mobilenet("MobileNetV2", 96),
              formats_available())]
    if args.imagenet:
        tflite = tuple(f for f in formats_available() if f.startswith("tflite-") and f != "tflite-train")
        cases += [("MobileNetV2 α=0.35, 224×224, random weights", lambda: random_mobilenet("MobileNetV2", 224), tflite),
                  ("MobileNetV3Small, 224×224, random weights", lambda: random_mobilenet("MobileNetV3Small", 224), tflite)]
    results = []
    for label, build, formats in cases:
        print(f"== {label}", flush=True)
        model, x, y, calibration = build()
        results.append(run_model(label, model, x, y, calibration, formats, args.repeats))
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "latency_repeats": args.repeats, "models": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(payload)
    (RESULTS / "export.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
