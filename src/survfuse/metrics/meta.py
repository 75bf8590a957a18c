"""Pooling independent estimates: DerSimonian-Laird random-effects meta-analysis.

For estimates g_r [R] with within-study standard errors se_r: w_r = 1 / se_r^2,
Q = sum_r w_r (g_r - g_FE)^2 with g_FE = sum w g / sum w, and the between-study variance
tau^2 = max(0, (Q - (R - 1)) / (sum w - sum w^2 / sum w)). The pooled estimate is
g = sum_r w*_r g_r / sum_r w*_r with w*_r = 1 / (se_r^2 + tau^2), its interval
g -/+ z / sqrt(sum w*) (statsmodels' `combine_effects(method_re="dl")` is the test reference).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

__all__ = ["MIN_SE", "random_effects"]

MIN_SE = 1e-6  # a degenerate interval (a model identical to its reference) still gets a weight


def random_effects(
    gain: NDArray[np.float64], se: NDArray[np.float64], *, level: float = 0.95
) -> tuple[float, float, float, float]:
    """Pool independent estimates `gain` [R] with standard errors `se` [R] (DerSimonian-Laird).

    Returns (estimate, lower, upper, tau^2) at two-sided `level` (see the module docstring).
    """
    g = np.asarray(gain, dtype=np.float64)
    v = np.maximum(np.asarray(se, dtype=np.float64), MIN_SE) ** 2
    w = 1.0 / v
    fixed = float(np.sum(w * g) / np.sum(w))
    q = float(np.sum(w * (g - fixed) ** 2))
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    tau2 = max(0.0, (q - (g.size - 1)) / c) if c > 0 else 0.0
    w_re = 1.0 / (v + tau2)
    est = float(np.sum(w_re * g) / np.sum(w_re))
    half = NormalDist().inv_cdf(0.5 + level / 2) / math.sqrt(float(np.sum(w_re)))
    return est, est - half, est + half, tau2
