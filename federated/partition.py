"""Splitting one dataset into N clients' local datasets, the way real devices differ.

- `iid`: a seeded shuffle dealt evenly: every client sees the same label mix.
- `dirichlet:α`: per class, shares drawn from Dirichlet(α) over the clients. Small α (0.1)
  gives each client a few dominant labels; large α (100) approaches IID. The standard
  non-IID benchmark partition (Hsu et al., 2019).
- `shards:k`: sort by label, cut into N·k shards, give each client k shards: each client
  holds at most k labels (McMahan et al., 2017).

Every client gets at least `MIN_EXAMPLES` examples (re-drawn otherwise), so none trains on
nothing. Partitions depend only on (labels, scheme, N, seed): a SuperNode recomputes its own
partition from its id without anyone shipping indices around.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import InvalidInput

MIN_EXAMPLES = 2
MAX_REDRAWS = 100


@dataclass(frozen=True)
class Scheme:
    kind: str  # "iid", "dirichlet", "shards"
    alpha: float | None = None
    shards_per_client: int | None = None

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards_per_client}"
        return "iid"


def parse_scheme(text: str) -> Scheme:
    """'iid', 'dirichlet:0.5' or 'shards:2'."""
    text = (text or "").strip().lower()
    if text == "iid":
        return Scheme("iid")
    match = re.fullmatch(r"dirichlet:([0-9.eE+-]+)", text)
    if match:
        try:
            alpha = float(match.group(1))
        except ValueError:
            alpha = -1.0
        if not (alpha > 0 and np.isfinite(alpha)):
            raise InvalidInput(f"dirichlet α must be a positive number, got {match.group(1)!r}")
        return Scheme("dirichlet", alpha=alpha)
    match = re.fullmatch(r"shards:(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return Scheme("shards", shards_per_client=int(match.group(1)))
    raise InvalidInput(f"unknown partition {text!r}: use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or shards:K")


def partition(labels: np.ndarray, num_clients: int, scheme: Scheme | str, seed: int = 0) -> list[np.ndarray]:
    """Index arrays, one per client (sorted), that together cover every example once."""
    if isinstance(scheme, str):
        scheme = parse_scheme(scheme)
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise InvalidInput("the number of clients must be at least 1")
    if num_clients * MIN_EXAMPLES > n:
        raise InvalidInput(f"{n} examples cannot give {num_clients} clients {MIN_EXAMPLES} examples each")
    rng = np.random.default_rng(seed)
    if scheme.kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme.kind == "dirichlet":
        parts = _dirichlet(labels, num_clients, scheme.alpha, rng)
    else:
        parts = _shards(labels, num_clients, scheme.shards_per_client, rng)
    return [np.sort(p.astype(np.int64)) for p in parts]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(MAX_REDRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                buckets[client].append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) >= MIN_EXAMPLES:
            return parts
    # very small α with many clients: top up the emptiest clients from the largest ones
    for part_index in np.argsort([len(p) for p in parts]):
        while len(parts[part_index]) < MIN_EXAMPLES:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[part_index] = np.append(parts[part_index], parts[donor][-1])
            parts[donor] = parts[donor][:-1]
    return parts


def _shards(labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    total = num_clients * per_client
    if total > len(labels):
        raise InvalidInput(f"{num_clients} clients × {per_client} shards needs ≥ {total} examples")
    order = np.lexsort((rng.random(len(labels)), labels))  # by label, ties shuffled
    shards = np.array_split(order, total)
    assignment = rng.permutation(total).reshape(num_clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def skew(histograms: np.ndarray) -> float:
    """Mean total-variation distance between each client's label mix and the global mix:
    0 = every client looks like the whole dataset, → 1 = clients see disjoint labels."""
    totals = histograms.sum(axis=1, keepdims=True).clip(min=1)
    global_mix = histograms.sum(axis=0) / histograms.sum()
    return float(0.5 * np.abs(histograms / totals - global_mix).sum(axis=1).mean())


def partition_summary(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> dict:
    histograms = label_histograms(labels, parts, num_classes)
    sizes = [int(len(p)) for p in parts]
    return {
        "clients": len(parts),
        "sizes": sizes,
        "size_min": min(sizes),
        "size_max": max(sizes),
        "label_histograms": histograms.tolist(),
        "skew": skew(histograms),
    }


def plot_partition(summary: dict, path: Path, *, title: str, label_names: list[str] | None = None) -> Path:
    """Stacked bars: each client's examples, coloured by label."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histograms = np.asarray(summary["label_histograms"])
    clients, classes = histograms.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * clients + 2), 4))
    bottom = np.zeros(clients)
    cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20")
    for c in range(classes):
        ax.bar(np.arange(clients), histograms[:, c], bottom=bottom, color=cmap(c % cmap.N),
               label=label_names[c] if label_names else str(c), width=0.85)
        bottom += histograms[:, c]
    ax.set_xlabel("client (partition id)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("examples")
    ax.set_title(f"{title} — label skew {summary['skew']:.2f}")
    if classes <= 20:
        ax.legend(title="label", fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
