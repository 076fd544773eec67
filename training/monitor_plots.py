"""PNG plots of a model in the field (`pollinate monitor NAME --plot DIR`): telemetry volume,
field accuracy (or MAE) with its interval, and drift over time, plus drift per feature.
Rendered off-screen (Agg) from Monitor.timeline / Monitor.report, one file each."""

from __future__ import annotations

from pathlib import Path

from .plots import _pyplot


def write_plots(report: dict, timeline: dict, folder: Path, *, psi_threshold: float = 0.2) -> list[Path]:
    """volume.png, field_accuracy.png (or field_mae.png), drift_over_time.png, drift_features.png."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, bucket = timeline["model"], timeline["bucket"]
    versions = timeline["versions"]
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = folder / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(8, 4))
    for v, rows in sorted(versions.items(), key=lambda kv: int(kv[0])):
        ax.plot([r["bucket"] for r in rows], [r["predictions"] for r in rows], marker="o", label=f"v{v}")
    ax.set_title(f"{model}: predictions per {bucket}")
    ax.set_ylabel("predictions")
    _finish(ax, versions)
    save(fig, "volume.png")

    metric = "field_mae" if any("field_mae" in r for rows in versions.values() for r in rows) else "field_accuracy"
    fig, ax = plt.subplots(figsize=(8, 4))
    for v, rows in sorted(versions.items(), key=lambda kv: int(kv[0])):
        points = [(r["bucket"], r[metric]) for r in rows if r.get(metric)]
        if not points:
            continue
        xs = [b for b, _ in points]
        ax.plot(xs, [m["value"] for _, m in points], marker="o", label=f"v{v}")
        ax.fill_between(xs, [m["low"] for _, m in points], [m["high"] for _, m in points], alpha=0.2)
    ax.set_title(f"{model}: {metric.replace('_', ' ')} per {bucket} (95% interval)")
    _finish(ax, versions)
    save(fig, f"{metric}.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for v, rows in sorted(versions.items(), key=lambda kv: int(kv[0])):
        points = [(r["bucket"], r["drift"]) for r in rows if r.get("drift") is not None]
        if points:
            ax.plot([b for b, _ in points], [d for _, d in points], marker="o", label=f"v{v}")
    ax.axhline(psi_threshold, color="red", linestyle="--", linewidth=1, label=f"alert (PSI {psi_threshold:g})")
    ax.set_title(f"{model}: largest feature PSI per {bucket}")
    _finish(ax, versions)
    save(fig, "drift_over_time.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    names: list[str] = []
    for summary in report["versions"].values():
        names += [n for n in summary.get("drift", {}) if n not in names]
    width = 0.8 / max(1, len(report["versions"]))
    for i, (v, summary) in enumerate(sorted(report["versions"].items(), key=lambda kv: int(kv[0]))):
        drift = summary.get("drift", {})
        ax.bar([j + i * width for j in range(len(names))], [drift.get(n, {}).get("psi", 0) for n in names],
               width=width, label=f"v{v}")
    ax.axhline(psi_threshold, color="red", linestyle="--", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_title(f"{model}: PSI per feature over the period")
    ax.legend()
    save(fig, "drift_features.png")
    return written


def _finish(ax, versions: dict) -> None:
    if versions:
        ax.legend()
    for label in ax.get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")
