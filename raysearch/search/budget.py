"""Search stage, the budget: how many trials a search proposes and until when.

Two things Ray Tune does not do as raysearch wants them:

* **Extending a finished search.** Tune saves the trial count (``num_samples``) inside the
  search generator's state and restores it as it was: a restored search with a larger count
  ends at once, having proposed nothing. :class:`SampleBudget` takes the count of the run that
  restores it, when that is larger, so the same experiment goes on with new trials; the Optuna
  study (every earlier trial and its values) and ASHA's rungs are restored as on any resume.
* **A time budget that lets running trials finish.** Tune's ``TuneConfig(time_budget_s=...)``
  ends the whole experiment when the time is up and stops the trials running then, mid-epoch,
  leaving them ``unfinished``. raysearch's ``--time-budget`` stops *proposing*: once the deadline
  has passed, :class:`SampleBudget` starts no new trial, the running ones go on to their own end
  (``max_epochs``, their patience, or ASHA's cut at a rung), and the search ends as finished. A
  later run of the same command (with a new budget) proposes the remaining trials.

``parse_duration`` reads ``--time-budget`` values: plain seconds or ``<number><s|m|h|d>``,
combined as in ``1h30m``; this module imports no Ray, so a bad value is refused at once. The
generator, :class:`raysearch.search.searcher.SampleBudget`, lives with the searcher.
"""

from __future__ import annotations

import itertools
import re

from raysearch.errors import ConfigError

__all__ = ["parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])", re.IGNORECASE)


def parse_duration(text: str | float, *, what: str = "--time-budget") -> float:
    """Seconds in ``text``: ``"90"``, ``"90s"``, ``"30m"``, ``"6h"``, ``"1.5h"``, ``"1h30m"``,
    ``"2d"``. Raises :class:`ConfigError` naming ``what`` and the value when it is not a positive
    duration."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip()
        try:
            seconds = float(s)
        except ValueError:
            parts = _PART.findall(s)
            if not parts or _PART.sub("", s).strip():
                raise ConfigError(
                    f"{what}: {text!r} is not a duration; use seconds or a number with a unit, "
                    "e.g. 90s, 30m, 6h, 1h30m"
                ) from None
            units = [u.lower() for _, u in parts]
            rank = [list(_UNITS).index(u) for u in units]  # s < m < h < d
            if any(a <= b for a, b in itertools.pairwise(rank)):
                raise ConfigError(f"{what}: {text!r} repeats or reorders its units; write each "
                                  "unit once, largest first, e.g. 1h30m")
            seconds = sum(float(n) * _UNITS[u] for n, u in zip((n for n, _ in parts), units))
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{what}: must be a positive duration, got {text!r}")
    return seconds
