"""Brier score and integrated Brier score with IPCW (Graf et al. 1999)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from survfuse.interop import check_survival, check_time_grid
from survfuse.metrics.ipcw import CensoringModel

__all__ = ["brier_losses", "brier_score", "integrated_brier_score"]


def _check_surv(surv: ArrayLike, n: int, n_times: int) -> NDArray[np.float64]:
    s = np.asarray(surv, dtype=np.float64)
    if s.ndim == 1 and n_times == 1:
        s = s[:, None]
    if s.shape != (n, n_times):
        raise ValueError(f"surv must have shape ({n}, {n_times}) = [N, len(times)], got {s.shape}")
    bad = ~np.isfinite(s)
    if bad.any():
        i, k = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"surv must be finite; surv[{i}, {k}] = {s[i, k]}")
    return s


def brier_losses(
    time: ArrayLike,
    event: ArrayLike,
    surv: ArrayLike,
    times: ArrayLike,
    *,
    train_time: ArrayLike,
    train_event: ArrayLike,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-subject IPCW losses L [N, K] (Brier(t_k) = mean_i L_ik) and the checked times [K].

    L_ik = S_i(t_k)^2 [T_i <= t_k, event] / G(T_i) + (1 - S_i(t_k))^2 [T_i > t_k] / G(t_k);
    censored subjects before t_k contribute 0. G: censoring Kaplan-Meier of the training data.
    """
    t, e = check_survival(time, event)
    tt = check_time_grid(times, nonnegative=True)
    s = _check_surv(surv, t.shape[0], tt.shape[0])
    cens = CensoringModel(train_time, train_event)
    g_t = cens.survival(tt, "time")
    case = e[:, None] & (t[:, None] <= tt[None, :])
    need = e & (t <= tt[-1])
    g_y = np.ones(t.shape[0])
    g_y[need] = cens.survival(t[need], "event time")
    # G = 0 gives weight 0 (1/inf), as scikit-survival does
    inv_y = np.divide(1.0, g_y, out=np.zeros_like(g_y), where=g_y > 0)
    inv_t = np.divide(1.0, g_t, out=np.zeros_like(g_t), where=g_t > 0)
    ctrl = t[:, None] > tt[None, :]
    loss = np.where(case, s * s * inv_y[:, None], 0.0) + np.where(
        ctrl, (1.0 - s) ** 2 * inv_t[None, :], 0.0
    )
    return loss, tt


def brier_score(
    time: ArrayLike,
    event: ArrayLike,
    surv: ArrayLike,
    times: ArrayLike,
    *,
    train_time: ArrayLike,
    train_event: ArrayLike,
) -> NDArray[np.float64]:
    """Compute the IPCW Brier score BS(t_k) [K] of survival curves `surv` [N, K] at `times` [K].

    BS(t) = 1/N sum_i [S_i(t)^2 [T_i <= t, event] / G(T_i) + (1 - S_i(t))^2 [T_i > t] / G(t)],
    equal to scikit-survival's `brier_score`.

    Parameters
    ----------
    time, event : array-like [N]
        Test follow-up (days) and event indicator (True = observed).
    surv : array-like [N, K]
        Predicted survival S_i(t_k) (a 1-d [N] array when there is one time).
    times : array-like [K]
        Non-negative, strictly increasing evaluation times.
    train_time, train_event : array-like
        Training outcomes, for the censoring Kaplan-Meier G.

    Returns
    -------
    ndarray [K]
        BS(t_k); lower is better.
    """
    loss, _ = brier_losses(time, event, surv, times, train_time=train_time, train_event=train_event)
    return np.asarray(loss.mean(axis=0))


def integrated_brier_score(
    time: ArrayLike,
    event: ArrayLike,
    surv: ArrayLike,
    times: ArrayLike,
    *,
    train_time: ArrayLike,
    train_event: ArrayLike,
) -> float:
    """Compute IBS = trapezoid integral of BS(t) over `times` / (t_K - t_1).

    Needs at least two times; the arguments are those of `brier_score`.
    """
    tt = check_time_grid(times, nonnegative=True)
    if tt.shape[0] < 2:
        raise ValueError("integrated_brier_score needs at least two times")
    bs = brier_score(time, event, surv, tt, train_time=train_time, train_event=train_event)
    return float(np.trapezoid(bs, tt) / (tt[-1] - tt[0]))
