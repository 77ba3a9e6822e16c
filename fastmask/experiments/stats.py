"""Statistics over seeds, shared by the experiments: the mean and the Student-t confidence interval of a figure
measured once per seed (``mean_ci``), the same for every number of a nested result (``summarize``: a leakage table
{representation: [accuracy per factor]} measured per seed becomes the same shape of summaries), and a compact text
form for reports (``format_mean_ci``). Pure python (math.lgamma; no scipy): the t quantile comes from the
regularised incomplete beta function, inverted by bisection.

    runs = [{"acc": [0.81, 0.55]}, {"acc": [0.79, 0.60]}, {"acc": [0.84, 0.52]}]   # one result per seed
    summary = summarize(runs)                   # {"acc": [{"mean": 0.813, "low": ..., "high": ..., ...}, {...}]}
    format_mean_ci(summary["acc"][0])           # "0.813 ± 0.063"

The interval is mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n) with s the sample standard deviation (n - 1 in the
denominator): it treats the seeds as independent draws of the whole pipeline (data split, mask noise, data order,
probes) and assumes the per-seed figures are roughly normal, which with 3-5 seeds is an assumption, not a check.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional, Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if not (a > 0 and b > 0):
        raise ValueError(f"regularized_beta: a and b must be > 0, got a={a!r}, b={b!r}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_beta: x must be in [0, 1], got {x!r}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df!r}")
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (Student's t, ``df`` degrees of freedom), by bisection on ``t_cdf`` (|error| <
    1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"t_quantile: df must be > 0, got {df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-10 * max(1.0, high):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """{"mean", "std" (sample, n - 1), "n", "half_width", "low", "high", "values"} of one figure over seeds: the
    two-sided Student-t interval mean ± t * std / sqrt(n). With one value the interval is undefined: std,
    half_width, low and high are None."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"mean_ci: confidence must be in (0, 1), got {confidence!r}")
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci: values must hold at least one number, got none")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"mean_ci: values must be finite numbers, got {values!r}")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "half_width": None, "low": None, "high": None, "values": values}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "half_width": half, "low": mean - half, "high": mean + half,
            "values": values}


def is_summary(obj: Any) -> bool:
    """Whether ``obj`` is a ``mean_ci`` result."""
    return isinstance(obj, dict) and {"mean", "half_width", "low", "high", "n"} <= set(obj)


def summarize(per_seed: Sequence[Any], confidence: float = 0.95, path: str = "value") -> Any:
    """The structure shared by every element of ``per_seed`` (nested dicts / lists / tuples of numbers, one per
    seed) with each number replaced by its ``mean_ci`` over the seeds. The structures must have the same keys and
    lengths (ValueError naming the first place where they differ); None leaves stay None only when None in every
    seed."""
    if not per_seed:
        raise ValueError("summarize: per_seed must hold at least one result, got none")
    first = per_seed[0]
    if isinstance(first, dict):
        for other in per_seed[1:]:
            if not isinstance(other, dict) or list(other) != list(first):
                raise ValueError(f"summarize: {path} has keys {list(first)} in the first seed and "
                                 f"{list(other) if isinstance(other, dict) else type(other).__name__} in another")
        return {k: summarize([r[k] for r in per_seed], confidence, f"{path}[{k!r}]") for k in first}
    if isinstance(first, (list, tuple)):
        for other in per_seed[1:]:
            if not isinstance(other, (list, tuple)) or len(other) != len(first):
                raise ValueError(f"summarize: {path} has {len(first)} items in the first seed and a different "
                                 f"shape in another ({other!r})")
        return [summarize([r[i] for r in per_seed], confidence, f"{path}[{i}]") for i in range(len(first))]
    if first is None and all(r is None for r in per_seed):
        return None
    if not all(isinstance(r, Real) and not isinstance(r, bool) for r in per_seed):
        raise ValueError(f"summarize: {path} must be a number in every seed, got {list(per_seed)!r}")
    return mean_ci(per_seed, confidence)


def format_mean_ci(summary: Optional[dict], digits: int = 3, signed: bool = False) -> str:
    """"0.813 ± 0.063" (mean ± half-width of the interval); one seed: the value alone; None: ""."""
    if summary is None:
        return ""
    spec = f"{'+' if signed else ''}.{digits}f"
    text = format(summary["mean"], spec)
    if summary["half_width"] is not None:
        text += f" ± {summary['half_width']:.{digits}f}"
    return text


def ci_above(summary: dict, threshold: float = 0.0) -> Optional[bool]:
    """Whether the whole interval lies above ``threshold`` (None with one seed: no interval)."""
    return None if summary["low"] is None else summary["low"] > threshold


__all__ = ["regularized_beta", "t_cdf", "t_quantile", "mean_ci", "summarize", "is_summary", "format_mean_ci",
           "ci_above"]
