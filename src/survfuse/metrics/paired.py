"""Paired tests of correlated estimates on the same subjects, and Holm over a planned family.

Two models scored on the same subjects give correlated estimates; their difference is tested
with the infinitesimal-jackknife (IJ) influence of each subject on each estimate:
U_d = U_a - U_b (summed within clusters), Var(d) = sum U_d^2, z = d / sqrt(Var(d)),
p = 2 Phi(-|z|). For Harrell's C this is R's `concordance(fit1, fit2, ...)` contrast test
(tests/reference/paired_concordance.R). The null distribution is analytic, so p is not floored
at 2 / (B + 1) as a p-value read off B bootstrap replicates is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from survfuse.metrics.concordance import _cluster_sum, concordance_index

__all__ = [
    "P_TESTS",
    "ConcordanceMatrix",
    "concordance_matrix",
    "holm",
    "holm_family",
    "paired_concordance",
    "z_test",
]

# How a p-value was made (the `p_test` column of comparison tables):
P_TESTS = {
    "ij_z": "paired z-test, infinitesimal-jackknife variance of the difference",
    "bootstrap_z": "paired z-test, bootstrap standard deviation of the difference",
}


def z_test(difference: float, variance: float) -> tuple[float, float, float]:
    """(se, z, two-sided p) of H0: difference = 0 with a normal null: z = d / sqrt(var).

    var = 0: z = 0 (p = 1) when d = 0, else +-inf (p = 0); NaN input gives NaN.
    """
    if not (math.isfinite(difference) and math.isfinite(variance)):
        return math.nan, math.nan, math.nan
    se = math.sqrt(max(variance, 0.0))
    if se == 0:
        z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
    else:
        z = difference / se
    return se, z, float(2.0 * stats.norm.sf(abs(z)))


@dataclass(frozen=True, eq=False)
class ConcordanceMatrix:
    """Harrell's C of several risk scores on the same subjects and their IJ covariance.

    R `concordance(fit1, fit2, ...)`: `$concordance` and `$var`. `influence` [K, n_clusters].
    """

    names: list[str]
    estimates: NDArray[np.float64]
    covariance: NDArray[np.float64]
    influence: NDArray[np.float64] = field(repr=False)

    def contrast(self, a: str, b: str) -> tuple[float, float, float, float]:
        """(C_a - C_b, its variance c'Vc, z, p) for c = e_a - e_b."""
        i, j = self.names.index(a), self.names.index(b)
        d = float(self.estimates[i] - self.estimates[j])
        var = float(self.covariance[i, i] + self.covariance[j, j] - 2 * self.covariance[i, j])
        _, z, p = z_test(d, var)
        return d, var, z, p


def concordance_matrix(
    time: ArrayLike,
    event: ArrayLike,
    risks: Mapping[str, ArrayLike],
    *,
    cluster: ArrayLike | None = None,
) -> ConcordanceMatrix:
    """Compute Harrell's C of every risk score [N] and their IJ covariance V = U U'.

    U [K, n_clusters] are the per-cluster IJ influences (`concordance_index`), as R
    `concordance(fit1, fit2, ...)` computes.
    """
    names = list(risks)
    res = [concordance_index(time, event, risks[k]) for k in names]
    n = res[0].n_subjects
    u = np.stack([_cluster_sum(r.influence, cluster, n) for r in res])
    return ConcordanceMatrix(names, np.array([r.estimate for r in res]), u @ u.T, u)


def paired_concordance(
    time: ArrayLike,
    event: ArrayLike,
    risks: Mapping[str, ArrayLike],
    *,
    reference: str,
    cluster: ArrayLike | None = None,
) -> pl.DataFrame:
    """Compare each model's Harrell C with `reference` on the same subjects (IJ z-test).

    One row per other model with c, c_reference, delta, std_error, z, p_value (IJ z-test), p_test
    "ij_z", and p_holm over these comparisons with family_size.
    """
    if reference not in risks:
        raise ValueError(f"reference {reference!r} is not one of the models {sorted(risks)}")
    cm = concordance_matrix(time, event, risks, cluster=cluster)
    ref = cm.names.index(reference)
    rows = []
    for i, k in enumerate(cm.names):
        if i == ref:
            continue
        d, var, z, p = cm.contrast(k, reference)
        rows.append(
            {
                "model": k,
                "reference": reference,
                "c": float(cm.estimates[i]),
                "c_reference": float(cm.estimates[ref]),
                "delta": d,
                "std_error": math.sqrt(max(var, 0.0)),
                "z": z,
                "p_value": p,
                "p_test": "ij_z",
            }
        )
    table = pl.DataFrame(rows)
    adj, m = holm_family(table["p_value"].to_numpy(), np.ones(table.height, dtype=bool))
    return table.with_columns(pl.Series("p_holm", adj), pl.lit(m).alias("family_size"))


def holm(p: ArrayLike) -> NDArray[np.float64]:
    """Holm step-down adjusted p-values: p_(k) * (m - k + 1), running max, capped at 1.

    NaN p-values (no test) stay NaN and do not count in m, as in R's `p.adjust`.
    """
    pv = np.asarray(p, dtype=np.float64)
    out = np.full(pv.shape, np.nan)
    ok = np.isfinite(pv)
    fin = pv[ok]
    m = fin.shape[0]
    order = np.argsort(fin, kind="stable")
    adj = np.empty(m)
    adj[order] = np.minimum(1.0, np.maximum.accumulate(fin[order] * (m - np.arange(m))))
    out[ok] = adj
    return out


def holm_family(p: ArrayLike, in_family: ArrayLike) -> tuple[NDArray[np.float64], int]:
    """Holm-adjust p over the members of a pre-specified family (`in_family` [M] bool).

    NaN outside the family and for NaN p. Returns (p_holm [M], family size m = finite
    members).
    """
    pv = np.asarray(p, dtype=np.float64)
    fam = np.asarray(in_family, dtype=bool) & np.isfinite(pv)
    out = np.full(pv.shape, np.nan)
    if fam.any():
        out[fam] = holm(pv[fam])
    return out, int(fam.sum())
