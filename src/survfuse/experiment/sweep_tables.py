"""The tables of `survfuse sweep-imbalance`.

Each cohort's gain over its best unimodal model (`gain_table`), the measured-balance correlation
(`gap_correlation`) and the random-effects pooling of cohorts (`pool_replicates`); see
`survfuse.experiment.sweep` for the design.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.metrics.meta import random_effects

__all__ = [
    "BEST_FUSION",
    "GAIN_SCHEMA",
    "POOLED_KEYS",
    "TEST_SPLITS",
    "gain_table",
    "gap_correlation",
    "pool_replicates",
]

BEST_FUSION = "best fusion"
TEST_SPLITS = ("internal_test", "external_test")
GAIN_SCHEMA = {
    "imbalance": pl.Float64,
    "site_shift": pl.Float64,
    "sim_seed": pl.Int64,
    "task": pl.Utf8,
    "split": pl.Utf8,
    "model": pl.Utf8,
    "strategy": pl.Utf8,
    "selected": pl.Utf8,
    "rebalance": pl.Boolean,
    "reference": pl.Utf8,
    "estimate": pl.Float64,
    "reference_estimate": pl.Float64,
    "gain": pl.Float64,
    "gain_lower": pl.Float64,
    "gain_upper": pl.Float64,
    "validation_c": pl.Float64,
    "unimodal_gap": pl.Float64,
    "ct_share": pl.Float64,
    "imbalance_index": pl.Float64,
    "n_seeds": pl.Int64,
    "n_boot": pl.Int64,
}


def gain_table(
    metrics: pl.DataFrame,
    imbalance: pl.DataFrame | None,
    *,
    setting: dict[str, float | int],
    rebalanced: set[str] | None = None,
) -> pl.DataFrame:
    """Tabulate the gain over the reference (best unimodal) of every fused model.

    Also of the best fusion, per task x test split, from one run's `metrics.parquet` (+ its
    `imbalance.parquet`).
    """
    rebalanced = rebalanced or set()
    hc = metrics.filter(pl.col("metric") == "harrell_c")
    rows: list[dict[str, Any]] = []
    for task in dict.fromkeys(hc["task"].to_list()):
        t = hc.filter(pl.col("task") == task)
        val = t.filter((pl.col("split") == "validation") & ~pl.col("unimodal"))
        val_c = {r["model"]: r["estimate"] for r in val.iter_rows(named=True)}
        finite = {m: c for m, c in val_c.items() if c is not None and math.isfinite(c)}
        best = max(finite, key=lambda m: finite[m]) if finite else None
        best_uni = _best_unimodal_per_modality(t)
        for split in TEST_SPLITS:
            s = t.filter(pl.col("split") == split)
            uni_c = {
                m: s.filter(pl.col("model") == name)["estimate"] for m, name in best_uni.items()
            }
            gap = (
                float(uni_c["ct"][0]) - float(uni_c["ehr"][0])
                if all(k in uni_c and uni_c[k].len() for k in ("ct", "ehr"))
                else math.nan
            )
            if not s.height:
                continue
            ref_rows = s.filter(pl.col("is_reference"))
            ref_est = float(ref_rows["estimate"][0]) if ref_rows.height else math.nan
            for r in s.filter(~pl.col("unimodal")).iter_rows(named=True):
                share = index = math.nan
                if imbalance is not None and imbalance.height:
                    im = imbalance.filter(
                        (pl.col("task") == task)
                        & (pl.col("split") == split)
                        & (pl.col("model") == r["model"])
                    )
                    for q in ("ct_share", "imbalance_index"):
                        v = im.filter(pl.col("quantity") == q)["estimate"]
                        if v.len():
                            if q == "ct_share":
                                share = float(v[0])
                            else:
                                index = float(v[0])
                row = {
                    **setting,
                    "task": task,
                    "split": split,
                    "model": r["model"],
                    "strategy": r["strategy"],
                    "selected": r["strategy"],
                    "rebalance": r["strategy"] in rebalanced,
                    "reference": r["reference"],
                    "estimate": r["estimate"],
                    "reference_estimate": ref_est,
                    "gain": r["delta"],
                    "gain_lower": r["delta_lower"],
                    "gain_upper": r["delta_upper"],
                    "validation_c": val_c.get(r["model"], math.nan),
                    "unimodal_gap": gap,
                    "ct_share": share,
                    "imbalance_index": index,
                    "n_seeds": r["n_seeds"],
                    "n_boot": r["n_boot"],
                }
                rows.append(row)
                if r["model"] == best:
                    rows.append({**row, "model": BEST_FUSION, "strategy": BEST_FUSION})
    return pl.DataFrame(rows, schema=GAIN_SCHEMA, orient="row")


def _best_unimodal_per_modality(t: pl.DataFrame) -> dict[str, str]:
    """Model name of the best unimodal model of each modality on validation (Harrell's C)."""
    out: dict[str, str] = {}
    val = t.filter((pl.col("split") == "validation") & pl.col("unimodal"))
    for m, col in (("ct", "ct_encoder"), ("ehr", "ehr_encoder")):
        rows = val.filter(pl.col(col).is_not_null() & pl.col("estimate").is_finite())
        if rows.height:
            out[m] = str(rows.sort("estimate", descending=True)["model"][0])
    return out


def gap_correlation(per_cohort: pl.DataFrame) -> pl.DataFrame:
    """Compute the Spearman correlation between |unimodal_gap| and the best fusion's gain.

    Over cohorts x imbalances, per site shift x task x split (columns rho, n).
    """
    from scipy.stats import spearmanr

    best = per_cohort.filter(
        (pl.col("model") == BEST_FUSION)
        & pl.col("gain").is_finite()
        & pl.col("unimodal_gap").is_finite()
    )
    rows = []
    for (shift, task, split), part in best.group_by(
        ["site_shift", "task", "split"], maintain_order=True
    ):
        rho = math.nan
        if part.height >= 3:
            rho = float(spearmanr(part["unimodal_gap"].abs(), part["gain"]).statistic)
        rows.append(
            {"site_shift": shift, "task": task, "split": split, "rho": rho, "n": part.height}
        )
    schema = {"site_shift": pl.Float64, "task": pl.Utf8, "split": pl.Utf8, "rho": pl.Float64}
    return pl.DataFrame(rows, schema={**schema, "n": pl.Int64}, orient="row")


POOLED_KEYS = ("imbalance", "site_shift", "task", "split", "model")


def pool_replicates(table: pl.DataFrame, *, level: float = 0.95) -> pl.DataFrame:
    """Pool the gain over the simulated cohorts by random effects.

    Per (w, shift, task, split, model), with its interval at `level` (the runs' bootstrap level;
    module docstring); the run's own interval when a group has one cohort. Columns: those of
    `GAIN_SCHEMA` without `sim_seed`, plus `tau2` (between-cohort variance) and `n_replicates`;
    `selected` lists how often each strategy was the validation-selected best fusion; other numbers
    are means.
    """
    from statistics import NormalDist

    if not table.height:
        schema = {k: v for k, v in GAIN_SCHEMA.items() if k != "sim_seed"}
        return pl.DataFrame(schema={**schema, "tau2": pl.Float64, "n_replicates": pl.Int64})
    z = NormalDist().inv_cdf(0.5 + level / 2)
    mean_cols = [
        "estimate",
        "reference_estimate",
        "validation_c",
        "unimodal_gap",
        "ct_share",
        "imbalance_index",
    ]
    rows = []
    for key, part in table.group_by(list(POOLED_KEYS), maintain_order=True):
        r = len(part)
        first = part.row(0, named=True)
        tau2 = math.nan
        ok = part.filter(
            pl.col("gain").is_finite()
            & pl.col("gain_lower").is_finite()
            & pl.col("gain_upper").is_finite()
        )
        if r == 1 or not ok.height:
            gain, lo, hi = first["gain"], first["gain_lower"], first["gain_upper"]
        else:
            se = (ok["gain_upper"] - ok["gain_lower"]).to_numpy() / (2 * z)
            gain, lo, hi, tau2 = random_effects(ok["gain"].to_numpy(), se, level=level)
        counts = Counter(part["selected"].to_list())
        selected = (
            first["selected"]
            if len(counts) == 1
            else ", ".join(f"{k} x{v}" for k, v in counts.most_common())
        )
        rows.append(
            {
                **dict(zip(POOLED_KEYS, key, strict=True)),
                "strategy": first["strategy"],
                "selected": selected,
                "rebalance": first["rebalance"],
                "reference": first["reference"],
                **{c: _nanmean(part[c].to_numpy()) for c in mean_cols},
                "gain": gain,
                "gain_lower": lo,
                "gain_upper": hi,
                "n_seeds": first["n_seeds"],
                "n_boot": first["n_boot"],
                "tau2": tau2,
                "n_replicates": r,
            }
        )
    order = [k for k in GAIN_SCHEMA if k != "sim_seed"] + ["tau2", "n_replicates"]
    return pl.DataFrame(rows).select(order)


def _nanmean(x: NDArray[np.float64]) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan
