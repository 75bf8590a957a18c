"""Linear Cox proportional-hazards model: exact Efron/Breslow likelihood, Newton-Raphson.

numpy + BLAS: one sort, then per iteration O(n p) cumulative sums and one n x p x p matrix
product for the information matrix, so a fit at n = 1e5, p = 100 takes about a second.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.stats
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator

from survfuse.interop import check_survival
from survfuse.registry import look_up_option
from survfuse.survival.baseline import StepFunction, breslow_baseline

__all__ = ["CoxPH", "CoxPHConvergenceWarning", "cox_log_likelihood"]


class CoxPHConvergenceWarning(UserWarning):
    """Newton-Raphson stopped at max_iter without meeting the tolerance."""


@dataclass(frozen=True)
class _Design:
    """Data sorted by descending time with its tie-group structure (computed once per fit)."""

    x: NDArray[np.float64]  # [n, p] sorted rows
    event: NDArray[np.bool_]  # [n]
    starts: NDArray[np.intp]  # [G] first row of each distinct-time group
    ends: NDArray[np.intp]  # [G] last row
    group: NDArray[np.intp]  # [n] group of each row
    ev_rows: NDArray[np.intp]  # [E] rows with an event
    ev_group: NDArray[np.intp]  # [E] their group
    frac: NDArray[np.float64]  # [E] Efron fraction l / d_g (0 for Breslow)
    d: NDArray[np.float64]  # [G] events per group
    x_event_sum: NDArray[np.float64]  # [p] sum of event rows


def _design(
    x: NDArray[np.float64], time: NDArray[np.float64], event: NDArray[np.bool_], ties: str
) -> _Design:
    order = np.argsort(-time, kind="stable")
    t, e, xs = time[order], event[order], np.ascontiguousarray(x[order])
    starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    ends = np.r_[starts[1:], t.shape[0]] - 1
    group = np.repeat(np.arange(starts.shape[0]), ends - starts + 1)
    ev_rows = np.flatnonzero(e)
    ev_group = group[ev_rows]
    d = np.bincount(ev_group, minlength=starts.shape[0]).astype(np.float64)
    if ties == "efron":
        cum = np.cumsum(e)
        rank = cum[ev_rows] - 1 - (cum[starts] - e[starts])[ev_group]
        frac = rank / d[ev_group]
    else:
        frac = np.zeros(ev_rows.shape[0])
    return _Design(xs, e, starts, ends, group, ev_rows, ev_group, frac, d, xs[ev_rows].sum(0))


def _loglik_grad_info(
    des: _Design, beta: NDArray[np.float64], *, need_info: bool = True
) -> tuple[float, NDArray[np.float64], NDArray[np.float64] | None]:
    """Log partial likelihood, its gradient [p] and the observed information [p, p].

    Per event i (group g, Efron fraction f_i): S0_i = S0_g - f_i D0_g, S1_i likewise, where S*
    sum over the risk set and D* over the group's events (Breslow: f_i = 0).
    ll = sum_i [eta_i - log S0_i]; grad = sum_i [x_i - a_i], a_i = S1_i / S0_i;
    info = sum_i [S2_i / S0_i - a_i a_i^T], the S2 part assembled as X^T diag(w c) X.
    """
    x = des.x
    eta = x @ beta
    shift = float(eta.max())
    w = np.exp(eta - shift)
    wx = x * w[:, None]
    s0 = np.cumsum(np.add.reduceat(w, des.starts))  # [G] risk-set sums (rows up to group end)
    s1 = np.cumsum(np.add.reduceat(wx, des.starts, axis=0), axis=0)  # [G, p]
    g = des.ev_group
    f = des.frac
    if f.any():
        w_ev = np.where(des.event, w, 0.0)
        d0 = np.add.reduceat(w_ev, des.starts)
        d1 = np.add.reduceat(wx * des.event[:, None], des.starts, axis=0)
        den0 = s0[g] - f * d0[g]
        den1 = s1[g] - f[:, None] * d1[g]
    else:
        den0 = s0[g]
        den1 = s1[g]
    ll = float(eta[des.ev_rows].sum() - np.log(den0).sum() - shift * des.ev_rows.shape[0])
    a = den1 / den0[:, None]  # [E, p]
    grad = des.x_event_sum - a.sum(0)
    if not need_info:
        return ll, grad, None
    n_groups = des.starts.shape[0]
    inv0 = np.asarray(
        np.bincount(g, weights=1.0 / den0, minlength=n_groups), dtype=np.float64
    )  # sum_i 1/S0_i per group
    # row j is in the risk set of every group at or after its own (descending time order)
    c = np.cumsum(inv0[::-1])[::-1][des.group]
    weight = w * c
    if f.any():
        efr = np.asarray(np.bincount(g, weights=f / den0, minlength=n_groups), dtype=np.float64)
        weight = weight - w * des.event * efr[des.group]
    # weight >= 0 in exact arithmetic (a group's own 1/S0 terms dominate its Efron terms)
    # as z^T z numpy calls BLAS syrk (half the flops of x^T diag(weight) x as a general product)
    z = x * np.sqrt(np.maximum(weight, 0.0))[:, None]
    info = z.T @ z - a.T @ a
    return ll, grad, info


def cox_log_likelihood(
    X: ArrayLike, time: ArrayLike, event: ArrayLike, coef: ArrayLike, *, ties: str = "efron"
) -> float:
    """Exact log partial likelihood (Efron or Breslow ties) of a linear Cox model at `coef`.

    X [N, p], time [N], event [N] bool, coef [p]; equals R's `coxph(...)$loglik[2]` at R's
    coefficients.
    """
    ties = look_up_option(ties, ("efron", "breslow"), kind="ties")
    t, e = check_survival(time, event)
    x = _check_x(X, t.shape[0])
    des = _design(x - x.mean(0), t, e, ties)
    return _loglik_grad_info(des, np.asarray(coef, dtype=np.float64), need_info=False)[0]


def _check_x(X: ArrayLike, n: int | None = None) -> NDArray[np.float64]:
    x = np.asarray(X, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"X must be 2-d [n_samples, n_features], got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"X must be finite; X[{i}, {j}] = {x[i, j]}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"length mismatch: X has {x.shape[0]} rows, time has {n} values")
    return x


class CoxPH(BaseEstimator):
    """Linear Cox proportional-hazards model fitted by Newton-Raphson with step halving.

    Maximises the exact Efron or Breslow log partial likelihood minus `alpha/2 * ||beta||^2`
    (R's `ridge(..., theta = alpha, scale = FALSE)`), covariates centred internally as R does.
    Converged when the Newton decrement g^T H^-1 g falls below `tol` (the final step is taken).

    Fitted attributes: `coef_` [p], `se_` [p] = sqrt(diag(var_)), `var_` = inverse observed
    (penalised) information at coef_, `z_`, `p_value_`, `loglik_` (unpenalised, at coef_),
    `loglik_null_` (at 0), `n_iter_`, `converged_`, `baseline_cumulative_hazard_`
    (`StepFunction`, uncentered: `basehaz(fit, centered = FALSE)`; Efron-adjusted for
    ties="efron" as R's survfit).
    """

    def __init__(
        self,
        ties: str = "efron",
        alpha: float = 0.0,
        max_iter: int = 50,
        tol: float = 1e-10,
        max_halvings: int = 30,
    ) -> None:
        self.ties = ties
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.max_halvings = max_halvings

    def fit(self, X: ArrayLike, time: ArrayLike, event: ArrayLike | None = None) -> CoxPH:
        """Fit on X [N, p] and outcomes; `time` may be a scikit-survival structured array
        (event, time) when `event` is None, for scikit-learn style `fit(X, y)`."""
        ties = look_up_option(self.ties, ("efron", "breslow"), kind="ties")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if event is None:
            names = getattr(np.asarray(time).dtype, "names", None)
            if not names or len(names) != 2:
                raise ValueError("fit(X, time, event): event is missing (or pass a structured y)")
            y = np.asarray(time)
            time, event = y[names[1]], y[names[0]]
        t, e = check_survival(time, event)
        x = _check_x(X, t.shape[0])
        if not e.any():
            raise ValueError("CoxPH.fit: no observed event; the partial likelihood is flat")
        if hasattr(X, "columns"):
            self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = x.shape[1]
        self.means_ = x.mean(0)
        des = _design(x - self.means_, t, e, ties)
        p = x.shape[1]
        alpha = float(self.alpha)

        def objective(beta: NDArray[np.float64], need_info: bool = True):
            ll, grad, info = _loglik_grad_info(des, beta, need_info=need_info)
            pen = ll - 0.5 * alpha * float(beta @ beta)
            return (
                pen,
                ll,
                grad - alpha * beta,
                (None if info is None else info + alpha * np.eye(p)),
            )

        beta = np.zeros(p)
        pen, ll, grad, info = objective(beta)
        self.loglik_null_ = ll
        converged = False
        it = 0
        for it in range(1, self.max_iter + 1):  # noqa: B007 (n_iter_ after the loop)
            assert info is not None
            step = self._solve(info, grad)
            decrement = float(grad @ step)
            for _ in range(self.max_halvings + 1):
                new = objective(beta + step)
                # accept any finite non-decrease (up to rounding at the optimum)
                if np.isfinite(new[0]) and new[0] >= pen - 1e-12 * (1.0 + abs(pen)):
                    break
                step = step / 2.0
            else:
                warnings.warn(
                    "CoxPH: step halving could not increase the likelihood; stopping",
                    CoxPHConvergenceWarning,
                    stacklevel=2,
                )
                break
            beta = beta + step
            pen, ll, grad, info = new
            if decrement < self.tol:
                converged = True
                break
        if not converged:
            warnings.warn(
                f"CoxPH did not converge in {self.max_iter} iterations (a coefficient may be "
                "diverging: separation or collinearity; try alpha > 0)",
                CoxPHConvergenceWarning,
                stacklevel=2,
            )
        assert info is not None
        self.coef_ = beta
        self.var_ = scipy.linalg.inv(info)
        self.se_ = np.sqrt(np.diag(self.var_))
        self.z_ = beta / self.se_
        self.p_value_ = 2.0 * scipy.stats.norm.sf(np.abs(self.z_))
        self.loglik_ = ll
        self.n_iter_ = it
        self.converged_ = converged
        self.baseline_cumulative_hazard_: StepFunction = breslow_baseline(t, e, x @ beta, ties=ties)
        return self

    @staticmethod
    def _solve(info: NDArray[np.float64], grad: NDArray[np.float64]) -> NDArray[np.float64]:
        try:
            factor = scipy.linalg.cho_factor(info)
        except np.linalg.LinAlgError:
            raise ValueError(
                "CoxPH: the information matrix is singular (collinear or constant covariates, or "
                "a covariate that separates events); drop it or use alpha > 0"
            ) from None
        out: NDArray[np.float64] = scipy.linalg.cho_solve(factor, grad)
        return out

    def _fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("CoxPH is not fitted yet: call fit(X, time, event) first")

    def predict_risk(self, X: ArrayLike) -> NDArray[np.float64]:
        """Linear predictor X @ coef_ [N] (log relative hazard, higher = worse, uncentered)."""
        self._fitted()
        x = _check_x(X)
        if x.shape[1] != self.coef_.shape[0]:
            raise ValueError(f"X has {x.shape[1]} features, the model {self.coef_.shape[0]}")
        out: NDArray[np.float64] = x @ self.coef_
        return out

    predict = predict_risk

    def predict_cumulative_hazard(self, X: ArrayLike, times: ArrayLike) -> NDArray[np.float64]:
        """H(t | x) = H0(t) exp(x beta) [N, T]."""
        r = self.predict_risk(X)
        h0 = self.baseline_cumulative_hazard_(np.asarray(times, dtype=np.float64).reshape(-1))
        with np.errstate(divide="ignore"):
            out: NDArray[np.float64] = np.exp(np.log(h0)[None, :] + r[:, None])
        return out

    def predict_survival(self, X: ArrayLike, times: ArrayLike) -> NDArray[np.float64]:
        """S(t | x) = exp(-H0(t) exp(x beta)) [N, T] in [0, 1], non-increasing in t."""
        out: NDArray[np.float64] = np.exp(-self.predict_cumulative_hazard(X, times))
        return out

    def summary(self) -> dict[str, Any]:
        """Coefficients, standard errors, z and p-values as plain lists (JSON-ready)."""
        self._fitted()
        return {
            "coef": self.coef_.tolist(),
            "se": self.se_.tolist(),
            "z": self.z_.tolist(),
            "p_value": self.p_value_.tolist(),
            "loglik": self.loglik_,
            "loglik_null": self.loglik_null_,
            "n_iter": self.n_iter_,
        }
