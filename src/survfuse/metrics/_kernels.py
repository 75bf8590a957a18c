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


# ----------------------------------------------------------------------------- sorting by keys
# np.sort of uint64 is SIMD-vectorised and ~4x faster than np.argsort of float64, so an order is
# found by sorting keys (order-preserving float bits, low `shift` bits replaced by the index).
# Values whose truncated bits collide keep index order; `keyed_order` re-sorts such runs exactly.
_TOP = np.uint64(1) << np.uint64(63)


@numba.njit(cache=True)
def sort_keys(x, shift):  # type: ignore[no-untyped-def]
    """uint64 keys: float bits mapped to unsigned order, low `shift` bits = row index."""
    n = x.shape[0]
    xb = x.view(np.uint64)
    sh = np.uint64(shift)
    out = np.empty(n, dtype=np.uint64)
    for i in range(n):
        b = xb[i]
        if b == _TOP:  # -0.0 == 0.0: same key bits, so equal values stay in index order
            b = np.uint64(0)
        m = ~b if b & _TOP else b | _TOP
        out[i] = ((m >> sh) << sh) | np.uint64(i)
    return out


@numba.njit(cache=True)
def keyed_order(keys, x, shift):  # type: ignore[no-untyped-def]
    """Row order and sorted values from sorted `keys` (any order among equal values).

    Truncation can only misorder values that share the kept high bits; such runs (rare: a
    relative difference below 2^(shift - 52)) are re-sorted by value.
    """
    n = keys.shape[0]
    mask = (np.uint64(1) << np.uint64(shift)) - np.uint64(1)
    idx = np.empty(n, dtype=np.int64)
    xs = np.empty(n, dtype=np.float64)
    bad = False
    for k in range(n):
        i = np.int64(keys[k] & mask)
        idx[k] = i
        xs[k] = x[i]
        if k > 0 and xs[k] < xs[k - 1]:
            bad = True
    if bad:
        sh = np.uint64(shift)
        lo = 0
        while lo < n:
            hi = lo + 1
            while hi < n and (keys[hi] >> sh) == (keys[lo] >> sh):
                hi += 1
            if hi - lo > 1:
                o = np.argsort(xs[lo:hi], kind="mergesort")
                idx[lo:hi] = idx[lo:hi][o]
                xs[lo:hi] = xs[lo:hi][o]
            lo = hi
    return idx, xs


@numba.njit(cache=True)
def permute_survival(order, e, r):  # type: ignore[no-untyped-def]
    """Return event and risk in the given row order (one gather loop)."""
    n = order.shape[0]
    es = np.empty(n, dtype=np.bool_)
    rs = np.empty(n, dtype=np.float64)
    for p in range(n):
        i = order[p]
        es[p] = e[i]
        rs[p] = r[i]
    return es, rs


@numba.njit(cache=True)
def time_order(keys, t, e, r, shift):  # type: ignore[no-untyped-def]
    """`keyed_order` of the time keys and event / risk in that order, in one gather loop."""
    n = keys.shape[0]
    mask = (np.uint64(1) << np.uint64(shift)) - np.uint64(1)
    idx = np.empty(n, dtype=np.int64)
    ts = np.empty(n, dtype=np.float64)
    es = np.empty(n, dtype=np.bool_)
    rs = np.empty(n, dtype=np.float64)
    for k in range(n):
        i = np.int64(keys[k] & mask)
        idx[k] = i
        ts[k] = t[i]
        es[k] = e[i]
        rs[k] = r[i]
        if k > 0 and ts[k] < ts[k - 1]:
            idx, ts = keyed_order(keys, t, shift)
            es, rs = permute_survival(idx, e, r)
            return idx, ts, es, rs
    return idx, ts, es, rs


@numba.njit(cache=True)
def dense_ranks(idx, xs):  # type: ignore[no-untyped-def]
    """Dense risk ranks 1..K per row from a risk order `idx` and the sorted values `xs`."""
    n = idx.shape[0]
    rank = np.empty(n, dtype=np.int64)
    k = 0
    for q in range(n):
        if q == 0 or xs[q] != xs[q - 1]:
            k += 1
        rank[idx[q]] = k
    return rank, k


