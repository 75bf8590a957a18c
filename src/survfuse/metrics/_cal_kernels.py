"""Numba kernels for calibration statistics on resampled data.

Weighted Cox fits (Breslow ties) of a few covariates, one per row of a weight matrix W [B, N],
in parallel over resamples.

Data are sorted by time ascending (`t`, `e`, `x`); the risk set of row i is every j with
t_j >= t_i, so one backward pass over blocks of tied times gives every sum.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["cox_newton"]


@numba.njit(cache=True)
def _solve_small(h, g):  # type: ignore[no-untyped-def]
    """Solve h s = g for a small symmetric positive-definite h (Gaussian elimination)."""
    p = g.shape[0]
    a = h.copy()
    b = g.copy()
    for k in range(p):
        piv = a[k, k]
        if not piv > 0:
            return np.full(p, np.nan)
        for r in range(k + 1, p):
            f = a[r, k] / piv
            for c in range(k, p):
                a[r, c] -= f * a[k, c]
            b[r] -= f * b[k]
    s = np.empty(p)
    for k in range(p - 1, -1, -1):
        acc = b[k]
        for c in range(k + 1, p):
            acc -= a[k, c] * s[c]
        s[k] = acc / a[k, k]
    return s


@numba.njit(cache=True)
def _cox_one(t, e, x, w, beta, max_iter, tol, horizon):  # type: ignore[no-untyped-def]
    """Newton iterations for one weight vector; returns (beta, log H0(horizon), converged)."""
    n, p = x.shape
    eta = np.empty(n)
    s1 = np.empty(p)
    s2 = np.empty((p, p))
    grad = np.empty(p)
    hess = np.empty((p, p))
    conv = False
    for _ in range(max_iter):
        for i in range(n):
            acc = 0.0
            for j in range(p):
                acc += x[i, j] * beta[j]
            eta[i] = acc
        grad[:] = 0.0
        hess[:] = 0.0
        s0 = 0.0
        s1[:] = 0.0
        s2[:] = 0.0
        hi = n
        while hi > 0:
            lo = hi - 1
            while lo > 0 and t[lo - 1] == t[hi - 1]:
                lo -= 1
            for i in range(lo, hi):
                if w[i] > 0:
                    r = w[i] * np.exp(eta[i])
                    s0 += r
                    for j in range(p):
                        s1[j] += r * x[i, j]
                        for k in range(j, p):
                            s2[j, k] += r * x[i, j] * x[i, k]
            for i in range(lo, hi):
                if e[i] and w[i] > 0 and s0 > 0:
                    for j in range(p):
                        xb_j = s1[j] / s0
                        grad[j] += w[i] * (x[i, j] - xb_j)
                        for k in range(j, p):
                            hess[j, k] += w[i] * (s2[j, k] / s0 - xb_j * s1[k] / s0)
            hi = lo
        for j in range(p):
            for k in range(j):
                hess[j, k] = hess[k, j]
        step = _solve_small(hess, grad)
        big = 0.0
        for j in range(p):
            beta[j] += step[j]
            big = max(big, abs(step[j]))
        if not np.isfinite(big):
            break
        if big < tol:
            conv = True
            break
    if not conv:
        return beta, np.nan, False
    # Breslow H0(horizon) at the final beta
    for i in range(n):
        acc = 0.0
        for j in range(p):
            acc += x[i, j] * beta[j]
        eta[i] = acc
    s0 = 0.0
    h0 = 0.0
    hi = n
    while hi > 0:
        lo = hi - 1
        while lo > 0 and t[lo - 1] == t[hi - 1]:
            lo -= 1
        for i in range(lo, hi):
            s0 += w[i] * np.exp(eta[i])
        if t[lo] <= horizon:
            for i in range(lo, hi):
                if e[i] and s0 > 0:
                    h0 += w[i] / s0
        hi = lo
    return beta, np.log(h0) if h0 > 0 else np.nan, True


@numba.njit(cache=True, parallel=True)
def cox_newton(t, e, x, W, beta0, max_iter, tol, horizon):  # type: ignore[no-untyped-def]
    """Fit a weighted Cox model for every row of W [B, N], starting from beta0 [P].

    Maximises sum_i w_i e_i (x_i b - log sum_{t_j >= t_i} w_j exp(x_j b)).

    Returns beta [B, P] and log H0(horizon) [B] (Breslow, at the same centring of x); NaN where
    Newton did not converge within `max_iter` steps (step < `tol`).
    """
    nb = W.shape[0]
    p = x.shape[1]
    beta_out = np.full((nb, p), np.nan)
    logh0 = np.full(nb, np.nan)
    for b in numba.prange(nb):
        beta = beta0.copy()
        beta, lh, ok = _cox_one(t, e, x, W[b], beta, max_iter, tol, horizon)
        if ok:
            beta_out[b] = beta
            logh0[b] = lh
    return beta_out, logh0
