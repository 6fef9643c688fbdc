"""Statistics shared by every study: confidence intervals, effect sizes and the verdict vocabulary.

Seeds are the unit of replication: a run's number is one sample, intervals are over seeds. Small seed
counts give wide Student-t intervals -- that is the honest answer, not a defect to hide. One seed gives no
interval at all: its bounds are NaN, every check on them is false, and the report shows them as n/a.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import integrate
from scipy import stats as scipy_stats

HOLDS = "holds"
PARTLY = "holds partly"
NOT = "does not hold here"
VERDICTS = (HOLDS, PARTLY, NOT)
CONFIDENCE = 0.95
PERCENT = (0.0, 100.0)  # the range of accuracies in percent, for ``cell`` and the plots' intervals


@dataclass(frozen=True)
class Effect:
    """A named estimate with its 95% interval, the unit it is in, and Hedges' g where two groups were compared."""

    name: str
    estimate: float
    low: float
    high: float
    unit: str
    g: float | None = None

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self, digits: int = 2) -> str:
        g = "" if self.g is None or not math.isfinite(self.g) else f", g = {self.g:.2f}"
        return f"{self.estimate:.{digits}f} {self.unit} {bounds(self.low, self.high, f'.{digits}f')}{g}"


def bounds(low: float, high: float, spec: str = ".2f", scale: float = 1.0) -> str:
    """``[low, high]`` in ``spec``; an undefined bound (one seed, no data) reads ``n/a`` rather than ``nan``."""
    return "[" + ", ".join(format(scale * v, spec) if math.isfinite(v) else "n/a" for v in (low, high)) + "]"


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and Student-t 95% interval over seeds. A single value has no interval (NaN bounds), so no rule can pass
    on one run; identical values from several seeds give a zero-width one."""
    x = _finite(values)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if x.size == 1:
        return m, math.nan, math.nan
    if float(x.std()) == 0.0:
        return m, m, m
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Standardized mean difference (a - b) with the small-sample correction; inf when both groups are constant."""
    x, y = _finite(a), _finite(b)
    if x.size < 2 or y.size < 2:
        return math.nan
    pooled = math.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2))
    diff = float(x.mean() - y.mean())
    if pooled == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    correction = 1 - 3 / (4 * (x.size + y.size) - 9)
    return diff / pooled * correction


def paired_effect(name: str, a: Sequence[float], b: Sequence[float], unit: str) -> Effect:
    """Mean of a - b over seeds (same seed = same data order and init family), t-interval, Hedges' g."""
    diffs = [x - y for x, y in zip(a, b)]
    m, lo, hi = mean_ci(diffs)
    return Effect(name, m, lo, hi, unit, hedges_g(a, b))


def ratio_effect(name: str, a: Sequence[float], b: Sequence[float]) -> Effect:
    """Geometric-mean ratio a / b over seeds, interval from the t-interval of log ratios."""
    logs = [math.log(x / y) for x, y in zip(a, b) if x > 0 and y > 0]
    m, lo, hi = mean_ci(logs)
    return Effect(name, math.exp(m), math.exp(lo), math.exp(hi), "x", hedges_g(np.log(a), np.log(b)))


