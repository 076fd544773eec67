"""What one update may do to a round: the robust defaults, in one place.

Two places aggregate updates they cannot trust, and both screen them here with the same
rules before averaging:
- the edge gateway (gateway.py), over the device updates of its task (anonymous browsers
  and phones, each claiming how many examples it trained on);
- the update guard (strategies.py), over a round's Flower replies (SuperNodes, simulated
  clients, gateways answering for their devices), before the user's strategy (FedAvg by
  default) sees them.

The rules (`screen`), each cheap: one L2 norm and one dot product per update (two passes
over the updates, as many as FedAvg's own mean), then medians over a few numbers.

1. **A bound**, when there is one (`norm_bound` > 0: the operator's fixed value): an update
   whose L2 norm is over it is set aside (`norm_bound`).
2. **Outliers.** An update whose norm is over `norm_multiple` × the median norm of the
   round's updates is set aside (`norm_outlier`). The median is the honest updates'
   scale as long as most updates are honest: a few attackers cannot move it, whatever they
   send. With fewer than MIN_FOR_MEDIAN updates a round's own median means little (of two
   updates, one may be the attacker), so the median of the previous round's kept updates
   stands in when known (`reference_median`); with neither, only the bound applies.
3. **Direction.** An update that opposes the round is set aside (`direction`): its cosine
   with the mean of the round's other kept updates is below −`direction_ratio` × the
   round's median cosine (it points away from the others at least half as strongly as a
   typical update agrees with them) and below −DIRECTION_FLOOR. A sign-flipped honest
   update has the norm of an honest one but the opposite direction, at about minus the
   round's median cosine. Measured on digits: ten MLP devices, honest 0.4–0.8 (0.4 on
   Dirichlet α=0.5 shards), flipped −0.45; twenty CNN clients on Dirichlet α=0.5 shards,
   a round's median 0.08–0.35 and its lowest honest cosine −0.04 (benchmarks/results/
   federated.md: no honest update set aside in the clean run). On non-IID data a flipped copy of one device's update
   also erases what that device's classes taught the round (8 accuracy points in two
   rounds, measured): the norm rule cannot see it, this rule does. The limit follows the
   round's own agreement, so a round whose updates barely agree (late rounds, very
   different shards) is not thinned out: there a flipped update opposes little signal, and
   honest updates scatter around a small median (independent directions: about ±1/√size),
   which the floor keeps clear of. A round without agreement (median cosine ≤ 0) has no
   direction to oppose. It needs MIN_FOR_DIRECTION updates: among three non-IID
   updates one honest update measured −0.14 against the mean of the other two.
4. **The weight an `examples` claim buys is capped** at `examples_multiple` × the median
   claim per contributor of the kept updates (and at `examples_cap` per contributor when
   set), times the update's contributors (a device is one; a gateway counts the device
   updates it aggregated, so a gateway holding 18 devices' examples is not cut down to one
   device's worth). A claim of 10,000,000 examples weighs no more than two median devices,
   and no more than one when its update was kept with a negative cosine (in a round whose
   updates barely agree a flipped update can stay above the direction limit; measured, two
   such updates claiming 10,000,000 at twice the median weight cost a round 2.6 points).

What the rules leave: an update with an honest norm, a direction that agrees with the
round and an honest-sized claim, which moves the aggregate by at most its share of the
weight (benchmarks/results/federated.md and edge.md measure each attack against a clean
run). The acceptance gate (acceptance.py) catches what still makes a round worse.

Why not Flower's robust strategies instead: FedMedian, FedTrimmedAvg, Krum and Bulyan
replace the mean (and each costs several times FedAvg's aggregation,
benchmarks/results/federated.md), and DP clipping clips to a fixed norm the user must
guess. Screening keeps the user's strategy (FedAvg, FedProx, FedAdam...) and its cost, and
the robust strategies still work on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from core.errors import InvalidInput

# Measured on the digits CNN, Dirichlet α=0.5 partitions (benchmarks/results/federated.md,
# edge.md): the largest honest update's norm is 1.3–1.5× the round's median (more local
# examples, more steps); −base, ×20 scaling and noise are 10× to 1000× it.
NORM_MULTIPLE = 4.0
# Set aside below −this × the round's median cosine with the others' mean (0: never).
DIRECTION_RATIO = 0.5
DIRECTION_FLOOR = 0.15  # ... and below −this, whatever the median (honest: down to −0.11, measured)
# An honest claim's weight is cut at 2× the round's median claim: the largest honest
# partitions keep most of their weight (measured: FedAvg's clean accuracy the same as with
# no screening, within run-to-run noise), a lie of 10,000,000 weighs two median devices.
EXAMPLES_MULTIPLE = 2.0
MIN_FOR_MEDIAN = 3  # updates a round needs before its own median norm is trusted
MIN_FOR_DIRECTION = 5  # ... and before "the mean of the others" is a direction

REASONS = {
    "norm_bound": "L2 norm over the fixed bound",
    "norm_outlier": "L2 norm far over the round's median",
    "direction": "points away from the round's other updates",
}


@dataclass(frozen=True)
class RobustPolicy:
    """The screening settings (module docstring); defaults are the measured ones."""

    norm_multiple: float = NORM_MULTIPLE  # 0: no outlier rule
    norm_bound: float = 0.0  # a fixed L2 bound on an update; 0: none
    direction_ratio: float = DIRECTION_RATIO  # 0: no direction rule
    examples_multiple: float = EXAMPLES_MULTIPLE  # 0: no cap from the round's median claim
    examples_cap: int = 0  # a fixed cap per contributor; 0: none

    def check(self) -> RobustPolicy:
        for name in ("norm_multiple", "norm_bound", "examples_multiple"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"--{name.replace('_', '-')} must be a number ≥ 0 (0: off)")
        if 0 < self.norm_multiple < 1:
            raise InvalidInput("--norm-multiple must be ≥ 1 (an update at the round's median norm is honest) or 0 (off)")
        if 0 < self.examples_multiple < 1:
            raise InvalidInput("--examples-multiple must be ≥ 1 or 0 (off)")
        if not (math.isfinite(self.direction_ratio) and self.direction_ratio >= 0):
            raise InvalidInput("--direction-ratio must be a number ≥ 0 (0: off)")
        if self.examples_cap < 0:
            raise InvalidInput("--examples-cap must be ≥ 0 (0: none)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Screening:
    """What `screen` decided about a round's updates (indices into its inputs)."""

    kept: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # per kept update: its capped example weight
    set_aside: dict[int, str] = field(default_factory=dict)  # index -> reason (a REASONS key)
    details: dict[int, str] = field(default_factory=dict)  # index -> the reason in words, with numbers
    capped: int = 0  # kept updates whose claim was cut
    norm_median: float | None = None  # over the round's updates (before setting any aside)
    kept_norm_median: float | None = None  # over the kept ones: the next round's reference
    kept_norm_max: float | None = None  # the largest kept norm (its ratio to the median: honest spread)
    norm_limit: float | None = None  # the outlier limit used, if any
    cosine_min: float | None = None  # the lowest cosine with the others' mean (before setting aside)
    cosine_median: float | None = None  # the round's median cosine with the others' mean
    examples_cap: float | None = None  # the cap per contributor used, if any

    def counts(self) -> dict[str, int]:
        """Updates set aside, per reason."""
        out: dict[str, int] = {}
        for reason in self.set_aside.values():
            out[reason] = out.get(reason, 0) + 1
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        """The JSON-friendly record of the round (history rows, lineage, a gateway's outcome)."""
        return {"set_aside": self.counts(), "examples_capped": self.capped,
                "norm_median": self.norm_median, "kept_norm_median": self.kept_norm_median,
                "kept_norm_max": self.kept_norm_max,
                "norm_limit": self.norm_limit, "cosine_min": self.cosine_min,
                "cosine_median": self.cosine_median,
                "examples_cap": self.examples_cap}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


