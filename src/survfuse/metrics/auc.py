"""Cumulative/dynamic time-dependent AUC with IPCW (Uno et al. 2007; Hung & Chiang 2010)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from survfuse.interop import check_survival, check_time_grid
from survfuse.metrics import _kernels as K
from survfuse.metrics.ipcw import CensoringModel
from survfuse.metrics.km import kaplan_meier
from survfuse.metrics.result import NoComparablePairError

__all__ = ["TimeDependentAUC", "check_times", "cumulative_dynamic_auc", "risk_matrix"]


@dataclass(frozen=True, eq=False)
class TimeDependentAUC:
    """AUC(t_k) [K] at `times` [K] and its mean weighted by the test Kaplan-Meier."""

    times: NDArray[np.float64]
    auc: NDArray[np.float64]
    mean_auc: float


def check_times(times: ArrayLike, time: NDArray[np.float64]) -> NDArray[np.float64]:
    """Check evaluation times: 1-d, finite, strictly increasing, in [min(time), max(time))."""
    tt = check_time_grid(times)
    lo, hi = float(time.min()), float(time.max())
    if tt[0] < lo or tt[-1] >= hi:
        raise ValueError(f"all times must be within the follow-up of the test data [{lo}; {hi})")
    return tt


def risk_matrix(pred: ArrayLike, n: int, n_times: int, what: str) -> NDArray[np.float64]:
    """[N] risk or [N, K] survival probabilities -> [N, K] risk (1 - S for survival input)."""
    p = np.asarray(pred, dtype=np.float64)
    if p.ndim == 1:
        if p.shape[0] != n:
            raise ValueError(f"length mismatch: {what} has {p.shape[0]} rows, time has {n}")
        out = np.broadcast_to(p[:, None], (n, n_times))
    elif p.ndim == 2:
        if p.shape != (n, n_times):
            raise ValueError(f"{what} must have shape ({n}, {n_times}), got {p.shape}")
        out = 1.0 - p
    else:
        raise ValueError(f"{what} must be 1-d risk or 2-d survival, got shape {p.shape}")
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{what} must be finite; row {i} has a non-finite value")
    return np.asarray(out)


def auc_parts(
    t: NDArray[np.float64], e: NDArray[np.bool_], times: NDArray[np.float64], cens: CensoringModel
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """case_g [N, K] = [T_i <= t_k, event] / G(T_i) and ctrl [N, K] = [T_i > t_k]."""
    cens.check_horizon(float(times[-1]), "largest time")
    g_inv = np.zeros(t.shape[0])
    need = e & (t <= times[-1])
    g_inv[need] = cens.inverse(t[need], "event time")
    case = (t[:, None] <= times[None, :]) & e[:, None]
    ctrl = t[:, None] > times[None, :]
    for k in range(times.shape[0]):
        if not case[:, k].any() or not ctrl[:, k].any():
            raise NoComparablePairError(
                f"no {'case' if not case[:, k].any() else 'control'} at time {times[k]}: "
                "AUC is undefined there"
            )
    return np.where(case, g_inv[:, None], 0.0), ctrl


def mean_auc_weights(
    t: NDArray[np.float64], e: NDArray[np.bool_], times: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Weights d_k = S(t_{k-1}) - S(t_k) / (1 - S(t_K)) from the test Kaplan-Meier."""
    s = kaplan_meier(t, e)(times)
    return -np.diff(np.r_[1.0, s]) / (1.0 - s[-1])


def cumulative_dynamic_auc(
    time: ArrayLike,
    event: ArrayLike,
    risk_or_surv: ArrayLike,
    times: ArrayLike,
    *,
    train_time: ArrayLike,
    train_event: ArrayLike,
) -> TimeDependentAUC:
    """Compute the cumulative cases / dynamic controls AUC at each t_k.

    Equal to scikit-survival's `cumulative_dynamic_auc` (exact risk ties instead of its 1e-8
    tolerance).

    AUC(t) = sum_{i: T_i <= t, event} sum_{j: T_j > t} w_i h(r_i, r_j) / (sum_i w_i * n_controls),
    w_i = 1/G(T_i) with G the censoring Kaplan-Meier of the training data, h = [r_i > r_j] +
    [r_i = r_j]/2. `risk_or_surv` is [N] risk (higher = worse) or [N, K] survival S_i(t_k)
    (scored by 1 - S). The mean AUC integrates AUC(t) against the test Kaplan-Meier:
    sum_k AUC(t_k) (S(t_{k-1}) - S(t_k)) / (1 - S(t_K)); with one time it is AUC(t_1).

    Parameters
    ----------
    time, event : array-like [N]
        Test follow-up (days) and event indicator (True = observed).
    risk_or_surv : array-like [N] or [N, K]
        Risk (higher = worse) or survival probabilities S_i(t_k) on `times`.
    times : array-like [K]
        Strictly increasing evaluation times inside [min(time), max(time)).
    train_time, train_event : array-like
        Training outcomes, for the censoring Kaplan-Meier G.

    Returns
    -------
    TimeDependentAUC
        `times` [K], `auc` [K] and `mean_auc`.
    """
    t, e = check_survival(time, event)
    tt = check_times(times, t)
    r = risk_matrix(risk_or_surv, t.shape[0], tt.shape[0], "risk_or_surv")
    cens = CensoringModel(train_time, train_event)
    case_g, ctrl = auc_parts(t, e, tt, cens)
    one_d = np.asarray(risk_or_surv).ndim == 1
    shared = np.argsort(r[:, 0], kind="stable") if one_d else None  # 1-d risk: sort once
    ones = np.ones((1, t.shape[0]))
    auc = np.empty(tt.shape[0])
    for k in range(tt.shape[0]):
        rk = np.ascontiguousarray(r[:, k])
        order = shared if shared is not None else np.argsort(rk, kind="stable")
        num, den = K.weighted_auc(
            order, rk, np.ascontiguousarray(case_g[:, k]), ctrl[:, k].astype(np.float64), ones
        )
        auc[k] = num[0] / den[0]
    mean = float(auc[0]) if tt.shape[0] == 1 else float(auc @ mean_auc_weights(t, e, tt))
    return TimeDependentAUC(tt, auc, mean)
