"""The benches' shared arithmetic: alternating rounds, the median of paired ratios with its
spread, and the flag for a ratio that cannot be right."""

from __future__ import annotations

import pytest

from raysearch.bench.paired import alternate, paired_ratio


def test_arms_alternate_and_swap_order_every_round():
    calls = []
    pairs = alternate(lambda i: calls.append(("a", i)) or 10.0 + i,
                      lambda i: calls.append(("b", i)) or 5.0 + i, rounds=4)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert pairs == [(10.0, 5.0), (11.0, 6.0), (12.0, 7.0), (13.0, 8.0)]
    with pytest.raises(ValueError, match="rounds >= 1"):
        alternate(lambda i: 1.0, lambda i: 1.0, rounds=0)


def test_a_load_change_between_rounds_cancels_in_paired_ratios():
    # The machine gets three times slower after round 2: both arms slow down together. Arm by
    # arm (all of A, then all of B) the ratio would swing; paired by round it stays 0.9.
    load = [1, 1, 3, 3, 1]
    pairs = [(100 / f, 90 / f) for f in load]
    r = paired_ratio(pairs, ceiling=1.0)
    assert r.median == pytest.approx(0.9) and r.low == pytest.approx(0.9)
    assert r.high == pytest.approx(0.9) and r.flag is None and r.value == pytest.approx(0.9)
    assert r.text() == "0.90 (median of 5 paired rounds, range 0.90-0.90)"


def test_the_median_and_spread_of_the_ratios():
    r = paired_ratio([(10, 8), (10, 9), (10, 30), (10, 9.5), (10, 7)])
    assert r.ratios == (0.8, 0.9, 3.0, 0.95, 0.7)
    assert r.median == pytest.approx(0.9)  # one wild round does not move it
    assert (r.low, r.high) == (0.7, 3.0)
    assert (r.q1, r.q3) == (pytest.approx(0.8), pytest.approx(0.95))


def test_an_impossible_ratio_is_flagged_not_reported():
    # A trial faster than the pure model it wraps (bench train once printed 1.63).
    r = paired_ratio([(100, 160), (100, 165), (100, 158)], ceiling=1.0,
                     impossible="a trial cannot be faster than its pure model")
    assert r.value is None and r.flag and "cannot be faster" in r.flag
    assert r.text().startswith("not a result: median ratio 1.60")
    # Rounds that disagree wildly cannot vouch for a median above 1 (seen: 1.95, range 0.33-38).
    r = paired_ratio([(100, 33), (10, 19.5), (1, 38)], ceiling=1.0)
    assert r.value is None and "too noisy" in r.flag
    # Above 1 by less than the noise: a result, not a flag.
    r = paired_ratio([(100, 103), (100, 99), (100, 101), (100, 98)], ceiling=1.0)
    assert r.flag is None and r.value == pytest.approx(1.0)


def test_measurements_must_be_positive():
    with pytest.raises(ValueError, match="no rounds"):
        paired_ratio([])
    with pytest.raises(ValueError, match="> 0"):
        paired_ratio([(0.0, 1.0)])