@numba.njit(cache=True)
def risk_groups(idx, xs, t, e):  # type: ignore[no-untyped-def]
    """Return, per row, its group of equal risks as positions [lo, hi) in risk order.

    Packed lo + hi << 32 (one scattered write per row): lo rows have a lower risk, hi a lower or
    equal one. Rows are in time order (`t`, `e`) and `idx` lists a group's rows in
    ascending row order (as `keyed_order` does), so the events of a group tied in time are
    consecutive there: also returns their number of pairs (R's tied.xy).
    """
    n = idx.shape[0]
    out = np.empty(n, dtype=np.int64)
    tied_xy = 0
    lo = 0
    while lo < n:
        hi = lo + 1
        while hi < n and xs[hi] == xs[lo]:
            hi += 1
        g = np.int64(lo) + (np.int64(hi) << 32)
        for q in range(lo, hi):
            out[idx[q]] = g
        if hi - lo > 1:
            m = 0
            last = -1
            for q in range(lo, hi):
                p = idx[q]
                if e[p]:
                    if last >= 0 and t[p] == t[last]:
                        m += 1
                        tied_xy += m
                    else:
                        m = 0
                    last = p
        lo = hi
    return out, tied_xy


# ----------------------------------------------------------------------------- fused Harrell C
_E1 = np.int64(1) << np.int64(32)  # one event in the high half of a packed counter
_LOW = _E1 - np.int64(1)  # all subjects in the low half


_LEAF = 7  # leaf blocks of 128 counters: one block scan replaces the cache-missing tree levels


@numba.njit(cache=True, inline="always")
def _add_blocked(leaf, blk, i, v):  # type: ignore[no-untyped-def]
    """Add v at index i of a blocked prefix counter.

    Plain counts in `leaf`, a Fenwick tree over the sums of 128-counter blocks in `blk` (small
    enough to stay in cache).
    """
    leaf[i] += v
    j = (i >> _LEAF) + 1
    k = blk.shape[0]
    while j < k:
        blk[j] += v
        j += j & (-j)


@numba.njit(cache=True, inline="always")
def _below_and_at(leaf, blk, i):  # type: ignore[no-untyped-def]
    """Return (sum over indices < i, value at i) of a blocked prefix counter.

    A fixed-length masked scan of i's block (contiguous, vectorised) plus a prefix walk over
    the earlier blocks.
    """
    base = i & ~((1 << _LEAF) - 1)
    s = leaf[0] * 0
    for q in range(1 << _LEAF):
        s += leaf[base + q] * (base + q < i)
    j = i >> _LEAF
    while j > 0:
        s += blk[j]
        j -= j & (-j)
    return s, leaf[i]


_SMALL_TIE = 64  # events tied in time up to which the sweep ranks them by insertion sort


