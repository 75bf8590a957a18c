"""Calibration at a horizon and D-calibration.

At a horizon: grouped KM, ICI/E50 of Austin et al. 2020, slope; D-calibration of Haider et al.
2020.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from survfuse.interop import check_survival
from survfuse.metrics.km import kaplan_meier

__all__ = [
    "CalibrationResult",
    "DCalibrationResult",
    "calibration",
    "calibration_table",
    "cox_fit",
    "d_calibration",
    "rcs_basis",
    "survival_at",
]

_EPS = 1e-10


def _check_prob(p: ArrayLike, n: int, name: str) -> NDArray[np.float64]:
    a = np.asarray(p, dtype=np.float64).reshape(-1)
    if a.shape[0] != n:
        raise ValueError(f"length mismatch: {name} has {a.shape[0]} values, time has {n}")
    bad = ~np.isfinite(a) | (a < 0) | (a > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be probabilities in [0, 1]; {name}[{i}] = {a[i]}")
    return a


def _check_horizon(horizon: float, t: NDArray[np.float64]) -> float:
    h = float(horizon)
    if not (np.isfinite(h) and h > 0):
        raise ValueError(f"horizon must be finite and > 0, got {horizon}")
    if h > t.max():
        raise ValueError(f"horizon {h} is beyond the last follow-up time {t.max()}")
    return h


def calibration_table(
    time: ArrayLike,
    event: ArrayLike,
    surv_t: ArrayLike,
    horizon: float,
    *,
    n_groups: int = 10,
) -> pl.DataFrame:
    """Tabulate observed vs predicted event probability at `horizon` per risk group.

    Subjects are cut into `n_groups` quantile groups of predicted risk 1 - S (by rank, so groups
    have equal sizes even with tied predictions); observed = 1 - Kaplan-Meier of the group at
    the horizon.

    Parameters
    ----------
    time, event : array-like [N]
        Follow-up (days) and event indicator (True = observed).
    surv_t : array-like [N]
        Predicted S_i(horizon), in [0, 1].
    horizon : float
        Time of the calibration, > 0 and not beyond the last follow-up.
    n_groups : int
        Number of risk groups (>= 1).

    Returns
    -------
    polars.DataFrame
        One row per non-empty group: group, n, n_events, predicted, observed.
    """
    t, e = check_survival(time, event)
    s = _check_prob(surv_t, t.shape[0], "surv_t")
    h = _check_horizon(horizon, t)
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    p = 1.0 - s
    # rank-based groups: equal sizes even with tied predictions
    order = np.argsort(p, kind="stable")
    grp = np.empty(t.shape[0], dtype=np.int64)
    grp[order] = np.arange(t.shape[0]) * n_groups // t.shape[0]
    rows = []
    for g in range(n_groups):
        m = grp == g
        if not m.any():
            continue
        km = kaplan_meier(t[m], e[m])
        rows.append(
            {
                "group": g + 1,
                "n": int(m.sum()),
                "n_events": int((e[m] & (t[m] <= h)).sum()),
                "predicted": float(p[m].mean()),
                "observed": float(1.0 - km(h)),
            }
        )
    return pl.DataFrame(rows)


def rcs_basis(x: NDArray[np.float64], knots: NDArray[np.float64]) -> NDArray[np.float64]:
    """Return the restricted cubic spline basis [N, k-1] of x at `knots` [k].

    Harrell's parameterisation, scaled by (t_k - t_1)^2: x and, for j < k-1, (x-t_j)+^3 -
    (x-t_{k-1})+^3 (t_k-t_j)/(t_k-t_{k-1}) + (x-t_k)+^3 (t_{k-1}-t_j)/(t_k-t_{k-1}).
    """
    k = knots.shape[0]
    cols = [x]
    tk, tk1 = knots[-1], knots[-2]
    scale = (tk - knots[0]) ** 2

    def cube(z: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(np.maximum(z, 0.0) ** 3)

    for j in range(k - 2):
        tj = knots[j]
        cols.append(
            (
                cube(x - tj)
                - cube(x - tk1) * (tk - tj) / (tk - tk1)
                + cube(x - tk) * (tk1 - tj) / (tk - tk1)
            )
            / scale
        )
    return np.column_stack(cols)


@dataclass(frozen=True, eq=False)
class CoxFit:
    """Cox PH fit (Breslow ties): coefficients, Breslow baseline cumulative hazard."""

    coef: NDArray[np.float64]
    base_times: NDArray[np.float64]
    base_cumhaz: NDArray[np.float64]

    def cumhaz0(self, t: float) -> float:
        i = int(np.searchsorted(self.base_times, t, side="right")) - 1
        return 0.0 if i < 0 else float(self.base_cumhaz[i])


def cox_fit(
    time: NDArray[np.float64],
    event: NDArray[np.bool_],
    x: NDArray[np.float64],
    *,
    max_iter: int = 50,
    tol: float = 1e-10,
) -> CoxFit:
    """Unpenalised Cox PH by Newton-Raphson with Breslow ties; x [N, P].

    log L = sum_{events i} (x_i b - log sum_{T_j >= T_i} exp(x_j b)); baseline
    H0(t) = sum_{event times u <= t} d_u / sum_{T_j >= u} exp(x_j b).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n, p = x.shape
    order = np.argsort(-time, kind="stable")
    ts, es, xs = time[order], event[order], x[order]
    # last index of each block of tied times (descending order): risk set = rows [0, last]
    last = np.r_[np.flatnonzero(ts[1:] != ts[:-1]), n - 1]
    grp_last = np.repeat(last, np.diff(np.r_[-1, last]))
    beta = np.zeros(p)
    mean_x = xs.mean(axis=0)

    def parts(b: NDArray[np.float64]) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
        eta = (xs - mean_x) @ b
        m = eta.max()
        w = np.exp(eta - m)
        s0 = np.cumsum(w)[grp_last]
        s1 = np.cumsum(w[:, None] * xs, axis=0)[grp_last]
        s2 = np.cumsum(w[:, None, None] * xs[:, :, None] * xs[:, None, :], axis=0)[grp_last]
        ll = float(np.sum(eta[es] - m - np.log(s0[es])))
        xbar = s1[es] / s0[es, None]
        grad = np.sum(xs[es] - xbar, axis=0)
        hess = -np.sum(s2[es] / s0[es, None, None] - xbar[:, :, None] * xbar[:, None, :], axis=0)
        return ll, grad, hess

    ll, grad, hess = parts(beta)
    for _ in range(max_iter):
        step = np.linalg.solve(hess, -grad)
        new = beta + step
        ll_new, g_new, h_new = parts(new)
        halvings = 0
        while ll_new < ll - 1e-12 and halvings < 30:
            step /= 2
            new = beta + step
            ll_new, g_new, h_new = parts(new)
            halvings += 1
        beta, converged = new, abs(ll_new - ll) < tol
        ll, grad, hess = ll_new, g_new, h_new
        if converged:
            break
    w = np.exp(xs @ beta)
    s0 = np.cumsum(w)[grp_last]
    ut = ts[last][::-1]
    d = np.add.reduceat(es[::-1].astype(np.float64), np.r_[0, np.cumsum(np.diff(last)[::-1])])
    risk_sum = s0[last][::-1]
    return CoxFit(beta, ut, np.cumsum(d / risk_sum))


