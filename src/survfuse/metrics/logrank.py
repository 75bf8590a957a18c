"""The K-group log-rank test (Mantel-Haenszel; R's `survival::survdiff` with rho = 0)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import chi2

from survfuse.interop import check_survival

__all__ = ["LogRankResult", "logrank_test"]


@dataclass(frozen=True)
class LogRankResult:
    """Log-rank test of K groups.

    `statistic` ~ chi-square with `df` = K - 1 under equal hazards; `groups` [K] in sorted order
    with their `observed` and `expected` event counts.
    """

    statistic: float
    df: int
    p_value: float
    groups: NDArray[np.int64]
    observed: NDArray[np.float64]
    expected: NDArray[np.float64]


def logrank_test(time: ArrayLike, event: ArrayLike, group: ArrayLike) -> LogRankResult:
    """Log-rank test of equal hazards across the groups of `group` [N] (integer labels).

    At each event time t with n_t at risk and d_t events (n_kt, d_kt in group k):
    O_k - E_k = sum_t (d_kt - n_kt d_t / n_t),
    V_kl = sum_t d_t (n_t - d_t) / (n_t - 1) * n_kt / n_t * (1[k = l] - n_lt / n_t),
    statistic = (O - E)' V^- (O - E) over the first K - 1 groups (V has rank K - 1).
    """
    t, e = check_survival(time, event)
    g = np.asarray(group).reshape(-1)
    if g.shape[0] != t.shape[0]:
        raise ValueError(f"group has {g.shape[0]} rows, time {t.shape[0]}")
    labels, gi = np.unique(g, return_inverse=True)
    k = labels.shape[0]
    if k < 2:
        raise ValueError("logrank_test needs at least two groups")
    ev_times = np.unique(t[e])
    # n_kt: subjects of group k with T >= t; d_kt: events of group k at t
    n_kt = np.stack(
        [t[gi == j].shape[0] - np.searchsorted(np.sort(t[gi == j]), ev_times) for j in range(k)],
        axis=1,
    ).astype(np.float64)
    pos = np.searchsorted(ev_times, t[e])
    d_kt = np.zeros_like(n_kt)
    np.add.at(d_kt, (pos, gi[e]), 1.0)
    n_t, d_t = n_kt.sum(axis=1), d_kt.sum(axis=1)
    frac = n_kt / n_t[:, None]
    observed = d_kt.sum(axis=0)
    expected = (frac * d_t[:, None]).sum(axis=0)
    scale = np.divide(d_t * (n_t - d_t), n_t - 1.0, out=np.zeros_like(d_t), where=n_t > 1)
    v = np.einsum("t,tk,tl->kl", scale, frac, -frac)
    v[np.diag_indices(k)] += (scale[:, None] * frac).sum(axis=0)
    diff = (observed - expected)[: k - 1]
    stat = float(diff @ np.linalg.pinv(v[: k - 1, : k - 1]) @ diff)
    return LogRankResult(
        statistic=stat,
        df=k - 1,
        p_value=float(chi2.sf(stat, k - 1)),
        groups=labels.astype(np.int64),
        observed=observed,
        expected=expected,
    )
