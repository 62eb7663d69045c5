"""Paired statistics, as pure functions on numpy arrays.

Every interval here is two-sided at `level` (95% by default) and comes from a paired estimate: the
same tokens, samples or prompts measured under the reference and the candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


def z_value(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error and interval."""

    value: float
    se: float
    low: float
    high: float

    @classmethod
    def normal(cls, value: float, se: float, level: float = 0.95) -> Estimate:
        z = Z95 if level == 0.95 else z_value(level)
        return cls(value, se, value - z * se, value + z * se)

    @classmethod
    def student(cls, value: float, se: float, df: int, level: float = 0.95) -> Estimate:
        """An interval from Student's t with `df` degrees of freedom: a standard error estimated from
        a few clusters (16 chunks, 8 prompts) is itself uncertain, and the normal quantile would make
        the interval too narrow (t_15 = 2.13 against 1.96)."""
        from scipy.stats import t

        q = float(t.ppf(0.5 + level / 2, df))
        return cls(value, se, value - q * se, value + q * se)

    def map(self, fn: np.ufunc) -> Estimate:
        """Transform a monotone increasing function of the estimate (e.g. exp of a log ratio)."""
        return Estimate(float(fn(self.value)), float("nan"), float(fn(self.low)), float(fn(self.high)))

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "se": self.se, "low": self.low, "high": self.high}


# Two-sided 95%: the bound on a rate after n trials with no event is the 97.5% one-sided bound.
ZERO_EVENTS_ALPHA = 0.025


def zero_events_bound(n: int, alpha: float = ZERO_EVENTS_ALPHA) -> float:
    """Exact upper bound on a rate after n trials without an event: 1 - alpha^(1/n) (about 3.7/n,
    the "rule of three" at 97.5%)."""
    return float(1 - alpha ** (1 / n))


def zero_events_n(bound: float, alpha: float = ZERO_EVENTS_ALPHA) -> int:
    """The fewest event-free trials whose exact bound is at most `bound` (the inverse of the above)."""
    if bound >= 1:
        return 1
    return int(np.ceil(np.log(alpha) / np.log1p(-bound) - 1e-9))


def clustered_mean(values: np.ndarray, clusters: np.ndarray, level: float = 0.95) -> Estimate:
    """Mean of per-token values with a cluster-robust standard error (tokens of a chunk are not
    independent). With equal cluster sizes this is the standard error of the chunk means:
    sqrt(var(chunk means) / C). The interval uses Student's t with C - 1 degrees of freedom."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        raise ValueError("no values to average")
    mean = float(values.mean())
    _, inverse = np.unique(clusters, return_inverse=True)
    c = int(inverse.max()) + 1
    if c < 2:
        return Estimate(mean, float("nan"), float("nan"), float("nan"))
    sums = np.bincount(inverse, weights=values, minlength=c)
    sizes = np.bincount(inverse, minlength=c)
    residual = sums - sizes * mean
    var = c / (c - 1) * float((residual**2).sum()) / n**2
    return Estimate.student(mean, float(np.sqrt(var)), c - 1, level)


def plain_mean(values: np.ndarray, level: float = 0.95) -> Estimate:
    """Mean with the i.i.d. standard error sqrt(var / (N - 1)), as llama-perplexity reports it."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    mean = float(values.mean())
    se = float(np.sqrt(values.var() / (n - 1))) if n > 1 else float("nan")
    return Estimate.normal(mean, se, level)


def proportion(successes: np.ndarray, level: float = 0.95) -> Estimate:
    """Share of true values with SE sqrt(p (1 - p) / (N - 1)) (as llama.cpp reports it)."""
    flags = np.asarray(successes, dtype=bool)
    n = flags.size
    p = float(flags.mean())
    se = float(np.sqrt(p * (1 - p) / (n - 1))) if n > 1 else float("nan")
    return Estimate.normal(p, se, level)


PERCENTILES = (0.1, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)


def percentiles(values: np.ndarray, which: tuple[float, ...] = PERCENTILES) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{q:g}": float(np.percentile(arr, q)) for q in which}
    out["min"] = float(arr.min())
    out["max"] = float(arr.max())
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
