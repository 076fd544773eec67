"""The acceptance gate: no channel moves to a round that made the model worse.

Every round's aggregate is evaluated on the federation's held-out test split (server_app.py
does that anyway). The gate compares it with the *last accepted* model: the last round that
passed, or the federation's start (its central evaluation before round 1). A round worse by
more than the threshold is *held*:

- it is still published when due (a version to inspect: `pollinate models show`), its
  lineage says why (`lineage.extra.gate`), but its channel does not move;
- the next round trains from the last accepted model, not from the held one, so one bad
  round (poisoned, or just unlucky) does not carry over; in edge rounds devices get that
  accepted version as their base (server_app.py);
- the versions published after it name the last accepted version as their parent, and are
  compared with it.

Worse means, for a classifier, test accuracy lower by more than `threshold` (0.02: two
accuracy points, on digits about five test images); for a regressor, test MAE higher by
more than `threshold` relative to the accepted one's (0.02: 2% worse). Accuracy is bounded
and read in points; an MAE has the target's units, so only a ratio means the same for every
dataset. `gate=False` turns the gate off: every round is accepted, as before issue 19.

The threshold must sit above the held-out set's own noise. On digits (269 test images, one
image 0.37 points) honest rounds move ±1 point; after a lucky round the next ones can fall
2 points short of it and be held until one matches it, and devices that train
deterministically on fixed data (the benchmark's simulated fleet) repeat the same held
round from the same accepted model (benchmarks/results/edge.md held rounds 8–10 that way;
the channel kept the best version). Evaluate on a larger held-out set, or raise
`gate_threshold`, where that matters more than holding a 2-point regression.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Verdict:
    """What the gate decided about one round (the row's and the lineage's `gate`)."""

    passed: bool
    metric: str  # "accuracy" or "mae"
    value: float
    reference: float  # the last accepted model's value
    reference_round: int  # its round (the federation's start round for the start model)
    threshold: float
    reason: str | None = None  # why it was held; None when it passed

    def to_dict(self) -> dict:
        return asdict(self)


class AcceptanceGate:
    """Judges rounds against the last accepted one; remembers what it accepted."""

    def __init__(self, threshold: float = 0.02, enabled: bool = True):
        self.threshold = float(threshold)
        self.enabled = enabled
        self.metric: str | None = None
        self.reference: float | None = None
        self.reference_round = 0
        self.accepted_arrays = None  # the last accepted model's arrays (None: the start's)

    def start(self, round: int, test: dict) -> None:
        """The federation's start model: the first reference."""
        self.metric = "accuracy" if "accuracy" in test else "mae"
        self.reference = float(test[self.metric])
        self.reference_round = round

    def judge(self, round: int, test: dict, arrays=None) -> Verdict:
        """Pass or hold `round` (its test metrics); a passing round becomes the reference."""
        if self.metric is None or self.reference is None:
            self.start(round - 1, test)
        value = float(test[self.metric])
        reference, reference_round = self.reference, self.reference_round
        if self.metric == "accuracy":
            worse = reference - value > self.threshold
            how = (f"test accuracy {value:.4f} is {100 * (reference - value):.1f} points below "
                   f"{reference:.4f} (round {reference_round}, the last accepted); the gate allows "
                   f"{100 * self.threshold:g}")
        else:
            worse = value > reference * (1 + self.threshold)
            above = 100 * (value / reference - 1) if reference > 0 else float("inf")
            how = (f"test MAE {value:.4g} is {above:.1f}% above {reference:.4g} "
                   f"(round {reference_round}, the last accepted); the gate allows {100 * self.threshold:g}%")
        held = self.enabled and worse
        if not held:
            self.reference, self.reference_round = value, round
            self.accepted_arrays = arrays
        return Verdict(passed=not held, metric=self.metric, value=value, reference=reference,
                       reference_round=reference_round, threshold=self.threshold,
                       reason=f"held by the acceptance gate: {how}" if held else None)