@dataclass(frozen=True)
class CalibrationResult:
    """Smooth calibration at a horizon.

    ICI = mean |obs - pred|, E50/E90 = median/90th percentile, Emax = max; slope (1 = perfect)
    of a Cox model on log(-log S_pred(h)).
    """

    horizon: float
    ici: float
    e50: float
    e90: float
    emax: float
    slope: float
    n_subjects: int
    n_events: int


def calibration(
    time: ArrayLike,
    event: ArrayLike,
    surv_t: ArrayLike,
    horizon: float,
    *,
    n_knots: int = 3,
) -> CalibrationResult:
    """Compute ICI / E50 / E90 (Austin, Harrell & van Klaveren 2020) and the calibration slope.

    The smooth observed probability comes from a Cox model of the outcome on a restricted cubic
    spline (knots at Harrell's quantiles) of cll_i = log(-log S_i(h)):
    obs_i = 1 - exp(-H0(h) exp(f(cll_i))). The slope is the coefficient of a Cox model on cll
    alone.

    Parameters
    ----------
    time, event : array-like [N]
        Follow-up (days) and event indicator (True = observed); needs at least one event.
    surv_t : array-like [N]
        Predicted S_i(horizon), in [0, 1].
    horizon : float
        Time of the calibration, > 0 and not beyond the last follow-up.
    n_knots : {3, 4, 5}
        Spline knots; with fewer distinct predictions the model is linear in cll.

    Returns
    -------
    CalibrationResult
        ici, e50, e90, emax (absolute errors of 1 - S) and slope (1 = perfect).
    """
    t, e = check_survival(time, event)
    s = _check_prob(surv_t, t.shape[0], "surv_t")
    h = _check_horizon(horizon, t)
    if not e.any():
        raise ValueError("calibration needs at least one event")
    cll = np.log(-np.log(np.clip(s, _EPS, 1.0 - _EPS)))
    knot_q = {
        3: [0.10, 0.50, 0.90],
        4: [0.05, 0.35, 0.65, 0.95],
        5: [0.05, 0.275, 0.5, 0.725, 0.95],
    }
    if n_knots not in knot_q:
        raise ValueError(f"n_knots must be 3, 4 or 5, got {n_knots}")
    knots = np.quantile(cll, knot_q[n_knots])
    if np.unique(knots).shape[0] < n_knots:
        x = cll[:, None]  # too few distinct predictions for a spline: linear in cll
    else:
        x = rcs_basis(cll, knots)
    fit = cox_fit(t, e, x)
    obs = 1.0 - np.exp(-fit.cumhaz0(h) * np.exp(x @ fit.coef))
    delta = np.abs(obs - (1.0 - s))
    slope = float(cox_fit(t, e, cll[:, None]).coef[0])
    return CalibrationResult(
        horizon=h,
        ici=float(delta.mean()),
        e50=float(np.median(delta)),
        e90=float(np.quantile(delta, 0.9)),
        emax=float(delta.max()),
        slope=slope,
        n_subjects=int(t.shape[0]),
        n_events=int(e.sum()),
    )


