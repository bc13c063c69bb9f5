"""Statistics for comparisons over seeds: Student-t confidence intervals of a mean, paired differences
against a baseline (same seeds, hence the same data order), verdicts that follow from the interval, and the
training tokens a run needed to reach a target validation loss.

With n seeds the interval of the mean is ``mean ± t_{0.975, n-1} * s / sqrt(n)`` (``s`` the sample standard
deviation; scipy's t quantile). A paired difference takes the per-seed differences ``d_i = x_i - base_i``
over the seeds both runs finished and gives their mean and interval: seed-to-seed variation that both
variants share (data order, initialisation) cancels, which is why a comparison pairs runs by seed.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

__all__ = ["t_interval", "paired_difference", "verdict", "tokens_to_target"]


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def t_interval(xs: Sequence[float], level: float = 0.95) -> dict:
    """``{"mean", "low", "high", "half", "std", "n"}`` of the finite values of ``xs``: the Student-t
    interval of the mean at ``level``; ``low``/``high``/``half``/``std`` are None with fewer than 2 values."""
    from scipy.stats import t

    v = _finite(xs)
    n = len(v)
    if not n:
        return {"mean": None, "low": None, "high": None, "half": None, "std": None, "n": 0}
    mean = statistics.fmean(v)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "half": None, "std": None, "n": 1}
    std = statistics.stdev(v)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half": half, "std": std, "n": n}


def paired_difference(values: dict, base: dict, level: float = 0.95) -> dict:
    """The interval of ``values[s] - base[s]`` over the seeds ``s`` both have (finite values), plus
    ``"per_seed": {seed: difference}``."""
    seeds = sorted((s for s in values if s in base and len(_finite([values[s], base[s]])) == 2), key=str)
    diffs = {s: float(values[s]) - float(base[s]) for s in seeds}
    return {**t_interval(list(diffs.values()), level), "per_seed": diffs}


def verdict(diff: dict, better: str = "lower") -> str:
    """``"better"`` / ``"worse"`` when the interval of a paired difference excludes 0 (``better``: the
    metric's good direction), ``"inconclusive"`` when it contains 0, ``"n<2"`` without an interval."""
    low, high = diff.get("low"), diff.get("high")
    if low is None or high is None:
        return "n<2"
    if low > 0 or high < 0:
        up = low > 0
        return "better" if up == (better == "higher") else "worse"
    return "inconclusive"


def tokens_to_target(curve: Sequence[Sequence[float]], tokens: Sequence[int] | None, target_loss: float) -> float | None:
    """Training tokens seen when the validation loss first reached ``target_loss``: ``curve`` holds
    ``[step, loss]`` evaluations in step order, ``tokens[step]`` the tokens seen by then (`mmoe compare`'s
    exact count; steps when None). Linear interpolation between the two evaluations around the crossing;
    None when the run never reached it."""
    def at(step: int) -> float:
        if tokens is None:
            return float(step)
        return float(tokens[min(int(step), len(tokens) - 1)])

    prev = None
    for step, loss in curve:
        if loss <= target_loss:
            if prev is None or prev[1] == loss:
                return at(step)
            (s0, l0) = prev
            frac = (l0 - target_loss) / (l0 - loss)
            return at(s0) + frac * (at(step) - at(s0))
        prev = (step, loss)
    return None
