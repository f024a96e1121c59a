"""Student's t intervals over seeds, paired comparisons and the verdict rule of the reports.

Every accuracy comparison of a study is paired by seed: seed ``s`` of config A and seed ``s``
of config B see the same training images in the same order with the same augmentation, so
the per-seed difference ``A(s) - B(s)`` carries less data noise than two independent means.
A finding *holds* or *does not hold* only when the 95 % interval of that paired difference
(Student's t over the seeds' differences) excludes zero; otherwise it is *unresolved at this
scale*, reported with the minimum detectable difference at the observed paired spread. With
one seed there is no interval and every accuracy finding is *unresolved (one seed)*.

scipy is not a dependency: the t distribution's CDF has a closed form for integer degrees of
freedom (Abramowitz and Stegun 26.7.3 and 26.7.4), inverted here by bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95  # two-sided coverage of every interval
POWER = 0.80  # power at which the minimum detectable difference is stated

HOLDS = "holds"
FAILS = "does not hold"
UNRESOLVED = "unresolved at this scale"
ONE_SEED = "unresolved (one seed)"
NOT_MEASURED = "not measured"
VERDICTS = (HOLDS, FAILS, UNRESOLVED, ONE_SEED, NOT_MEASURED)

Series = Mapping[int, float]  # seed -> value (an accuracy in %, or a per-seed statistic)


def t_cdf(t: float, df: int) -> float:
    """``P(T <= t)`` for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    df = int(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * j) / (2 * j + 1)
        inside = 2 / math.pi * (theta + sin * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, total = 1.0, 0.0
        for j in range(df // 2):
            total += term
            term *= cos2 * (2 * j + 1) / (2 * j + 2)
        inside = sin * total
    # ``inside`` is P(|T| <= |t|).
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """The mean of per-seed values with its Student's t interval.

    Attributes:
        mean: Mean over the seeds.
        half_width: Half-width of the :data:`CONFIDENCE` interval (None with one seed).
        sd: Sample standard deviation over the seeds (None with one seed).
        seeds: The seeds the values came from.

    """

    mean: float
    half_width: float | None
    sd: float | None
    seeds: tuple[int, ...]

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.seeds)

    @property
    def low(self) -> float | None:
        """Lower end of the interval (None with one seed)."""
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        """Upper end of the interval (None with one seed)."""
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def detectable(self) -> float | None:
        """Minimum detectable difference: two-sided 5 % test, :data:`POWER` power.

        ``(t_0.975 + t_0.80) * sd / sqrt(n)`` with ``n - 1`` degrees of freedom, at the observed
        spread of the per-seed values (None with one seed).
        """
        if self.sd is None:
            return None
        df = self.n - 1
        t_sum = t_quantile(0.5 + CONFIDENCE / 2, df) + t_quantile(POWER, df)
        return t_sum * self.sd / math.sqrt(self.n)

    def to_dict(self) -> dict[str, float | int | list[int] | None]:
        """JSON-able form, with the interval's ends and the detectable difference."""
        return dict(
            mean=self.mean,
            low=self.low,
            high=self.high,
            half_width=self.half_width,
            sd=self.sd,
            detectable=self.detectable,
            seeds=list(self.seeds),
        )


def interval(values: Sequence[float], seeds: Sequence[int] | None = None) -> Interval:
    """Mean and Student's t interval of ``values`` (one per seed)."""
    if not values:
        raise ValueError("an interval needs at least one value")
    seeds = tuple(seeds) if seeds is not None else tuple(range(len(values)))
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, None, None, seeds)
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + CONFIDENCE / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return Interval(mean, half, sd, seeds)


def common_seeds(series: Iterable[Series]) -> list[int]:
    """The seeds present in every one of ``series``, in order."""
    sets = [set(s) for s in series]
    return sorted(set.intersection(*sets)) if sets else []


def paired(series: Sequence[Series], statistic: Callable[[list[float]], float]) -> Interval | None:
    """Interval of a per-seed statistic of several configs, over the seeds all of them have.

    Args:
        series: Per config, its value for each seed.
        statistic: Maps the configs' values of one seed (in the order of ``series``) to one
            number, e.g. ``lambda v: v[0] - v[1]``.

    Returns:
        The interval, or None when no seed is common to all configs.

    """
    seeds = common_seeds(series)
    if not seeds:
        return None
    return interval([statistic([s[seed] for s in series]) for seed in seeds], seeds)


def difference(a: Series, b: Series) -> Interval | None:
    """Interval of ``a - b``, paired by seed."""
    return paired([a, b], lambda v: v[0] - v[1])


def verdict(diff: Interval | None, claim_positive: bool = True) -> str:
    """The verdict on a claim that ``diff`` is positive (or negative: ``claim_positive=False``).

    It holds or does not hold only when the interval excludes zero.
    """
    if diff is None:
        return NOT_MEASURED
    if diff.half_width is None:
        return ONE_SEED
    if diff.low > 0 or diff.high < 0:  # type: ignore[operator]
        return HOLDS if (diff.mean > 0) == claim_positive else FAILS
    return UNRESOLVED


def all_of(verdicts: Iterable[str]) -> str:
    """Verdict on a claim made of several: fails if one fails, holds only if all hold."""
    verdicts = list(verdicts)
    if not verdicts or NOT_MEASURED in verdicts:
        return NOT_MEASURED if FAILS not in verdicts else FAILS
    if FAILS in verdicts:
        return FAILS
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return ONE_SEED if ONE_SEED in verdicts else UNRESOLVED


def describe(diff: Interval | None, unit: str = "") -> str:
    """``+0.42 [-0.30, +1.14]``: a paired difference and its interval (no interval: one seed)."""
    if diff is None:
        return "not measured"
    if diff.half_width is None:
        return f"{diff.mean:+.2f}{unit} (one seed)"
    return f"{diff.mean:+.2f}{unit} [{diff.low:+.2f}, {diff.high:+.2f}]"
