"""Benchmarks, the arithmetic they share: two arms measured in alternating rounds, compared by the
median of their paired ratios, with the spread, and flagged when the ratio cannot be right.

On a shared machine the load changes while a bench runs: measuring arm A for a minute and then
arm B for a minute compares two machines (two runs of ``bench train`` minutes apart gave 0.58 and
1.63). Here the arms take turns in short rounds, A B, B A, A B, ... (the order swaps every round,
so a steady drift in load favours neither arm), and each round gives one ratio B / A measured
under nearly the same load. The median of those ratios is the result, and their min-max range
and interquartile range say how much the machine moved.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PairedRatio", "alternate", "paired_ratio"]


def alternate(first: Callable[[int], float], second: Callable[[int], float], *, rounds: int
              ) -> list[tuple[float, float]]:
    """Measure two arms in ``rounds`` alternating rounds: round ``i`` runs ``first(i)`` then
    ``second(i)`` when ``i`` is even, ``second(i)`` then ``first(i)`` when odd. Each callable
    returns its measurement (a rate: images/s). Returns one ``(first, second)`` pair per round.
    Raises ``ValueError`` for fewer than one round."""
    if rounds < 1:
        raise ValueError(f"`rounds >= 1` must hold, but got {rounds=}")
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            a = first(i)
            b = second(i)
        else:
            b = second(i)
            a = first(i)
        pairs.append((float(a), float(b)))
    return pairs


@dataclass(frozen=True)
class PairedRatio:
    """The median of per-round ratios ``second / first`` and their spread.

    ``ratios``: one per round; ``low``/``high``: their min and max; ``q1``/``q3``: quartiles;
    ``flag``: why the median cannot be taken as a result (it breaks ``ceiling`` by more than the
    noise), or None. ``value`` is the median, or None when flagged.
    """

    median: float
    low: float
    high: float
    q1: float
    q3: float
    ratios: tuple[float, ...]
    flag: str | None = None

    @property
    def value(self) -> float | None:
        return None if self.flag else self.median

    @property
    def noise(self) -> float:
        """Half the interquartile range of the ratios: how far one round strays."""
        return (self.q3 - self.q1) / 2

    def text(self, digits: int = 2, unit: str = "") -> str:
        """'0.93 (median of 5 rounds, range 0.88-0.97)', or the flag."""
        if self.flag:
            return f"not a result: {self.flag}"
        f = f"{{:.{digits}f}}{unit}"
        return (f"{f.format(self.median)} (median of {len(self.ratios)} paired rounds, range "
                f"{f.format(self.low)}-{f.format(self.high)})")


def paired_ratio(pairs: list[tuple[float, float]], *, ceiling: float | None = None,
                 tolerance: float = 0.05, impossible: str = "") -> PairedRatio:
    """The ratios ``second / first`` of ``pairs`` (from :func:`alternate`), their median and
    spread. ``ceiling``: the highest ratio that can be right (1.0 for "a trial cannot be faster
    than the model it wraps"); a median above ``ceiling`` by more than the noise (half the
    interquartile range, and at least ``tolerance * ceiling``) is flagged, with ``impossible``
    saying why it cannot be; so is a median above ``ceiling * (1 + tolerance)`` whose rounds
    disagree so much (the largest ratio over 2x the smallest) that the noise explains anything.
    Raises ``ValueError`` for no pairs or a non-positive measurement.
    """
    if not pairs:
        raise ValueError("no rounds measured")
    if any(not (a > 0 and b > 0) for a, b in pairs):
        raise ValueError(f"every measurement must be > 0, but got {pairs}")
    ratios = tuple(b / a for a, b in pairs)
    median = statistics.median(ratios)
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    result = PairedRatio(median, min(ratios), max(ratios), q1, q3, ratios)
    if ceiling is None or median - ceiling <= tolerance * ceiling:
        return result
    why = impossible or f"the ratio cannot exceed {ceiling:g}"
    span = f"median ratio {median:.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"
    if median - ceiling > result.noise:
        flag = (f"{span} is above {ceiling:g} by more than the noise: {why}; the machine's load "
                "changed under the bench, run it again on a quieter machine")
    elif max(ratios) > 2 * min(ratios):
        flag = (f"{span} is above {ceiling:g} ({why}) and its rounds disagree by more than 2x: "
                "too noisy to be a result; run it again on a quieter machine or with more steps")
    else:
        return result
    return PairedRatio(median, min(ratios), max(ratios), q1, q3, ratios, flag)