@numba.njit(cache=True)
def harrell_sweep(t, e, group, order):  # type: ignore[no-untyped-def]
    """Harrell's counts and IJ influence in one forward pass over time (unit weights).

    One prefix counter over risk ranks (`_add_blocked`) holds two counters per entry packed in
    an int64: events seen (high 32 bits) and all subjects seen (low 32 bits). For subject p at time T:
      - earlier comparable events (events before T; for a censored p also events at T) by
        rank >, ==, < rank_p come from the high half;
      - for an event p, its comparable later subjects are everyone except subjects before T
        and events at T: counts by rank <, ==, > come from its risk group [lo, hi) (all
        subjects, `group` = lo + hi << 32 from `risk_groups`) minus the low half.
    The tree is indexed by lo + 1, shared by all rows of a group of equal risks.
    c_p = later-lower + earlier-higher, d_p = later-higher + earlier-lower, t_p = ties;
    dfbeta_p = (c_p - d_p) / npair - somer / npair * (c_p + d_p + t_p) (R's IJ, as in
    `pass_later` + `pass_earlier`), returned / 2 in input row order (`order[p]` = row).
    Also returns concordant, discordant, tied risk and event pairs tied in time (those also
    tied in risk come from `risk_groups`).
    """
    n = t.shape[0]
    if n >= 2**31:
        raise ValueError("harrell_sweep packs counts in 32 bits: n must be < 2^31")
    tree = np.zeros(((n + 1) | ((1 << _LEAF) - 1)) + 1, dtype=np.int64)
    blk = np.zeros((tree.shape[0] >> _LEAF) + 1, dtype=np.int64)
    cd = np.empty(n, dtype=np.int64)
    cdt = np.empty(n, dtype=np.int64)
    buf_r = np.empty(_SMALL_TIE, dtype=np.int64)
    buf_p = np.empty(_SMALL_TIE, dtype=np.int64)
    e_tot = 0
    a_tot = 0
    conc = 0
    disc = 0
    ties = 0
    tied_all = 0
    lo = 0
    while lo < n:
        hi = lo + 1
        while hi < n and t[hi] == t[lo]:
            hi += 1
        k = 0
        for p in range(lo, hi):
            if e[p]:
                k += 1
        if 0 < k <= _SMALL_TIE:
            # events tied at T are not comparable: rank them among themselves (insertion
            # sort of their group indices) so each queries the counter once, before any of
            # them is added, and the block's own events are added once
            m = 0
            for p in range(lo, hi):
                if e[p]:
                    rk = group[p] & _LOW
                    j = m
                    while j > 0 and buf_r[j - 1] > rk:
                        buf_r[j] = buf_r[j - 1]
                        buf_p[j] = buf_p[j - 1]
                        j -= 1
                    buf_r[j] = rk
                    buf_p[j] = p
                    m += 1
            tied_all += k * (k - 1) // 2
            j0 = 0
            while j0 < k:
                j1 = j0 + 1
                while j1 < k and buf_r[j1] == buf_r[j0]:
                    j1 += 1
                for j in range(j0, j1):
                    p = buf_p[j]
                    blo = group[p] & _LOW
                    bhi = group[p] >> 32
                    b, a = _below_and_at(tree, blk, blo + 1)
                    elt = b >> 32
                    eeq = a >> 32
                    # not later than p: subjects before T, and events at T (p included)
                    alt = (b & _LOW) + j0
                    aeq = (a & _LOW) + (j1 - j0)
                    less = blo - alt
                    eq = bhi - blo - aeq
                    gt = n - bhi - (a_tot + k - alt - aeq)
                    egt = e_tot - elt - eeq
                    conc += less
                    disc += gt
                    ties += eq
                    c = less + egt
                    d = gt + elt
                    cd[p] = c - d
                    cdt[p] = c + d + eq + eeq
                j0 = j1
            for j in range(k):
                _add_blocked(tree, blk, buf_r[j] + 1, _E1 + 1)
            e_tot += k
            a_tot += k
        elif k > _SMALL_TIE:
            # many events tied at T: they first join "all subjects" so each excludes the others
            for p in range(lo, hi):
                if e[p]:
                    rk = (group[p] & _LOW) + 1
                    _add_blocked(tree, blk, rk, np.int64(1))
            a_tot += k
            tied_all += k * (k - 1) // 2
            for p in range(lo, hi):
                if e[p]:
                    blo = group[p] & _LOW
                    bhi = group[p] >> 32
                    rk = blo + 1
                    b, a = _below_and_at(tree, blk, rk)
                    elt = b >> 32
                    eeq = a >> 32
                    alt = b & _LOW
                    aeq = a & _LOW
                    less = blo - alt
                    eq = bhi - blo - aeq
                    gt = n - bhi - (a_tot - alt - aeq)
                    egt = e_tot - elt - eeq
                    conc += less
                    disc += gt
                    ties += eq
                    c = less + egt
                    d = gt + elt
                    cd[p] = c - d
                    cdt[p] = c + d + eq + eeq
            for p in range(lo, hi):
                if e[p]:
                    rk = (group[p] & _LOW) + 1
                    _add_blocked(tree, blk, rk, _E1)
            e_tot += k
        for p in range(lo, hi):
            if not e[p]:
                blo = group[p] & _LOW
                rk = blo + 1
                b, a = _below_and_at(tree, blk, rk)
                elt = b >> 32
                eeq = a >> 32
                egt = e_tot - elt - eeq
                cd[p] = egt - elt
                cdt[p] = egt + elt + eeq
                _add_blocked(tree, blk, rk, np.int64(1))
                a_tot += 1
        lo = hi
    infl = np.empty(n, dtype=np.float64)
    fc = float(conc)
    fd = float(disc)
    npair = fc + fd + float(ties)
    if npair > 0:
        somer = (fc - fd) / npair
        f = somer / npair
        for p in range(n):
            infl[order[p]] = (float(cd[p]) / npair - f * float(cdt[p])) / 2.0
    return infl, conc, disc, ties, tied_all