Pieces = Callable[[int], Iterable[np.ndarray]]


def cosines_to_the_others(pieces: Pieces, indices: list[int], norms: list[float]) -> dict[int, float]:
    """Each update's cosine with the sum (so the mean) of the other updates in `indices`,
    in two passes and one model-sized buffer: S = Σ d_j, then d_i·(S − d_i) / (‖d_i‖ ‖S − d_i‖)
    with ‖S − d_i‖² = ‖S‖² − 2 d_i·S + ‖d_i‖². `pieces(i)` yields update i's delta as float
    arrays (one flat vector, or one per weight array), the same way every time. float32
    throughout (a cosine needs no more), so the cost is that of two means."""
    total: list[np.ndarray] | None = None
    for i in indices:
        parts = [np.asarray(p).reshape(-1) for p in pieces(i)]
        if total is None:
            total = [p.astype(np.float32) for p in parts]  # a copy: the buffer S
        else:
            for acc, p in zip(total, parts):
                acc += p
    if total is None:
        return {}
    total_sq = float(sum(float(np.dot(t, t)) for t in total))
    out = {}
    for i in indices:
        dot = float(sum(float(np.dot(np.asarray(p, np.float32).reshape(-1), t)) for p, t in zip(pieces(i), total)))
        own = norms[i] ** 2
        rest = math.sqrt(max(total_sq - 2 * dot + own, 0.0))
        out[i] = (dot - own) / (norms[i] * rest) if norms[i] > 0 and rest > 0 else 1.0
    return out


