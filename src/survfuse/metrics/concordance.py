"""Harrell's and Uno's concordance in O(n log n).

Harrell's C: one forward sweep over time with a prefix counter over risk groups
(`_kernels.harrell_sweep`), orders from np.sort of packed uint64 keys. Uno's C and the
resampling kernels: Fenwick trees over dense risk ranks (`SortedSurvival`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from survfuse.interop import check_risk, check_survival
from survfuse.metrics import _kernels as K
from survfuse.metrics.ipcw import CensoringModel
from survfuse.metrics.result import NoComparablePairError, NoEventBeforeTauError

__all__ = [
    "ConcordanceResult",
    "IPCWConcordanceResult",
    "PairedConcordanceTest",
    "SortedSurvival",
    "compare_concordance",
    "concordance_index",
    "concordance_index_ipcw",
]


@dataclass(frozen=True)
class SortedSurvival:
    """Data sorted by time once, with dense risk ranks 1..n_ranks (shared by every kernel)."""

    order: NDArray[np.int64]
    time: NDArray[np.float64]
    event: NDArray[np.bool_]
    rank: NDArray[np.int64]
    n_ranks: int

    @classmethod
    def build(
        cls, time: NDArray[np.float64], event: NDArray[np.bool_], risk: NDArray[np.float64]
    ) -> SortedSurvival:
        return _sort_and_rank(time, event, risk)

    def unsort(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        out = np.empty_like(x)
        out[self.order] = x
        return out


def _keys(x: NDArray[np.float64]) -> tuple[NDArray[np.uint64], int]:
    """Return sorted packed uint64 keys of x and the number of index bits `shift`.

    Order-preserving value bits, row index in the low `shift` bits: np.sort of uint64 is
    SIMD-vectorised, far faster than np.argsort of float64.
    """
    shift = max(1, (x.shape[0] - 1).bit_length())
    return np.sort(K.sort_keys(np.ascontiguousarray(x), shift)), shift


def _order(x: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Ascending order of x and the sorted values (equal values in row order)."""
    keys, shift = _keys(x)
    return K.keyed_order(keys, x, shift)  # type: ignore[no-any-return]


def _sort_by_time(
    time: NDArray[np.float64], event: NDArray[np.bool_], risk: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.bool_], NDArray[np.float64]]:
    # any order within tied times works: the kernels treat a block of tied times together
    keys, shift = _keys(time)
    return K.time_order(keys, time, event, risk, shift)  # type: ignore[no-any-return]


def _sort_and_rank(
    time: NDArray[np.float64], event: NDArray[np.bool_], risk: NDArray[np.float64]
) -> SortedSurvival:
    order, ts, es, rs = _sort_by_time(time, event, risk)
    rank, n_ranks = K.dense_ranks(*_order(rs))
    return SortedSurvival(order, ts, es, rank, int(n_ranks))


def _validate(
    time: ArrayLike, event: ArrayLike, risk: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.float64]]:
    t, e = check_survival(time, event)
    r = check_risk(risk, t.shape[0])
    return t, e, r


def _cluster_sum(x: NDArray[np.float64], cluster: ArrayLike | None, n: int) -> NDArray[np.float64]:
    if cluster is None:
        return x
    c = np.asarray(cluster)
    if c.shape != (n,):
        raise ValueError(f"length mismatch: cluster has shape {c.shape}, time has {n} values")
    _, inv = np.unique(c, return_inverse=True)
    return np.bincount(inv.reshape(-1), weights=x).astype(np.float64)


@dataclass(frozen=True, eq=False)
class ConcordanceResult:
    """Harrell's C with R's counts and infinitesimal-jackknife (IJ) variance.

    estimate = (concordant + tied_risk / 2) / (concordant + discordant + tied_risk);
    variance = sum_i U_i^2 with U_i = dC/dw_i the IJ influence of subject i (summed within
    clusters), exactly R's `concordance(...)$var`. `influence` [N] is in input order.
    """

    estimate: float
    concordant: float
    discordant: float
    tied_risk: float
    tied_time: float
    tied_risk_time: float
    variance: float
    n_subjects: int
    n_events: int
    influence: NDArray[np.float64] = field(repr=False)

    @property
    def std_error(self) -> float:
        return math.sqrt(self.variance)

    @property
    def n_pairs(self) -> float:
        return self.concordant + self.discordant + self.tied_risk


