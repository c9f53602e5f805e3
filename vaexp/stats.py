"""Paired statistics for per-image comparisons: mean, standard error, 95% interval, paired t-test.

Invariants: the t distribution is exact (the regularized incomplete beta by its continued
fraction), not a normal approximation, so small test sets get honest intervals; everything is
float64 and torch-free (inputs are sequences of numbers), so `vaexp report` can use it without
loading torch.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence


def _betacf(a: float, b: float, x: float, tol: float = 1e-15, max_iter: int = 500) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < tol:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; use the symmetry otherwise
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, dof: float) -> float:
    """P(|T| >= |t|) for Student's t with `dof` degrees of freedom."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(dof / 2.0, 0.5, dof / (dof + t * t))


def t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t (0 < p < 1), by bisection on the exact distribution."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must lie in (0, 1)")
    if p == 0.5:
        return 0.0
    upper = p > 0.5
    tail = 2.0 * (1.0 - p if upper else p)  # the two-sided p of the quantile's magnitude
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, dof) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, dof) > tail:
            lo = mid
        else:
            hi = mid
    q = 0.5 * (lo + hi)
    return q if upper else -q


class Paired(NamedTuple):
    n: int
    mean: float     # mean of the differences
    se: float       # standard error of that mean (sample std, n - 1, over √n)
    low: float      # 95% interval of the mean difference (Student's t, n - 1 dof)
    high: float
    t: float        # mean / se
    p: float        # two-sided p of the paired t-test (H0: mean difference 0)


def paired(differences: Sequence[float], level: float = 0.95) -> Paired:
    """The paired t summary of per-item differences (needs n >= 2)."""
    d = [float(v) for v in differences]
    n = len(d)
    if n < 2:
        raise ValueError("a paired comparison needs at least 2 items")
    mean = math.fsum(d) / n
    var = math.fsum((v - mean) ** 2 for v in d) / (n - 1)
    se = math.sqrt(var / n)
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(float("inf"), mean)
        return Paired(n, mean, 0.0, mean, mean, t, 1.0 if mean == 0.0 else 0.0)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    t = mean / se
    return Paired(n, mean, se, mean - half, mean + half, t, t_two_sided_p(t, n - 1))
