"""Central training benchmark: the issue's reference runs, timed end to end.

    .venv/bin/python benchmarks/train.py [--seeds 0 1 2]

For each seed: `pollinate train --dataset digits --model cnn --epochs 15 --json` and
`pollinate train --dataset delivery-eta --json` as real subprocesses (wall time includes
starting Python and importing TensorFlow), into a scratch store. In the same run, reference
models from scikit-learn on the same splits (logistic regression for digits, gradient
boosting for delivery-eta) and the plain baselines, reported as ratios.
Writes benchmarks/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def pollinate_train(home: Path, *args: str) -> tuple[dict, float]:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pollinate", "train", *args, "--home", str(home), "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return json.loads(out.stdout), time.perf_counter() - started


def sklearn_references() -> dict:
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression

    from training.datasets import load_dataset

    digits = load_dataset("digits")
    started = time.perf_counter()
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    logistic = LogisticRegression(max_iter=2000).fit(flat(digits.x_train), digits.y_train)
    digits_acc = float((logistic.predict(flat(digits.x_test)) == digits.y_test).mean())
    digits_s = time.perf_counter() - started

    eta = load_dataset("delivery-eta")
    started = time.perf_counter()
    boosted = HistGradientBoostingRegressor(random_state=0).fit(eta.x_train, eta.y_train)
    eta_mae = float(np.abs(boosted.predict(eta.x_test) - eta.y_test).mean())
    eta_s = time.perf_counter() - started
    return {
        "digits": {"model": "LogisticRegression", "accuracy": digits_acc, "fit_seconds": digits_s},
        "delivery-eta": {"model": "HistGradientBoostingRegressor", "mae": eta_mae, "fit_seconds": eta_s},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    runs = {"digits": [], "delivery-eta": []}
    with tempfile.TemporaryDirectory(prefix="pollinate-bench-") as scratch:
        home = Path(scratch) / "store"
        for seed in args.seeds:
            summary, wall = pollinate_train(home, "--dataset", "digits", "--model", "cnn", "--epochs", "15", "--seed", str(seed))
            runs["digits"].append({"seed": seed, "accuracy": summary["metrics"]["accuracy"],
                                   "baseline_accuracy": summary["baseline"]["accuracy"],
                                   "train_seconds": summary["train_seconds"], "wall_seconds": wall,
                                   "parameters": summary["parameters"]})
            summary, wall = pollinate_train(home, "--dataset", "delivery-eta", "--seed", str(seed))
            runs["delivery-eta"].append({"seed": seed, "mae": summary["metrics"]["mae"],
                                         "rmse": summary["metrics"]["rmse"],
                                         "baseline_mae": summary["baseline"]["mae"],
                                         "mae_reduction": summary["metrics"]["mae_reduction"],
                                         "train_seconds": summary["train_seconds"], "wall_seconds": wall,
                                         "parameters": summary["parameters"]})
    references = sklearn_references()

    digits_acc = [r["accuracy"] for r in runs["digits"]]
    eta_mae = [r["mae"] for r in runs["delivery-eta"]]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "runs": runs,
        "references": references,
        "summary": {
            "digits_cnn_accuracy_min": min(digits_acc),
            "digits_cnn_accuracy_mean": statistics.mean(digits_acc),
            "digits_wall_seconds_max": max(r["wall_seconds"] for r in runs["digits"]),
            "digits_vs_logistic_regression": statistics.mean(digits_acc) / references["digits"]["accuracy"],
            "eta_mae_mean": statistics.mean(eta_mae),
            "eta_mae_reduction_min": min(r["mae_reduction"] for r in runs["delivery-eta"]),
            "eta_mae_vs_gradient_boosting": statistics.mean(eta_mae) / references["delivery-eta"]["mae"],
        },
        "targets": {"digits_accuracy": 0.95, "digits_wall_seconds": 120, "eta_mae_reduction": 0.30},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    lines = [
        "# Central training benchmark",
        "",
        f"`benchmarks/train.py`, seeds {args.seeds}, {os.cpu_count()} CPUs. Wall time = the whole "
        "`pollinate train` process (Python start, TensorFlow import, data, training, evaluation, report, store).",
        "",
        "| run | seed | metric | model | baseline | train s | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs["digits"]:
        lines.append(f"| digits cnn, 15 epochs | {r['seed']} | accuracy | {r['accuracy']:.4f} | "
                     f"{r['baseline_accuracy']:.4f} (majority) | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    for r in runs["delivery-eta"]:
        lines.append(f"| delivery-eta mlp, 15 epochs | {r['seed']} | MAE (min) | {r['mae']:.3f} | "
                     f"{r['baseline_mae']:.3f} (mean) | {r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    lines += [
        "",
        "| reference (scikit-learn, same splits) | metric | value | ours / reference |",
        "|---|---|---|---|",
        f"| digits: {references['digits']['model']} | accuracy | {references['digits']['accuracy']:.4f} | "
        f"{s['digits_vs_logistic_regression']:.3f} |",
        f"| delivery-eta: {references['delivery-eta']['model']} | MAE | {references['delivery-eta']['mae']:.3f} | "
        f"{s['eta_mae_vs_gradient_boosting']:.3f} |",
        "",
        f"Targets: digits accuracy ≥ 0.95 (min over seeds {s['digits_cnn_accuracy_min']:.4f}) in under 120 s "
        f"(max wall {s['digits_wall_seconds_max']:.1f} s); delivery-eta MAE ≥ 30% below the mean baseline "
        f"(min reduction {100 * s['eta_mae_reduction_min']:.1f}%).",
        "",
    ]
    (RESULTS / "train.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