def screen(norms: list[float], claims: list[float], policy: RobustPolicy, *, contributors: list[int] | None = None,
           reference_median: float | None = None, pieces: Pieces | None = None) -> Screening:
    """Decide which of a round's updates count and what each one weighs.

    `norms`: each update's L2 norm (finite: malformed updates were refused before);
    `claims`: each one's example count; `contributors`: how many devices each stands for
    (default 1 each); `reference_median`: the previous round's median norm of kept updates,
    used when this round has too few updates for its own; `pieces(i)`: update i's delta
    (see cosines_to_the_others), for the direction rule (None: no direction rule)."""
    count = len(norms)
    if len(claims) != count or (contributors is not None and len(contributors) != count):
        raise ValueError("one norm, one claim and one contributor count per update")
    units = [max(1, int(c)) for c in contributors] if contributors is not None else [1] * count
    out = Screening()
    if count == 0:
        return out
    out.norm_median = median(norms)
    own = count >= MIN_FOR_MEDIAN
    scale = out.norm_median if own else reference_median
    if policy.norm_multiple > 0 and scale is not None and scale > 0:
        out.norm_limit = policy.norm_multiple * scale
    for i, norm in enumerate(norms):
        if policy.norm_bound > 0 and norm > policy.norm_bound:
            out.set_aside[i] = "norm_bound"
            out.details[i] = f"L2 norm {norm:.4g} over the bound {policy.norm_bound:.4g}"
        elif out.norm_limit is not None and norm > out.norm_limit:
            out.set_aside[i] = "norm_outlier"
            out.details[i] = (f"L2 norm {norm:.4g} over {policy.norm_multiple:g}× the "
                              f"{'round' if own else 'previous round'}'s median {scale:.4g}")
        else:
            out.kept.append(i)
    cosines: dict[int, float] = {}
    if pieces is not None and policy.direction_ratio > 0 and len(out.kept) >= MIN_FOR_DIRECTION:
        cosines = cosines_to_the_others(pieces, out.kept, norms)
        out.cosine_min, out.cosine_median = min(cosines.values()), median(list(cosines.values()))
        if out.cosine_median > 0:
            floor = -max(policy.direction_ratio * out.cosine_median, DIRECTION_FLOOR)
            for i, cosine in cosines.items():
                if cosine < floor:
                    out.set_aside[i] = "direction"
                    out.details[i] = (f"cosine {cosine:.2f} with the mean of the round's other updates, under "
                                      f"{floor:.2f} (the round's median is {out.cosine_median:.2f})")
            out.kept = [i for i in out.kept if i not in out.set_aside]
    if not out.kept:
        return out
    out.kept_norm_median = median([norms[i] for i in out.kept])
    out.kept_norm_max = max(norms[i] for i in out.kept)
    per_unit = [float(claims[i]) / units[i] for i in out.kept]
    caps = []
    if policy.examples_multiple > 0:
        caps.append(policy.examples_multiple * median(per_unit))
    if policy.examples_cap > 0:
        caps.append(float(policy.examples_cap))
    out.examples_cap = max(1.0, min(caps)) if caps else None
    # weight beyond the median claim is for updates that go the round's way: one kept with a
    # negative cosine (mildly against the others) weighs at most a median claim
    against = max(1.0, median(per_unit)) if policy.examples_multiple > 0 else None
    for i in out.kept:
        claim = float(claims[i])
        cap = out.examples_cap
        if against is not None and cosines.get(i, 1.0) < 0:
            cap = against if cap is None else min(cap, against)
        if cap is not None and claim > cap * units[i]:
            claim = cap * units[i]
            out.capped += 1
        out.weights.append(claim)
    return out
