"""Kaplan-Meier estimates of the survival and the censoring distribution (step functions).

Also their log-log confidence band, numbers at risk and the median follow-up (reverse
Kaplan-Meier).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm

from survfuse.interop import check_survival

__all__ = [
    "KaplanMeier",
    "censoring_kaplan_meier",
    "kaplan_meier",
    "km_confidence_band",
    "median_follow_up",
    "number_at_risk",
]


@dataclass(frozen=True)
class KaplanMeier:
    """Right-continuous step function S(t) = prod_{u <= t} (1 - d_u / n_u).

    `times` [K] are the unique observed times (events and censorings), `survival` [K] the
    estimate just after each time, `n_at_risk` [K] and `n_events` [K] the counts used.
    Calling the object evaluates S at arbitrary times (S = 1 before the first time).
    """

    times: NDArray[np.float64]
    survival: NDArray[np.float64]
    n_at_risk: NDArray[np.float64]
    n_events: NDArray[np.float64]

    def __call__(self, t: ArrayLike) -> NDArray[np.float64]:
        tt = np.asarray(t, dtype=np.float64)
        idx = np.searchsorted(self.times, tt, side="right") - 1
        out = np.where(idx >= 0, self.survival[np.maximum(idx, 0)], 1.0)
        return np.asarray(out, dtype=np.float64)

    @property
    def last_time(self) -> float:
        return float(self.times[-1])


def _counts(
    time: NDArray[np.float64], event: NDArray[np.bool_], weights: NDArray[np.float64] | None
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    w = np.ones(time.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    uniq, inv = np.unique(time, return_inverse=True)
    total = np.bincount(inv, weights=w, minlength=uniq.shape[0])
    d = np.bincount(inv, weights=w * event, minlength=uniq.shape[0])
    # at risk at u: weight of subjects with time >= u
    n_risk = np.cumsum(total[::-1])[::-1]
    return (
        uniq.astype(np.float64),
        n_risk.astype(np.float64),
        d.astype(np.float64),
        (total - d).astype(np.float64),
    )


def kaplan_meier(
    time: ArrayLike, event: ArrayLike, *, weights: ArrayLike | None = None
) -> KaplanMeier:
    """Estimate the Kaplan-Meier survival curve of (time, event).

    `weights` [N] are optional case weights (e.g. resampling counts).
    """
    t, e = check_survival(time, event)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    uniq, n_risk, d, _ = _counts(t, e, w)
    ratio = np.divide(d, n_risk, out=np.zeros_like(d), where=d != 0)
    return KaplanMeier(uniq, np.cumprod(1.0 - ratio).astype(np.float64), n_risk, d)


def censoring_kaplan_meier(time: ArrayLike, event: ArrayLike) -> KaplanMeier:
    """Kaplan-Meier of the censoring distribution G(t) = P(C > t).

    Censorings are the "events"; subjects with an event at u leave the risk set before the
    censorings at u (events before censoring at tied times), as in scikit-survival's
    `CensoringDistributionEstimator` and Graf et al. (1999).
    """
    t, e = check_survival(time, event)
    uniq, n_risk, d, c = _counts(t, e, None)
    at_risk = n_risk - d
    ratio = np.divide(c, at_risk, out=np.zeros_like(c), where=c != 0)
    return KaplanMeier(uniq, np.cumprod(1.0 - ratio).astype(np.float64), at_risk, c)


def km_confidence_band(
    km: KaplanMeier, alpha: float = 0.05
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Pointwise (1 - alpha) interval of S(t) at `km.times`: (lower [K], upper [K]).

    Greenwood variance on the log(-log S) scale (R's `survfit(conf.type = "log-log")`, lifelines'
    `KaplanMeierFitter` default): v(t) = sum_{u <= t} d_u / (n_u (n_u - d_u)),
    se = sqrt(v) / |log S|, interval S^exp(+-z se). The band is [1, 1] before the first event;
    where S reaches 0 (the last subject at risk had the event) it is undefined: NaN.
    """
    n, d, s = km.n_at_risk, km.n_events, km.survival
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.cumsum(np.where(d > 0, d / (n * (n - d)), 0.0))
        log_s = np.log(s)
        se = np.sqrt(var) / np.abs(log_s)
        z = float(norm.ppf(1.0 - alpha / 2.0))
        lower = np.where(s >= 1.0, 1.0, s ** np.exp(z * se))
        upper = np.where(s >= 1.0, 1.0, s ** np.exp(-z * se))
    dead = ~(s > 0.0) | ~np.isfinite(var)
    lower[dead] = np.nan
    upper[dead] = np.nan
    return lower.astype(np.float64), upper.astype(np.float64)


def number_at_risk(time: ArrayLike, at: ArrayLike) -> NDArray[np.int64]:
    """Count subjects still at risk at each time of `at` [K]: #{i: T_i >= t}.

    R's `summary(survfit, times = at)$n.risk`.
    """
    t = np.sort(np.asarray(time, dtype=np.float64))
    a = np.asarray(at, dtype=np.float64).reshape(-1)
    return (t.shape[0] - np.searchsorted(t, a, side="left")).astype(np.int64)


def median_follow_up(time: ArrayLike, event: ArrayLike) -> float:
    """Return the median follow-up by the reverse Kaplan-Meier method (Schemper & Smith 1996).

    The median of the KM of the censoring times, events counted as censored. NaN when that
    curve never falls to 0.5 (most subjects had the event).
    """
    t, e = check_survival(time, event)
    rev = kaplan_meier(t, ~e)
    below = np.flatnonzero(rev.survival <= 0.5)
    return float(rev.times[below[0]]) if below.size else float("nan")