def concordance_index(
    time: ArrayLike,
    event: ArrayLike,
    risk: ArrayLike,
    *,
    cluster: ArrayLike | None = None,
) -> ConcordanceResult:
    """Compute Harrell's C in O(n log n), tie rules of R `concordance(..., reverse = TRUE)`.

    time [N] days, event [N] bool, risk [N] (higher = worse). A pair (i, j) is comparable when
    i has an event and T_i < T_j, or T_i == T_j with j censored; it is concordant when
    risk_i > risk_j and counts 1/2 when the risks tie. Two events at the same time are not
    comparable (`tied_time` counts them with different risks, `tied_risk_time` with equal
    risks, R's tied.y and tied.xy). Constant risk gives 0.5. `cluster` [N] groups rows of one
    subject for the variance. Raises NoComparablePairError when no pair is comparable.

    Parameters
    ----------
    time, event, risk : array-like [N]
        Follow-up (days), event indicator (True = observed) and risk (higher = worse).
    cluster : array-like [N], optional
        Subject ids; the IJ influences are summed within a subject for the variance.

    Returns
    -------
    ConcordanceResult
        The estimate, R's pair counts and the IJ variance with its influences [N].
    """
    t, e, r = _validate(time, event, risk)
    order, ts, es, rs = _sort_by_time(t, e, r)
    group, tied_xy = K.risk_groups(*_order(rs), ts, es)
    infl, conc_i, disc_i, ties_i, tied_all = K.harrell_sweep(ts, es, group, order)
    conc, disc, ties = float(conc_i), float(disc_i), float(ties_i)
    npair = conc + disc + ties
    if npair == 0:
        raise NoComparablePairError(
            f"no comparable pair among {t.shape[0]} subjects with {int(e.sum())} events: "
            "Harrell's C is undefined"
        )
    somer = (conc - disc) / npair
    v = _cluster_sum(infl, cluster, t.shape[0])
    return ConcordanceResult(
        estimate=(somer + 1.0) / 2.0,
        concordant=conc,
        discordant=disc,
        tied_risk=ties,
        tied_time=float(tied_all - tied_xy),
        tied_risk_time=float(tied_xy),
        variance=float(np.sum(v * v)),
        n_subjects=int(t.shape[0]),
        n_events=int(e.sum()),
        influence=infl,
    )


@dataclass(frozen=True, eq=False)
class IPCWConcordanceResult:
    """Uno's C: numerator / denominator of the IPCW-weighted pair sums, truncated at tau."""

    estimate: float
    numerator: float
    denominator: float
    tau: float
    n_subjects: int
    n_events: int
    influence: NDArray[np.float64] = field(repr=False)


def uno_pair_weights(
    s: SortedSurvival, cens: CensoringModel, tau: float | None
) -> tuple[NDArray[np.float64], float]:
    """u_i = [event, T_i < tau] / G(T_i)^2 in sorted order (G from training data), and tau."""
    if tau is None:
        tau_v = math.inf
    else:
        tau_v = float(tau)
        if not tau_v > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        cens.check_horizon(tau_v, "tau", strict=True)
    use = s.event & (s.time < tau_v)
    if not use.any():
        raise NoEventBeforeTauError(
            f"no event before tau = {tau_v} among {s.time.shape[0]} subjects: Uno's C is undefined"
        )
    u = np.zeros(s.time.shape[0])
    g_inv = cens.inverse(s.time[use], "event time")
    u[use] = g_inv * g_inv
    return u, tau_v


