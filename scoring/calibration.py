"""Label-prior correction of an adapter's label distribution, fitted on held-out training utterances.

A small model fine-tuned on MELD (47 % neutral) leans to its majority label, which costs weighted F1 on
every other class. The correction divides each label's probability by the model's own mean probability
for that label on held-out data, raised to a power: ``p'(y) ∝ p(y) / prior(y) ** power``. The power is the
value of a grid that maximises weighted F1 on those held-out utterances — never on the dev set the adapter
is reported on. ``power = 0`` leaves the model's distribution as it is; 1 is full prior division.

The fitted correction is part of the adapter's metadata (``erc_meta.json``: ``calibration``), so serving,
evaluation and both backends apply the same one, and emitted probabilities are the corrected ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

#: Powers tried when fitting; 0 keeps the uncorrected model in the running.
POWERS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class Calibration:
    prior: dict[str, float]
    power: float
    n: int = 0  # held-out utterances it was fitted on
    weighted_f1_before: float | None = None  # on those utterances, power 0
    weighted_f1_after: float | None = None  # on those utterances, the chosen power
    dtype: str | None = None  # of the weights that scored them (model_store/post_training.py: the serving one)

    def apply(self, dist: Mapping[str, float]) -> dict[str, float]:
        """The corrected, renormalised distribution (labels missing from the prior are left unscaled)."""
        if self.power == 0:
            return dict(dist)
        scaled = {k: v / max(self.prior.get(k, 1.0), 1e-6) ** self.power for k, v in dist.items()}
        total = sum(scaled.values()) or 1.0
        return {k: v / total for k, v in scaled.items()}

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "Calibration | None":
        return cls(**data) if data else None


def _weighted_f1(gold: Sequence[str], dists: Sequence[Mapping[str, float]], cal: Calibration) -> float:
    from sklearn.metrics import f1_score

    pred = [max(d, key=d.__getitem__) for d in (cal.apply(d) for d in dists)]
    return 100 * f1_score(gold, pred, average="weighted", zero_division=0)


def fit(dists: Sequence[Mapping[str, float]], gold: Sequence[str], powers: Sequence[float] = POWERS) -> Calibration:
    """The prior (mean probability per label) and the power with the best weighted F1 on these items.

    Ties go to the smaller power: the least correction that does as well.
    """
    if not dists:
        raise ValueError("calibration needs at least one held-out utterance")
    labels = list(dists[0])
    prior = {lab: sum(d[lab] for d in dists) / len(dists) for lab in labels}
    scores = [(_weighted_f1(gold, dists, Calibration(prior, p)), -p) for p in powers]
    best_f1, neg_power = max(scores)
    base = next(f1 for f1, neg in scores if neg == 0) if 0 in powers else None
    return Calibration(
        prior={k: round(v, 6) for k, v in prior.items()}, power=-neg_power, n=len(dists),
        weighted_f1_before=None if base is None else round(base, 2), weighted_f1_after=round(best_f1, 2),
    )

