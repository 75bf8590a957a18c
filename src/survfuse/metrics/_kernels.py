"""numba kernels: Fenwick-tree pair counts for concordance, weighted (resampling) versions.

All kernels take data sorted by time ascending (`t`, `e`) and integer risk ranks `rank` in
1..K (equal risks share a rank). Weighted versions take a resampling weight matrix W [B, N]
(row b = how often each row appears in resample b), so a bootstrap never re-sorts.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "count_draws",
    "pass_earlier",
    "pass_later",
    "weighted_auc",
    "weighted_km_at",
    "weighted_pair_sums",
]


@numba.njit(cache=True, inline="always")
def _add(tree: NDArray[np.float64], i: int, v: float) -> None:
    k = tree.shape[0]
    while i < k:
        tree[i] += v
        i += i & (-i)


@numba.njit(cache=True, inline="always")
def _prefix(tree: NDArray[np.float64], i: int) -> float:
    s = 0.0
    while i > 0:
        s += tree[i]
        i -= i & (-i)
    return s


@numba.njit(cache=True)
def pass_later(t, e, rank, w, n_ranks):  # type: ignore[no-untyped-def]
    """For each event i: weight of comparable later subjects j with rank_j <, ==, > rank_i.

    Comparable: t_j > t_i, or t_j == t_i and j censored (censored at t outlives a death at t).
    Weights w_j are summed (integer weights keep a smaller, exact tree); non-events get zeros.
    Also returns the number of pairs of events at the same time, and of those with equal rank
    (R's tied.y + tied.xy and tied.xy), counted with unit weights.
    """
    n = t.shape[0]
    tree = np.zeros(n_ranks + 1, dtype=w.dtype)
    point = np.zeros(n_ranks + 1, dtype=w.dtype)
    same_time = np.zeros(n_ranks + 1, dtype=np.int64)  # events of the current time per rank
    less = np.zeros(n, dtype=w.dtype)
    eq = np.zeros(n, dtype=w.dtype)
    gt = np.zeros(n, dtype=w.dtype)
    total = w[0] * 0
    tied_time = 0
    tied_both = 0
    hi = n
    while hi > 0:
        lo = hi - 1
        while lo > 0 and t[lo - 1] == t[hi - 1]:
            lo -= 1
        for p in range(lo, hi):
            if not e[p]:
                _add(tree, rank[p], w[p])
                point[rank[p]] += w[p]
                total += w[p]
        k = 0
        for p in range(lo, hi):
            if e[p]:
                below = _prefix(tree, rank[p] - 1)
                same = point[rank[p]]
                less[p] = below
                eq[p] = same
                gt[p] = total - below - same
                tied_both += same_time[rank[p]]
                same_time[rank[p]] += 1
                k += 1
        tied_time += k * (k - 1) // 2
        for p in range(lo, hi):
            if e[p]:
                same_time[rank[p]] = 0
                _add(tree, rank[p], w[p])
                point[rank[p]] += w[p]
                total += w[p]
        hi = lo
    return less, eq, gt, tied_time, tied_both


@numba.njit(cache=True)
def pass_earlier(t, e, rank, v, n_ranks):  # type: ignore[no-untyped-def]
    """For each subject j: weight v_i of earlier comparable events i with rank_i >, ==, < rank_j.

    The mirror of `pass_later` (each comparable pair seen from its later member).
    """
    n = t.shape[0]
    tree = np.zeros(n_ranks + 1, dtype=v.dtype)
    point = np.zeros(n_ranks + 1, dtype=v.dtype)
    gt = np.zeros(n, dtype=v.dtype)
    eq = np.zeros(n, dtype=v.dtype)
    less = np.zeros(n, dtype=v.dtype)
    total = v[0] * 0
    lo = 0
    while lo < n:
        hi = lo + 1
        while hi < n and t[hi] == t[lo]:
            hi += 1
        for p in range(lo, hi):
            if e[p]:
                below = _prefix(tree, rank[p] - 1)
                same = point[rank[p]]
                less[p] = below
                eq[p] = same
                gt[p] = total - below - same
        for p in range(lo, hi):
            if e[p]:
                _add(tree, rank[p], v[p])
                point[rank[p]] += v[p]
                total += v[p]
        for p in range(lo, hi):
            if not e[p]:
                below = _prefix(tree, rank[p] - 1)
                same = point[rank[p]]
                less[p] = below
                eq[p] = same
                gt[p] = total - below - same
        lo = hi
    return gt, eq, less


@numba.njit(cache=True, parallel=True)
def weighted_pair_sums(t, e, rank, n_ranks, u, order, W):  # type: ignore[no-untyped-def]
    """Per resample b: num_b = sum_i W_bi u_i (L_i + E_i / 2), den_b = sum_i W_bi u_i (L_i+E_i+G_i).

    L/E/G as in `pass_later` with tree weights W_b. u_i is the event member's pair weight
    (1 for Harrell's C, 1/G(T_i)^2 * [T_i < tau] for Uno's C; 0 for non-events). Sorted
    position p holds row order[p] of W (rows of W stay in input order: no permuted copy).
    """
    n = t.shape[0]
    n_boot = W.shape[0]
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    for b in numba.prange(n_boot):
        tree = np.zeros(n_ranks + 1)
        point = np.zeros(n_ranks + 1)  # weight at each rank: ties without a second query
        wb = W[b]
        total = 0.0
        nb = 0.0
        db = 0.0
        hi = n
        while hi > 0:
            lo = hi - 1
            while lo > 0 and t[lo - 1] == t[hi - 1]:
                lo -= 1
            for p in range(lo, hi):
                wp = wb[order[p]]
                if not e[p] and wp != 0:
                    _add(tree, rank[p], wp)
                    point[rank[p]] += wp
                    total += wp
            for p in range(lo, hi):
                wp = wb[order[p]]
                if e[p] and wp != 0 and u[p] != 0:
                    below = _prefix(tree, rank[p] - 1)
                    f = wp * u[p]
                    nb += f * (below + 0.5 * point[rank[p]])
                    db += f * total
            for p in range(lo, hi):
                wp = wb[order[p]]
                if e[p] and wp != 0:
                    _add(tree, rank[p], wp)
                    point[rank[p]] += wp
                    total += wp
            hi = lo
        num[b] = nb
        den[b] = db
    return num, den


@numba.njit(cache=True, parallel=True)
def count_draws(idx, inverse, n_clusters):  # type: ignore[no-untyped-def]
    """Row weights [B, N] from cluster draws idx [B, n_clusters]: W_bi = #{j: idx_bj = c(i)}."""
    n_boot = idx.shape[0]
    n = inverse.shape[0]
    out = np.zeros((n_boot, n))
    for b in numba.prange(n_boot):
        c = np.zeros(n_clusters)
        for j in range(idx.shape[1]):
            c[idx[b, j]] += 1.0
        for i in range(n):
            out[b, i] = c[inverse[i]]
    return out


@numba.njit(cache=True, parallel=True)
def weighted_auc(order, risk, case_g, ctrl, W):  # type: ignore[no-untyped-def]
    """Per resample b: IPCW AUC num/den at one horizon.

    `order` sorts rows by risk ascending; case_g[i] = 1/G(T_i) for cases (0 otherwise), ctrl[i]
    = 1 for controls. num_b = sum_{i case, j ctrl} W_bi W_bj g_i ([r_j < r_i] + [r_j = r_i] / 2),
    den_b = (sum_i W_bi g_i)(sum_j W_bj ctrl_j).
    """
    n = order.shape[0]
    n_boot = W.shape[0]
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    for b in numba.prange(n_boot):
        wb = W[b]
        below = 0.0
        nb = 0.0
        gsum = 0.0
        lo = 0
        while lo < n:
            hi = lo + 1
            while hi < n and risk[order[hi]] == risk[order[lo]]:
                hi += 1
            grp_ctrl = 0.0
            grp_case = 0.0
            for q in range(lo, hi):
                i = order[q]
                grp_ctrl += wb[i] * ctrl[i]
                grp_case += wb[i] * case_g[i]
            nb += grp_case * (below + 0.5 * grp_ctrl)
            gsum += grp_case
            below += grp_ctrl
            lo = hi
        num[b] = nb
        den[b] = gsum * below
    return num, den


@numba.njit(cache=True, parallel=True)
def weighted_km_at(t, e, W, at):  # type: ignore[no-untyped-def]
    """Weighted Kaplan-Meier S_b(at_k) for each resample b (t sorted ascending, `at` ascending)."""
    n = t.shape[0]
    n_boot = W.shape[0]
    m = at.shape[0]
    out = np.ones((n_boot, m))
    for b in numba.prange(n_boot):
        wb = W[b]
        at_risk = 0.0
        for p in range(n):
            at_risk += wb[p]
        s = 1.0
        k = 0
        lo = 0
        while lo < n:
            hi = lo + 1
            while hi < n and t[hi] == t[lo]:
                hi += 1
            while k < m and at[k] < t[lo]:
                out[b, k] = s
                k += 1
            d = 0.0
            tot = 0.0
            for p in range(lo, hi):
                tot += wb[p]
                if e[p]:
                    d += wb[p]
            if d > 0:
                s *= 1.0 - d / at_risk
            at_risk -= tot
            lo = hi
        while k < m:
            out[b, k] = s
            k += 1
    return out