def concordance_index_ipcw(
    time: ArrayLike,
    event: ArrayLike,
    risk: ArrayLike,
    *,
    train_time: ArrayLike,
    train_event: ArrayLike,
    tau: float | None = None,
) -> IPCWConcordanceResult:
    """Compute Uno's C (Uno et al. 2011) in O(n log n).

    Identical to scikit-survival's `concordance_index_ipcw` (with exact risk ties instead of its
    1e-8 tolerance).

    C = sum_{i,j} u_i h_ij / sum_{i,j} u_i [j comparable to i], u_i = 1/G(T_i)^2 for events
    with T_i < tau, h_ij = [r_i > r_j] + [r_i = r_j]/2, pairs comparable as in Harrell's C.
    G is the censoring Kaplan-Meier fitted on the *training* outcomes, right-continuous, so a
    censoring at T_i counts as before the event (sksurv's convention).

    Difference from R `concordance(..., timewt = "n/G2", ymax = tau)`: R estimates G on the
    *test* data itself, evaluates it just before each event time (G(t-)), truncates with
    t <= ymax instead of t < tau and applies `aeqSurv` time rounding; on real data the two
    differ by up to ~1e-3 (lung, tau = 600: see tests/test_metrics_concordance.py).

    tau beyond the last training follow-up raises ValueError; no event before tau raises
    NoEventBeforeTauError; no comparable pair raises NoComparablePairError.

    Parameters
    ----------
    time, event, risk : array-like [N]
        Test follow-up (days), event indicator (True = observed) and risk (higher = worse).
    train_time, train_event : array-like
        Training outcomes, for the censoring Kaplan-Meier G.
    tau : float, optional
        Truncation time: only events with T_i < tau count (None: no truncation).

    Returns
    -------
    IPCWConcordanceResult
        The estimate, its numerator / denominator, tau and the IJ influences [N].
    """
    t, e, r = _validate(time, event, risk)
    cens = CensoringModel(train_time, train_event)
    s = SortedSurvival.build(t, e, r)
    u, tau_v = uno_pair_weights(s, cens, tau)
    ones = np.ones(t.shape[0])
    less, eq, gt, _, _ = K.pass_later(s.time, s.event, s.rank, ones, s.n_ranks)
    num = float(np.sum(u * (less + 0.5 * eq)))
    den = float(np.sum(u * (less + eq + gt)))
    if den == 0:
        raise NoComparablePairError(
            f"no comparable pair with an event before tau = {tau_v}: Uno's C is undefined"
        )
    c = num / den
    egt, eeq, elt = K.pass_earlier(s.time, s.event, s.rank, u, s.n_ranks)
    d_num = u * (less + 0.5 * eq) + (egt + 0.5 * eeq)
    d_den = u * (less + eq + gt) + (egt + eeq + elt)
    infl = s.unsort((d_num - c * d_den) / den)
    return IPCWConcordanceResult(c, num, den, tau_v, int(t.shape[0]), int(e.sum()), infl)


@dataclass(frozen=True)
class PairedConcordanceTest:
    """Asymptotic paired test of two correlated Harrell C's on the same subjects."""

    c_a: float
    c_b: float
    difference: float
    var_a: float
    var_b: float
    cov_ab: float
    std_error: float
    z: float
    p_value: float


def compare_concordance(
    time: ArrayLike,
    event: ArrayLike,
    risk_a: ArrayLike,
    risk_b: ArrayLike,
    *,
    cluster: ArrayLike | None = None,
) -> PairedConcordanceTest:
    """Test C_a - C_b by a z-test on the IJ influences (R `concordance(fit_a, fit_b)`).

    Var(C_a - C_b) = sum_k (U_ak - U_bk)^2 with U the per-subject (per-cluster) influence;
    z = (C_a - C_b) / sqrt(Var), two-sided p = 2 Phi(-|z|).
    """
    a = concordance_index(time, event, risk_a, cluster=cluster)
    b = concordance_index(time, event, risk_b, cluster=cluster)
    n = a.n_subjects
    ua = _cluster_sum(a.influence, cluster, n)
    ub = _cluster_sum(b.influence, cluster, n)
    va, vb, cab = float(ua @ ua), float(ub @ ub), float(ua @ ub)
    var = max(va + vb - 2.0 * cab, 0.0)
    diff = a.estimate - b.estimate
    se = math.sqrt(var)
    if se == 0:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    else:
        z = diff / se
    p = float(2.0 * stats.norm.sf(abs(z)))
    return PairedConcordanceTest(a.estimate, b.estimate, diff, va, vb, cab, se, z, p)