def bootstrap_effect(
    name: str, groups: Sequence[Sequence[float]], statistic: Callable[[list[np.ndarray]], float], unit: str, n: int = 2000
) -> Effect:
    """Percentile bootstrap over seeds for statistics with no closed form. The groups hold the same seeds in the
    same order (every arm of a study shares each seed's data order and initialization), so a resample draws seeds
    and keeps each seed's values together. Fewer than two seeds give no interval (NaN bounds)."""
    arrays = [np.asarray(g, dtype=float) for g in groups]
    sizes = {a.size for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"groups of different sizes {sorted(sizes)}: the bootstrap resamples seeds shared by all")
    point = float(statistic(arrays))
    seeds = sizes.pop()
    if seeds < 2:
        return Effect(name, point, math.nan, math.nan, unit)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(n):
        pick = rng.integers(0, seeds, seeds)
        samples.append(statistic([a[pick] for a in arrays]))
    lo, hi = np.percentile(samples, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return Effect(name, point, float(lo), float(hi), unit)


def held_out(arms: Mapping[object, Sequence[float]], rank: int) -> list[float]:
    """Per seed, the value of the arm ranked ``rank`` (0: best, 1: runner-up, -1: worst) by its mean over the
    other seeds. Arms picked and compared on the same seeds differ even where they are all alike: with 6 equal
    arms and 3 seeds, best minus worst had an interval above 0 in 16.3% of 2000 simulated labs (nominal 2.5%). Picked
    out of sample, each seed's difference is a fair draw of what the choice is worth (in the same simulation 5.5%
    of labs: the folds share seeds, so the t-interval is still a little narrow). The arms share their seeds, in
    the same order; a single seed is ranked on itself (its one difference has no interval, so no rule passes)."""
    values = np.asarray([list(v) for v in arms.values()], dtype=float)  # arms x seeds
    seeds = values.shape[1]
    picked = []
    for i in range(seeds):
        others = (np.delete(values, i, axis=1) if seeds > 1 else values).mean(axis=1)
        order = np.argsort(-others, kind="stable")  # ties: the arm listed first ranks first
        picked.append(float(values[order[rank], i]))
    return picked


def seed_noise(table: np.ndarray) -> float:
    """SD of the row-by-seed residual of an additive model of a rows x seeds table (at least 2 x 2): the
    seed noise left once every row and every seed has its own level."""
    table = np.asarray(table, dtype=float)
    k, n = table.shape
    residual = table - table.mean(axis=1)[:, None] - table.mean(axis=0)[None, :] + table.mean()
    return math.sqrt(float((residual**2).sum()) / ((k - 1) * (n - 1)))


def row_effect_p(table: np.ndarray) -> float:
    """p-value of the F test for a row effect in a rows x seeds table (two-way layout without replication: the
    residual is the row-by-seed interaction, so each table is judged against its own noise). NaN below 2 rows or 2
    seeds; 0 where the rows differ and the residual is exactly 0."""
    table = np.asarray(table, dtype=float)
    k, n = table.shape
    if k < 2 or n < 2:
        return math.nan
    between = n * float(((table.mean(axis=1) - table.mean()) ** 2).sum()) / (k - 1)
    within = seed_noise(table) ** 2
    if within == 0.0:
        return 0.0 if between > 0.0 else 1.0
    return float(scipy_stats.f.sf(between / within, k - 1, (k - 1) * (n - 1)))


@lru_cache(maxsize=None)
def expected_range(k: int) -> float:
    """Expected range of ``k`` independent standard normal values (``d2`` of quality control: 1.128 for 2,
    2.059 for 4), by integrating 1 - F(x)^k - (1 - F(x))^k."""
    value, _ = integrate.quad(lambda x: 1 - scipy_stats.norm.cdf(x) ** k - scipy_stats.norm.sf(x) ** k, -np.inf, np.inf)
    return value


def summarize(values: Sequence[float]) -> dict:
    """Mean, interval and n of one group, ready for a table cell."""
    m, lo, hi = mean_ci(values)
    return {"mean": m, "low": lo, "high": hi, "n": int(_finite(values).size)}


def cell(values: Sequence[float], digits: int = 3, scale: float = 1.0, within: tuple[float, float] | None = None) -> str:
    """``mean [low, high]`` for a report table; ``within``: the range the values can take (``PERCENT`` for
    accuracies), which the interval is cut to."""
    m, lo, hi = clip_ci(mean_ci([v * scale for v in values]), within)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} {bounds(lo, hi, f'.{digits}f')}"


def clip_ci(ci: tuple[float, float, float], within: tuple[float, float] | None) -> tuple[float, float, float]:
    """A (mean, low, high) t-interval cut to the range its values can take: over a few seeds near 100% accuracy
    it reaches past 100 (NaN bounds stay NaN)."""
    if within is None:
        return ci
    m, lo, hi = ci
    return m, max(lo, within[0]), min(hi, within[1])


def exceeds(effect: Effect, threshold: float) -> bool:
    """The whole interval lies above ``threshold``: the effect is there and at least that large."""
    return effect.low > threshold


def verdict_from_checks(checks: dict[str, bool], needed: Sequence[str] | None = None) -> str:
    """``holds`` when every check passes, ``holds partly`` when some (or all ``needed``) pass, else ``does not hold here``."""
    passed = [name for name, ok in checks.items() if ok]
    if len(passed) == len(checks):
        return HOLDS
    if passed and (needed is None or all(checks[n] for n in needed)):
        return PARTLY
    return NOT


def graded(effect: Effect, practical: float) -> str:
    """``holds`` when the interval clears a practically relevant size, ``holds partly`` when it only clears 0."""
    if effect.low > practical:
        return HOLDS
    if effect.low > 0:
        return PARTLY
    return NOT
