"""Breslow (and Efron-adjusted) baseline cumulative hazard as a right-continuous step function."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from survfuse.interop import check_risk, check_survival
from survfuse.registry import look_up_option

__all__ = ["StepFunction", "breslow_baseline"]


@dataclass(frozen=True)
class StepFunction:
    """Right-continuous step function: f(t) = y[k] for x[k] <= t < x[k+1], `y_before` for t < x[0].

    x [M] strictly increasing, y [M].
    """

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    y_before: float = 0.0

    def __post_init__(self) -> None:
        if self.x.shape != self.y.shape or self.x.ndim != 1:
            raise ValueError(
                f"x and y must be 1-d of equal length, got {self.x.shape}, {self.y.shape}"
            )
        if self.x.size > 1 and not bool(np.all(np.diff(self.x) > 0)):
            raise ValueError("x must be strictly increasing")

    def __call__(self, t: ArrayLike) -> NDArray[np.float64]:
        tt = np.asarray(t, dtype=np.float64)
        k = np.searchsorted(self.x, tt, side="right") - 1
        vals = np.concatenate([[self.y_before], self.y])
        out: NDArray[np.float64] = vals[k + 1]
        return out


def breslow_baseline(
    time: ArrayLike, event: ArrayLike, risk: ArrayLike, *, ties: str = "breslow"
) -> StepFunction:
    """Estimate the baseline cumulative hazard H0(t) of a Cox model with predictor `risk`.

    `risk` is the uncentered linear predictor. At each distinct time t_g with d_g events,
    risk-set sum R_g = sum_{t_j >= t_g} exp(r_j) and event mass D_g:

    - Breslow: dH0(t_g) = d_g / R_g
    - Efron (R's `survfit.coxph` for Efron fits): dH0(t_g) = sum_{l<d_g} 1 / (R_g - (l/d_g) D_g)

    The step function jumps at every distinct time (censored times give zero jumps), as
    `basehaz(fit, centered = FALSE)`. exp(r - max r) is used internally; H0 scales by exp(-max r),
    so center large risks (e.g. subtract their mean) before calling to avoid underflow.

    Parameters
    ----------
    time, event : array-like [N]
        Follow-up (days) and event indicator (True = observed).
    risk : array-like [N]
        Log relative hazard of each subject.
    ties : {"breslow", "efron"}
        Estimator of the jumps at tied event times.

    Returns
    -------
    StepFunction
        H0 with a jump at every distinct time (ascending `x`, cumulative `y`).
    """
    ties = look_up_option(ties, ("breslow", "efron"), kind="ties")
    t, e = check_survival(time, event)
    r = check_risk(risk, n=t.shape[0])
    shift = float(r.max())
    w = np.exp(r - shift)
    order = np.argsort(-t)  # order inside a tie group is irrelevant
    ts, es, ws = t[order], e[order], w[order]
    # groups of equal time in descending order; risk-set sum = cumulative sum at the group's end
    starts = np.flatnonzero(np.r_[True, ts[1:] != ts[:-1]])
    ends = np.r_[starts[1:], ts.shape[0]] - 1
    risk_set = np.cumsum(ws)[ends]
    d = np.add.reduceat(es.astype(np.float64), starts)
    if ties == "breslow":
        jump = d / risk_set
    else:
        mass = np.add.reduceat(np.where(es, ws, 0.0), starts)
        group = np.repeat(np.arange(starts.shape[0]), np.diff(np.r_[starts, ts.shape[0]]))
        ev = np.flatnonzero(es)
        ev_group = group[ev]
        cum = np.cumsum(es)
        rank = cum[ev] - 1 - (cum[starts] - es[starts])[ev_group]
        frac = rank / d[ev_group]
        inv = 1.0 / (risk_set[ev_group] - frac * mass[ev_group])
        jump = np.bincount(ev_group, weights=inv, minlength=starts.shape[0])
    # back to ascending time, then accumulate and undo the scaling
    x = ts[starts][::-1].copy()
    y = np.cumsum(jump[::-1]) * np.exp(-shift)
    return StepFunction(x=x, y=y)
