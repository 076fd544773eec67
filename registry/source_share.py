"""No single source decides: what a guardrail weighs, source by source.

A guardrail compares the candidate's rate (field accuracy, error-free predictions, shadow
agreement) with the channel's version. Anyone may send feedback and telemetry, so counting
every item as it came would let one address outvote everyone else with a flood of made-up
items. Two rules stop that:

1. **Each source holds at most ``share`` of a side's count.** A *source* is an address
   (server/addresses.py), together with every enrolled device seen at it and every address
   those devices were seen at (rows that share an address or a device are one source: a
   sender cannot split itself into several by rotating tokens behind one address, nor by
   carrying one token across addresses; it can only merge its own). Sources over the share are
   scaled down to the largest cap C with ``C <= share * Σ min(n_i, C)`` (water-filling); a
   source's successes scale with its trials, so its *rate* is kept and only its *weight*
   shrinks. With fewer than 1/share sources no C > 0 fits: nothing counts, and no decision
   can be made — a decision needs at least 1/share distinct sources on each side (10 at the
   default 10 %).

2. **Sources, not items, are the unit of evidence.** The one-sided two-proportion z-test
   runs on the capped counts with the variance of each rate computed across sources (a
   cluster-robust variance: k/(k-1) · Σ (s_i − p̂·n_i)² / (Σ n_i)²). For a source that sends
   one item this is the usual binomial variance; a source that sends many items that all say
   the same thing adds as much spread as it adds pull. Rule 1 alone is not enough: a single
   address capped at 10 % that reports the candidate always wrong lowers a 90 % rate to 81 %,
   which the plain pooled z-test calls significant (p < 0.05) as soon as the honest sides
   hold about 80 items each. With rule 2 that same source gets |z| of about 1.1 (p ≈ 0.13)
   however many items anyone sends; it takes about three addresses that agree to reach
   p < 0.05 (each still capped at 10 %).

Pure Python on a few numbers per source: the caller reads the tallies, this weighs them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_SHARE = 0.10  # docs/monitoring.md: at most 10 % of a side's count from one source
_EPSILON = 1e-12


@dataclass(frozen=True)
class Side:
    """One side of a comparison once weighed: capped successes and trials, how many sources
    they come from, the rate's cluster-robust variance, and the items received before capping."""

    successes: float
    trials: float
    sources: int
    variance: float
    received: float

    @property
    def rate(self) -> float | None:
        return self.successes / self.trials if self.trials > 0 else None


def cap(totals: Iterable[float], share: float) -> float:
    """The largest cap C with C <= share * Σ min(n_i, C); math.inf when no source is over the
    share (nothing to cut), 0 when there are fewer than 1/share sources."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    sizes = sorted((float(n) for n in totals if n > 0), reverse=True)
    if not sizes:
        return math.inf
    rest = sum(sizes)  # Σ of the sources under the cap (all of them, to begin with)
    if sizes[0] <= share * rest * (1 + _EPSILON):
        return math.inf
    for k in range(1, len(sizes) + 1):  # the k largest are cut to C, with C in [sizes[k], sizes[k-1]]
        rest -= sizes[k - 1]
        low = sizes[k] if k < len(sizes) else 0.0
        if share * k >= 1:  # C <= share * (k*C + rest) holds all along the segment
            return sizes[k - 1]
        best = share * rest / (1 - share * k)
        if best >= low * (1 - _EPSILON):
            return min(best, sizes[k - 1])
    return 0.0


def sources(rows: Iterable[tuple[str, str, float, float]]) -> dict[int, list[float]]:
    """{source: [successes, trials]} of rows ``(address, device, successes, trials)``: rows that
    share an address, or a device (``""``: none), belong to one source (union-find)."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(node: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    kept = []
    for address, device, successes, trials in rows:
        if trials <= 0:
            continue
        a = root(("a", address))
        if device:
            d = root(("d", device))
            if a != d:
                parent[d] = a
        kept.append((address, float(successes), float(trials)))
    out: dict[int, list[float]] = {}
    ids: dict[tuple[str, str], int] = {}
    for address, successes, trials in kept:
        key = ids.setdefault(root(("a", address)), len(ids))
        pair = out.setdefault(key, [0.0, 0.0])
        pair[0] += successes
        pair[1] += trials
    return out


def weigh(rows: Iterable[tuple[str, str, float, float]], share: float = DEFAULT_SHARE) -> Side:
    """One side's rows ``(address, device, successes, trials)``, each source capped at ``share``
    of the side's trials, with the rate's variance across sources."""
    per = list(sources(rows).values())
    received = sum(n for _, n in per)
    limit = cap((n for _, n in per), share) if share < 1 else math.inf
    weighed = [(s * min(1.0, limit / n), min(n, limit)) for s, n in per]
    weighed = [(s, n) for s, n in weighed if n > 0]
    successes = sum(s for s, _ in weighed)
    trials = sum(n for _, n in weighed)
    k = len(weighed)
    if k < 2 or trials <= 0:
        return Side(successes, trials, len(per), math.inf if trials <= 0 else 0.0, received)
    rate = successes / trials
    spread = sum((s - rate * n) ** 2 for s, n in weighed)
    return Side(successes, trials, len(per), k / (k - 1) * spread / (trials * trials), received)


def p_worse(candidate: Side, baseline: Side) -> float:
    """One-sided p-value of "the candidate's rate is lower than the baseline's", with each
    rate's variance across sources (1.0 when a side counts nothing or has one source)."""
    if candidate.trials <= 0 or baseline.trials <= 0 or candidate.sources < 2 or baseline.sources < 2:
        return 1.0
    difference = candidate.successes / candidate.trials - baseline.successes / baseline.trials
    se = math.sqrt(candidate.variance + baseline.variance)
    if not math.isfinite(se):
        return 1.0
    if se == 0:
        return 1.0 if difference >= 0 else 0.0
    return 0.5 * math.erfc(-difference / se / math.sqrt(2))
