"""`mmoe.tools.stats` against hand-computed cases: t intervals, paired differences, verdicts and the tokens
to a target loss."""

from __future__ import annotations

import math

import pytest

from mmoe.tools.stats import paired_difference, t_interval, tokens_to_target, verdict

T975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


def test_t_interval_of_three_values():
    st = t_interval([1.0, 2.0, 3.0])
    half = T975_2 * 1.0 / math.sqrt(3)  # s = 1
    assert st["n"] == 3 and st["mean"] == 2.0 and st["std"] == pytest.approx(1.0)
    assert st["half"] == pytest.approx(half) and (st["low"], st["high"]) == pytest.approx((2 - half, 2 + half))
    assert t_interval([5.0, float("nan"), None])["n"] == 1 and t_interval([5.0])["low"] is None
    assert t_interval([])["mean"] is None
    # 90% level: the t quantile 2.919986 (tables)
    assert t_interval([1.0, 2.0, 3.0], level=0.90)["half"] == pytest.approx(2.919986 / math.sqrt(3), rel=1e-6)


def test_paired_difference_and_verdicts():
    d = paired_difference({0: 10.0, 1: 12.0, 2: 11.0, 3: 99.0}, {0: 9.0, 1: 10.0, 2: 10.5})
    assert d["per_seed"] == {0: 1.0, 1: 2.0, 2: 0.5} and d["n"] == 3  # seed 3 has no baseline run
    s = math.sqrt(((1 - 7 / 6) ** 2 + (2 - 7 / 6) ** 2 + (0.5 - 7 / 6) ** 2) / 2)
    assert d["mean"] == pytest.approx(7 / 6) and d["half"] == pytest.approx(T975_2 * s / math.sqrt(3))
    assert verdict(d) == "inconclusive"  # [-0.73, 3.06] holds 0
    lower = paired_difference({0: 9.0, 1: 8.8, 2: 9.1}, {0: 10.0, 1: 10.0, 2: 10.0})  # -1, -1.2, -0.9
    assert lower["high"] < 0 and verdict(lower) == "better" and verdict(lower, better="higher") == "worse"
    assert verdict(paired_difference({0: 1.0}, {0: 2.0})) == "n<2"


def test_tokens_to_target_interpolates_between_evaluations():
    curve = [[10, 3.0], [20, 2.0], [30, 1.5]]
    tokens = [100 * s for s in range(31)]
    assert tokens_to_target(curve, tokens, 2.5) == pytest.approx(1500.0)  # half way from 1000 to 2000
    assert tokens_to_target(curve, tokens, 1.75) == pytest.approx(2500.0)
    assert tokens_to_target(curve, tokens, 3.5) == 1000.0  # reached at the first evaluation
    assert tokens_to_target(curve, tokens, 1.0) is None  # never
    assert tokens_to_target(curve, None, 2.5) == pytest.approx(15.0)  # steps without a token count
