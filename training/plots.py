"""PNG plots of a training run: learning curves, confusion matrix or predicted-vs-actual,
and a reliability diagram. Rendered off-screen (Agg), one file each."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: dict[str, list[float]], path: Path, *, title: str) -> Path:
    plt = _pyplot()
    metrics = [m for m in history if not m.startswith("val_")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], marker="o", ms=3, label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path, *, title: str) -> Path:
    plt = _pyplot()
    matrix = np.asarray(matrix)
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 10 else 0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if len(labels) <= 20:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > threshold else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def predicted_vs_actual(y_true: np.ndarray, y_pred: np.ndarray, path: Path, *, title: str, unit: str = "") -> Path:
    plt = _pyplot()
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y_true, y_pred, s=6, alpha=0.35)
    low, high = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([low, high], [low, high], color="black", lw=1, label="perfect")
    ax.set_xlabel(f"actual {unit}".strip())
    ax.set_ylabel(f"predicted {unit}".strip())
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability(calibration: dict, path: Path, *, title: str, regression: bool = False) -> Path:
    """Confidence vs accuracy per bin (classification) or mean predicted vs mean actual
    (regression), with how many test examples each bin holds underneath: a bin of three
    examples should not look as convincing as a bin of three hundred."""
    plt = _pyplot()
    bins = [b for b in calibration["bins"] if b["count"]]
    fig, (ax, counts_ax) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    if regression:
        x = [b["mean_predicted"] for b in bins]
        y = [b["mean_actual"] for b in bins]
        ax.set_ylabel("mean actual")
        counts_ax.set_xlabel("mean predicted (per decile)")
        widths = [max(b["upper"] - b["lower"], 1e-9) * 0.9 for b in bins]
        low, high = (min(x + y), max(x + y)) if x else (0.0, 1.0)
    else:
        x = [b["confidence"] for b in bins]
        y = [b["accuracy"] for b in bins]
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        counts_ax.set_xlabel("confidence (top probability)")
        widths = [(b["upper"] - b["lower"]) * 0.9 for b in bins]
        low, high = 0.0, 1.0
        title = f"{title} (ECE {calibration['ece']:.3f})"
    total = sum(b["count"] for b in bins) or 1
    ax.plot([low, high], [low, high], color="black", lw=1, label="perfectly calibrated")
    if x:
        sizes = [20 + 300 * b["count"] / total for b in bins]
        ax.plot(x, y, color="tab:blue", lw=1, alpha=0.6)
        ax.scatter(x, y, s=sizes, color="tab:blue", zorder=3, label="model (area ∝ examples)")
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    counts_ax.bar(centres, [b["count"] for b in bins], width=widths, color="tab:gray")
    counts_ax.set_ylabel("examples")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    counts_ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