def survival_at(surv: ArrayLike, times: ArrayLike, at: ArrayLike) -> NDArray[np.float64]:
    """Step-evaluate each row's curve surv [N, K] (on `times` [K]) at its own time at[i].

    S_i(at_i) = surv[i, k] for the last t_k <= at_i, 1 before t_1.
    """
    s = np.asarray(surv, dtype=np.float64)
    tt = np.asarray(times, dtype=np.float64)
    a = np.asarray(at, dtype=np.float64)
    if s.ndim != 2 or s.shape != (a.shape[0], tt.shape[0]):
        raise ValueError(f"surv must have shape ({a.shape[0]}, {tt.shape[0]}), got {s.shape}")
    k = np.searchsorted(tt, a, side="right") - 1
    out = np.where(k >= 0, s[np.arange(a.shape[0]), np.maximum(k, 0)], 1.0)
    return np.asarray(out)


@dataclass(frozen=True, eq=False)
class DCalibrationResult:
    """D-calibration: bin_counts [B] of S_i(T_i), chi-square vs uniform (B-1 df), p-value."""

    statistic: float
    p_value: float
    bin_counts: NDArray[np.float64]
    n_subjects: int
    n_events: int


def d_calibration(
    time: ArrayLike,
    event: ArrayLike,
    surv: ArrayLike,
    times: ArrayLike | None = None,
    *,
    n_bins: int = 10,
) -> DCalibrationResult:
    """Test D-calibration (Haider et al. 2020): calibrated curves give S_i(T_i) ~ U(0, 1).

    surv is [N] = S_i(T_i), or [N, K] curves on `times` [K] (step-evaluated at T_i). Bins are
    [b/B, (b+1)/B). An event adds 1 to the bin of S_i(T_i); a censored subject with
    c = S_i(T_i) spreads 1 uniformly over [0, c] (its event comes later, so its survival
    probability there is below c): (min(hi, c) - min(lo, c)) / c to each bin.
    statistic = sum_b (O_b - N/B)^2 / (N/B) ~ chi2(B - 1).

    Parameters
    ----------
    time, event : array-like [N]
        Follow-up (days) and event indicator (True = observed).
    surv : array-like [N] or [N, K]
        S_i(T_i) itself, or survival curves on `times`.
    times : array-like [K], optional
        Time grid of 2-d `surv`; None when `surv` is already S_i(T_i).
    n_bins : int
        Number B of equal-width probability bins (>= 2).

    Returns
    -------
    DCalibrationResult
        statistic, p_value and bin_counts [B]; a small p says the curves are not calibrated.
    """
    t, e = check_survival(time, event)
    if times is None:
        u = _check_prob(surv, t.shape[0], "surv")
    else:
        u = _check_prob(survival_at(surv, times, t), t.shape[0], "surv")
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.zeros(n_bins)
    ev_bin = np.minimum((u[e] * n_bins).astype(np.int64), n_bins - 1)
    counts += np.bincount(ev_bin, minlength=n_bins)
    c = u[~e]
    pos = c > 0
    lo, hi = edges[:-1][None, :], edges[1:][None, :]
    cc = c[pos][:, None]
    counts += ((np.minimum(hi, cc) - np.minimum(lo, cc)) / cc).sum(axis=0)
    counts[0] += float((~pos).sum())  # c = 0: all mass at 0
    expected = t.shape[0] / n_bins
    stat = float(np.sum((counts - expected) ** 2) / expected)
    return DCalibrationResult(
        stat, float(stats.chi2.sf(stat, n_bins - 1)), counts, int(t.shape[0]), int(e.sum())
    )
