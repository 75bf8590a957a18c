"""Paired comparison of many models on the same bootstrap resamples, Holm-adjusted.

The interval of a difference is the bootstrap interval of the paired replicates; its p-value
comes from a test with an analytic null: the IJ z-test (`paired.z_test` on the per-subject
influence of the difference) for every built-in metric with an influence function, else a
z-test with the bootstrap standard deviation of the difference. The p-value read off the
replicates (`bootstrap_p_value`) cannot fall below 2 / (B + 1) and is kept only as a column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import ArrayLike, NDArray

from survfuse.metrics.bootstrap import (
    MetricFn,
    acceleration,
    influence_or_jackknife,
    interval,
    score_models,
)
from survfuse.metrics.paired import holm_family, z_test
from survfuse.metrics.result import MetricResult

__all__ = ["Comparison", "compare"]


def bootstrap_p_value(diff: NDArray[np.float64]) -> float:
    """Return the two-sided p of H0: difference = 0, by inverting the percentile interval.

    p = min(1, 2 min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (B + 1)).

    Floored at 2 / (B + 1) (0.002 for B = 1000): no difference, however large, reads smaller,
    so it is not the p of a comparison (see `compare`).
    """
    b = diff.shape[0]
    lo = 1 + int(np.sum(diff <= 0))
    hi = 1 + int(np.sum(diff >= 0))
    return float(min(1.0, 2.0 * min(lo, hi) / (b + 1)))


@dataclass(frozen=True, eq=False)
class Comparison:
    """Paired comparison of models against a reference on shared resamples.

    `results`: one MetricResult per model (name "metric[model]"); `table`: one row per
    non-reference model with the paired difference `delta` (model - reference) and its CI
    `delta_lower` / `delta_upper` (the column names of metrics.parquet), the p-value
    (`p_test`: "ij_z" or "bootstrap_z", with `std_error` of the difference), the floored
    bootstrap p (`p_bootstrap`) and the Holm adjustment over the table (`p_holm`,
    `family_size`).
    """

    results: list[MetricResult]
    table: pl.DataFrame
    replicates: dict[str, NDArray[np.float64]] = field(repr=False)


def compare(
    models: Mapping[str, ArrayLike],
    time: ArrayLike,
    event: ArrayLike,
    *,
    reference: str,
    metric: str | MetricFn = "harrell_c",
    cluster: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
    train_time: ArrayLike | None = None,
    train_event: ArrayLike | None = None,
    tau: float | None = None,
    times: ArrayLike | None = None,
) -> Comparison:
    """Score every model on the same subject-level resamples; paired differences vs `reference`.

    For each model m != reference: difference d = theta_m - theta_ref with the CI of d*
    (percentile or BCa with the acceleration of the paired influence U_m - U_ref) and a
    two-sided p: the IJ z-test z = d / sqrt(sum_k (U_mk - U_ref,k)^2) over clusters k when the
    metric has an influence function (harrell_c, uno_c, td_auc, brier, ibs; for harrell_c R's
    `concordance(fit_m, fit_ref)` contrast), else z = d / sd(d*). Holm-adjusted across the
    comparisons of the table (the family).

    Parameters
    ----------
    models : mapping of str to array-like
        Name -> risk [N] (or survival [N, K] for brier/ibs/td_auc on `times`).
    time, event : array-like [N]
        Follow-up (days) and event indicator (True = observed).
    reference : str
        The model every other one is compared with.
    metric : str or callable
        One of METRICS, or metric(time, event, risk) -> float.
    cluster : array-like [N], optional
        Subject ids: a resample draws subjects with replacement and keeps all their rows.
    n_boot, seed, level, method
        Resamples, their seed, interval level and "percentile" or "bca".
    train_time, train_event, tau, times
        Passed to the metric (see `make_scorer`).

    Returns
    -------
    Comparison
        Per-model results and the table of paired differences.
    """
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {sorted(models)}")
    if len(models) < 2:
        raise ValueError("compare needs at least two models")
    kw: dict[str, Any] = dict(train_time=train_time, train_event=train_event, tau=tau, times=times)
    s = score_models(metric, time, event, models, cluster, n_boot, seed, level, method, kw)
    mname, method, res, scorers, boots = s.name, s.method, s.res, s.scorers, s.boots
    points = {k: sc.point() for k, sc in scorers.items()}
    ij = {k: sc.influence() for k, sc in scorers.items()}
    infl: dict[str, NDArray[np.float64]] = {}
    if method == "bca":
        infl = {k: influence_or_jackknife(sc, res, seed) for k, sc in scorers.items()}
    results = [
        s.summary(k, f"{mname}[{k}]", points[k], acceleration(infl[k]) if method == "bca" else 0.0)
        for k in models
    ]
    rows = []
    ref_b = boots[reference]
    for k in models:
        if k == reference:
            continue
        d = boots[k] - ref_b
        d = d[np.isfinite(d)]
        est = points[k] - points[reference]
        acc = acceleration(infl[k] - infl[reference]) if method == "bca" else 0.0
        lo, hi = interval(est, d, level, method, acc)
        if ij[k] is not None and ij[reference] is not None:
            u = res.cluster_sum(np.asarray(ij[k]) - np.asarray(ij[reference]))
            se, z, p = z_test(est, float(u @ u))
            test = "ij_z"
        else:
            se, z, p = z_test(est, float(np.var(d, ddof=1)))
            test = "bootstrap_z"
        rows.append(
            {
                "model": k,
                "reference": reference,
                "metric": mname,
                "estimate": points[k],
                "reference_estimate": points[reference],
                "delta": est,
                "delta_lower": lo,
                "delta_upper": hi,
                "level": level,
                "method": method,
                "std_error": se,
                "z": z,
                "p_value": p,
                "p_test": test,
                "p_bootstrap": bootstrap_p_value(d),
                "n_boot": int(d.shape[0]),
                "seed": seed,
            }
        )
    table = pl.DataFrame(rows)
    adj, m = holm_family(table["p_value"].to_numpy(), np.ones(table.height, dtype=bool))
    table = table.with_columns(pl.Series("p_holm", adj), pl.lit(m).alias("family_size"))
    return Comparison(results, table, boots)
