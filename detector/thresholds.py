"""Threshold rules: from held-out defect-free scores and a false-alarm target to a threshold.

Each rule is a small object with one verb, `threshold(scores, target)`, so a benchmark can
compare them on the same scores and a config can name one (`calibration.rule`). Scores are
plain numbers: any feature extractor's.

- `EmpiricalQuantile`: the (1 - target) quantile, rounded up to a real score. Exact where
  the scores are many; with fewer than 1 / target it is the highest score.
- `NormalTail`: mean + z(1 - target) standard deviations of a normal fitted to the scores.
- `ParetoTail`: peaks over a threshold: a generalised Pareto fitted to the top `tail_share`
  of the scores, extrapolated to the target (it needs `min_exceedances` of them, else the
  empirical quantile answers and says so).
- `Margin`: a quantile times a factor (SuperADD's 1.421 x the 95th percentile).

Whichever rule sets it, `Calibration.estimate` says what the held-out scores can show about
the false-alarm rate at the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ThresholdRule(Protocol):
    name: str

    def threshold(self, scores: np.ndarray, target: float) -> float: ...


def check_target(target: float) -> float:
    if not (isinstance(target, int | float) and math.isfinite(target) and 0 < target < 1):
        raise ValueError(
            f"The false-alarm target must be a share between 0 and 1 (e.g. 0.01); it is {target}."
        )
    return float(target)


def _scores(scores: np.ndarray | list[float]) -> np.ndarray:
    """The scores as given: one that is not a number (broken features) must make the
    threshold fail its check (`scoring.check_threshold`), not be quietly left out."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("a threshold needs at least one defect-free score")
    return values


@dataclass(frozen=True)
class EmpiricalQuantile:
    name: str = "empirical_quantile"

    def threshold(self, scores: np.ndarray, target: float) -> float:
        values = _scores(scores)
        return float(np.quantile(values, 1.0 - check_target(target), method="higher"))


@dataclass(frozen=True)
class NormalTail:
    name: str = "normal_tail"

    def threshold(self, scores: np.ndarray, target: float) -> float:
        from scipy.stats import norm

        values = _scores(scores)
        spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
        return float(values.mean() + norm.ppf(1.0 - check_target(target)) * spread)


@dataclass(frozen=True)
class ParetoTail:
    tail_share: float = 0.2
    min_exceedances: int = 10
    name: str = "pareto_tail"

    def threshold(self, scores: np.ndarray, target: float) -> float:
        from scipy.stats import genpareto

        values = _scores(scores)
        target = check_target(target)
        # A target inside the body needs no tail; a score that is not a number must reach
        # the threshold check, not a fit.
        if target >= self.tail_share or not np.isfinite(values).all():
            return EmpiricalQuantile().threshold(values, target)
        start = float(np.quantile(values, 1.0 - self.tail_share))
        excess = values[values > start] - start
        if excess.size < self.min_exceedances:
            return EmpiricalQuantile().threshold(values, target)
        shape, _, scale = genpareto.fit(excess, floc=0.0)
        share_above = excess.size / values.size
        return float(start + genpareto.ppf(1.0 - target / share_above, shape, 0.0, scale))


@dataclass(frozen=True)
class Margin:
    quantile: float = 0.95
    factor: float = 1.421
    name: str = "margin"

    def threshold(self, scores: np.ndarray, target: float) -> float:
        check_target(target)  # the rule ignores it, but a bad target is still refused
        return float(self.factor * np.quantile(_scores(scores), self.quantile))


RULES: dict[str, ThresholdRule] = {
    rule.name: rule for rule in (EmpiricalQuantile(), NormalTail(), ParetoTail(), Margin())
}


def rule_named(name: str) -> ThresholdRule:
    if name not in RULES:
        raise ValueError(f"Unknown threshold rule {name!r}: use one of {', '.join(RULES)}.")
    return RULES[name]


def rule_for_new_scores(rule: str) -> str:
    """The rule that sets a threshold on new scores for a version whose threshold was set
    by `rule`: a hand-set ("explicit") threshold has none, so the default one."""
    return rule if rule != "explicit" else "empirical_quantile"
