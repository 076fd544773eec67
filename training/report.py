"""Evaluation reports: the numbers a version is judged by, next to a plain baseline.

Pure numpy on predictions, so the same code scores a Keras model, a TFLite file or a
federated round, and a test can recompute every number independently.
"""

from __future__ import annotations

import numpy as np

from .datasets import CLASSIFICATION, Dataset

CALIBRATION_BINS = 10
EPSILON = 1e-7


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, labels: list[str]) -> dict:
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = len(labels)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, predicted), 1)
    per_class = []
    for c, label in enumerate(labels):
        tp = int(confusion[c, c])
        predicted_c = int(confusion[:, c].sum())
        actual_c = int(confusion[c, :].sum())
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / actual_c if actual_c else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(
            {"label": label, "precision": precision, "recall": recall, "f1": f1, "support": actual_c}
        )
    picked = np.clip(probabilities[np.arange(len(y_true)), y_true], EPSILON, 1.0)
    return {
        "accuracy": float((predicted == y_true).mean()),
        "loss": float(-np.log(picked).mean()),
        "macro_precision": float(np.mean([c["precision"] for c in per_class])),
        "macro_recall": float(np.mean([c["recall"] for c in per_class])),
        "macro_f1": float(np.mean([c["f1"] for c in per_class])),
        "examples": int(len(y_true)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "calibration": confidence_calibration(y_true, probabilities),
    }


def confidence_calibration(y_true: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability bins over the top probability, and the expected calibration error (ECE)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        mean_conf = float(confidence[mask].mean()) if count else None
        accuracy = float(correct[mask].mean()) if count else None
        if count:
            ece += count / len(y_true) * abs(mean_conf - accuracy)
        rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                     "confidence": mean_conf, "accuracy": accuracy})
    return {"bins": rows, "ece": float(ece)}


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    error = y_pred - y_true
    total = float(((y_true - y_true.mean()) ** 2).sum())
    return {
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean())),
        "loss": float((error**2).mean()),
        "r2": float(1.0 - (error**2).sum() / total) if total else 0.0,
        "examples": int(len(y_true)),
        "calibration": binned_predictions(y_true, y_pred),
    }


def binned_predictions(y_true: np.ndarray, y_pred: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Mean actual vs mean predicted per predicted-value decile: a regression reliability table."""
    edges = np.unique(np.quantile(y_pred, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.digitize(y_pred, edges[1:-1], right=True), 0, max(len(edges) - 2, 0))
    rows = []
    for b in range(max(len(edges) - 1, 1)):
        mask = which == b
        count = int(mask.sum())
        rows.append({
            "lower": float(edges[b]), "upper": float(edges[min(b + 1, len(edges) - 1)]), "count": count,
            "mean_predicted": float(y_pred[mask].mean()) if count else None,
            "mean_actual": float(y_true[mask].mean()) if count else None,
        })
    return {"bins": rows}


def baseline_metrics(dataset: Dataset) -> dict:
    """What knowing nothing about the inputs achieves: the majority class, or the mean."""
    if dataset.task == CLASSIFICATION:
        counts = np.bincount(dataset.y_train, minlength=dataset.num_classes)
        majority = int(counts.argmax())
        prior = np.clip(counts / counts.sum(), EPSILON, 1.0)
        return {
            "kind": "majority class",
            "prediction": dataset.labels[majority],
            "accuracy": float((dataset.y_test == majority).mean()),
            "loss": float(-np.log(prior[dataset.y_test]).mean()),
        }
    mean = float(dataset.y_train.mean())
    error = dataset.y_test.astype(np.float64) - mean
    return {
        "kind": "training mean",
        "prediction": mean,
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean())),
    }


def evaluate_predictions(dataset: Dataset, predictions: np.ndarray) -> dict:
    """Test-split metrics for `predictions` (probabilities or values), with the baseline and the gain."""
    if dataset.task == CLASSIFICATION:
        metrics = classification_metrics(dataset.y_test, predictions, dataset.labels)
    else:
        metrics = regression_metrics(dataset.y_test, predictions)
    baseline = baseline_metrics(dataset)
    if dataset.task == CLASSIFICATION:
        gain = {"accuracy_gain": metrics["accuracy"] - baseline["accuracy"]}
    else:
        gain = {"mae_reduction": 1.0 - metrics["mae"] / baseline["mae"] if baseline["mae"] else 0.0}
    return {"task": dataset.task, "test": metrics, "baseline": baseline, **gain}


def headline_metrics(evaluation: dict) -> dict:
    """The few numbers worth putting in a manifest or a table."""
    test, baseline = evaluation["test"], evaluation["baseline"]
    if evaluation["task"] == CLASSIFICATION:
        return {
            "accuracy": test["accuracy"],
            "loss": test["loss"],
            "macro_f1": test["macro_f1"],
            "ece": test["calibration"]["ece"],
            "baseline_accuracy": baseline["accuracy"],
        }
    return {
        "mae": test["mae"],
        "rmse": test["rmse"],
        "r2": test["r2"],
        "baseline_mae": baseline["mae"],
        "mae_reduction": evaluation["mae_reduction"],
    }
