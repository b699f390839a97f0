"""Numbers over seeds: means with 95% confidence intervals, and paired differences.

A result of one seed is one draw; a comparison of schemes is a statement about the mean over
seeds. :func:`interval` gives the mean, the sample standard deviation and the two-sided
Student-t interval of a list of values; :func:`paired_difference` the same of the differences
between two schemes run on the same seeds (the same data order and augmentation draws), which
removes the part of the run-to-run variation that both share.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Interval", "interval", "paired_difference", "t_quantile"]

# Two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1 .. 30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (the normal 1.960 beyond 30, within 2%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1; got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values, their sample standard deviation and 95% interval of the mean.

    With one value the standard deviation and the interval are undefined (``nan``).
    """

    mean: float
    sd: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (the difference is significant)."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 1) -> str:
        """``"52.3 ± 4.1 [48.2, 56.4]"`` (mean ± sd [95% interval])."""
        if self.n < 2:
            return f"{self.mean:.{digits}f} (1 seed)"
        return (
            f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} "
            f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"
        )


def interval(values: Sequence[float]) -> Interval:
    """Mean, sample sd and 95% Student-t interval of ``values``.

    Raises:
        ValueError: no values, or a value that is not finite.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("interval of no values")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"interval of non-finite values: {values}")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    sd = statistics.stdev(values)
    half = t_quantile(len(values) - 1) * sd / math.sqrt(len(values))
    return Interval(mean, sd, mean - half, mean + half, len(values))


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float]) -> Interval:
    """The interval of ``values[seed] - baseline[seed]`` over the seeds both have.

    Raises:
        ValueError: the two share no seed.
    """
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        raise ValueError("paired difference: the runs share no seed")
    return interval([values[s] - baseline[s] for s in seeds])
