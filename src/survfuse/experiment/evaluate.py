"""Score a finished grid: per task x split x model, seeds averaged.

With bootstrap CIs and paired comparisons against the reference (best unimodal) model,
Holm-adjusted over a pre-specified family.

For each task and evaluation split (validation, internal_test, external_test):
- every model's per-seed predictions are scored with the configured metrics (Harrell and Uno C,
  td-AUC and IBS at the horizons; `calibration`: calibration slope and intercept, ICI and E50
  at the calibration horizon, `metrics.calibration_ci`); the model's estimate is the mean over
  its seeds;
- B subject-level resamples are drawn once per task x split (`numpy` Generator seeded from
  `evaluation.seed`, the task and the split) and shared by every model, so differences between
  models are paired; on each resample the statistic is again the mean over seeds;
- the CI is the percentile interval of the resampled statistic, except for ICI / E50 (an
  absolute error, biased upward): its lower end is 0 when the Wald test of perfect calibration
  of every seed's predictions does not reject (`metrics.calibration_ci.error_interval`);
- a model is compared with the reference on Harrell / Uno C, td-AUC and IBS: the difference
  with the percentile CI of its resampled values, and a two-sided p from the paired IJ z-test
  (`p_test` "ij_z": z = d / sqrt(sum_k (U_k - U_ref,k)^2), U the seed-averaged
  infinitesimal-jackknife influence of subject k; for Harrell's C the contrast test of R
  `concordance(fit, fit_ref)`), or a z-test with the bootstrap SD of the difference where a
  metric has no influence function ("bootstrap_z");
- Holm adjusts the p-values of the comparisons in the pre-specified family
  (`ComparisonFamily`: by default Harrell's C of every fused model against the reference, on
  internal and external test, all tasks together); `family_size` is the number of
  comparisons adjusted together. Rows outside the family have p_holm NaN, validation rows
  always: the reference is chosen on validation.

The reference is chosen per task on the validation split (never on a test split): the unimodal
model with the highest seed-averaged Harrell C (or the model of `evaluation.reference`).
Per-model statistics are cached in `RUN_DIR/eval_cache/` (`experiment.eval_cache`), keyed by a
digest of the model's predictions, the outcomes and the evaluation settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.data.cohort import outcome_columns
from survfuse.data.splits import EVAL_SPLITS
from survfuse.experiment.cell import surv_column
from survfuse.experiment.config import COMPARED_METRICS, ExperimentConfig
from survfuse.experiment.eval_runner import score_groups
from survfuse.experiment.grid import CellSpec
from survfuse.experiment.rundir import RunDir, write_parquet
from survfuse.experiment.scoring import (
    CALIBRATION_KEYS,
    CalibrationScorer,
    GroupData,
    MetricKey,
    ModelPreds,
    finish_group,
    group_seed,
    make_scorers,
    score_blocks,
    score_group,
)
from survfuse.metrics import holm_family, interval, z_test
from survfuse.metrics.calibration_ci import CALIBRATION_STATISTICS, error_interval

__all__ = [
    "COMPARED_METRICS",
    "HIGHER_IS_BETTER",
    "MODEL_SCHEMA",
    "CalibrationScorer",
    "ComparisonFamily",
    "GroupData",
    "ModelPreds",
    "assemble_table",
    "build_groups",
    "evaluate_run",
    "finish_group",
    "group_seed",
    "make_scorers",
    "score_blocks",
    "score_group",
]

# Columns that identify a model of a task x split, first in every per-model table of a run
# (metrics.parquet here, imbalance.parquet in `imbalance_eval`).
MODEL_SCHEMA = {
    "task": pl.Utf8,
    "split": pl.Utf8,
    "model": pl.Utf8,
    "strategy": pl.Utf8,
    "fusion": pl.Utf8,
    "ct_encoder": pl.Utf8,
    "ehr_encoder": pl.Utf8,
    "head": pl.Utf8,
}

# Direction of each metric (for the report's wording of a difference); None: closeness to a
# target (calibration slope 1, intercept 0), no direction.
HIGHER_IS_BETTER: dict[str, bool | None] = {
    "harrell_c": True,
    "uno_c": True,
    "td_auc": True,
    "ibs": False,
    "cal_slope": None,
    "cal_intercept": None,
    "ici": False,
    "e50": False,
}
# Metrics compared with the reference (smooth statistics with a direction).


@dataclass(frozen=True)
class ComparisonFamily:
    """The pre-specified family of comparisons Holm adjusts together (study-wide).

    `metrics`: compared metrics in the family; `splits`: test splits in the family (never
    validation: the reference is chosen there); `models`: "fused" (two-modality models) or
    "all" (every non-reference model). Other comparisons keep their p-value, p_holm NaN.
    """

    metrics: tuple[str, ...] = ("harrell_c",)
    splits: tuple[str, ...] = ("internal_test", "external_test")
    models: str = "fused"

    def __post_init__(self) -> None:
        if "validation" in self.splits:
            raise ValueError(
                "the comparison family cannot include validation: the reference is chosen there"
            )
        if self.models not in ("fused", "all"):
            raise ValueError(f"family models must be 'fused' or 'all', got {self.models!r}")

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> ComparisonFamily:
        """Return the config's `evaluation.family`."""
        f = cfg.evaluation.family
        return cls(metrics=tuple(f.metrics), splits=tuple(f.splits), models=f.models)

    def contains(self, metric: str, split: str, unimodal: bool) -> bool:
        return (
            metric in self.metrics
            and split in self.splits
            and (self.models == "all" or not unimodal)
        )


# ----------------------------------------------------------------------------- assembling
def _load_group_models(
    rd: RunDir,
    specs: list[CellSpec],
    rows: NDArray[np.int64],
    times: NDArray[np.float64],
    frames: dict[str, pl.DataFrame],
) -> list[ModelPreds]:
    by_model: dict[str, list[CellSpec]] = {}
    for s in specs:
        if rd.is_done(s.cell_id, s.digest()):
            by_model.setdefault(s.model, []).append(s)
    out = []
    cols = [surv_column(float(t)) for t in times]
    for model, cells in by_model.items():
        cells = sorted(cells, key=lambda c: c.seed)
        risks, survs = [], []
        for c in cells:
            if c.cell_id not in frames:  # read each cell once for all splits
                frames[c.cell_id] = pl.read_parquet(rd.cell(c.cell_id) / "predictions.parquet")
            p = frames[c.cell_id]
            risks.append(p["risk"].to_numpy()[rows])
            survs.append(p.select(cols).to_numpy()[rows])
        out.append(
            ModelPreds(
                model=model,
                spec=cells[0],
                seeds=[c.seed for c in cells],
                risk=np.stack(risks).astype(np.float64),
                surv=np.stack(survs).astype(np.float64),
            )
        )
    return out


def build_groups(cfg: ExperimentConfig, rd: RunDir, specs: list[CellSpec]) -> list[GroupData]:
    """One `GroupData` per task x evaluation split that has rows and finished models."""
    cohort = pl.read_parquet(rd.cohort)
    split = cohort["split"].to_numpy()
    ev = cfg.evaluation
    times = np.asarray(ev.survival_times(), dtype=np.float64)
    groups = []
    frames: dict[str, pl.DataFrame] = {}
    for task in cfg.tasks:
        tcol, ecol = outcome_columns(task)
        time = cohort[tcol].cast(pl.Float64).to_numpy()
        event = cohort[ecol].cast(pl.Boolean).to_numpy()
        train = split == "train"
        task_specs = [s for s in specs if s.task == task]
        for name in EVAL_SPLITS:
            rows = np.flatnonzero(split == name)
            if rows.size == 0:
                continue
            models = _load_group_models(rd, task_specs, rows, times, frames)
            if not models:
                continue
            groups.append(
                GroupData(
                    task=task,
                    split=name,
                    time=time[rows],
                    event=event[rows],
                    subject_id=cohort["subject_id"].cast(pl.Int64).to_numpy()[rows],
                    train_time=time[train],
                    train_event=event[train],
                    times=times,
                    metrics=list(ev.metrics),
                    horizons=list(ev.horizons),
                    cal_horizon=ev.cal_horizon,
                    cal_bins=ev.calibration_bins,
                    models=models,
                    n_boot=ev.bootstrap,
                    seed=ev.seed,
                )
            )
    return groups


def choose_reference(
    cfg: ExperimentConfig,
    task: str,
    validation_point: dict[str, dict[MetricKey, float]],
    models: dict[str, CellSpec],
) -> str | None:
    """Choose the reference model of a task on validation Harrell C (never on a test split)."""
    ref = cfg.evaluation.reference
    if ref == "best_unimodal":
        candidates = [k for k, s in models.items() if len(s.modalities) == 1]
    else:
        candidates = [k for k, s in models.items() if s.strategy == ref]
    scored = [
        (validation_point.get(k, {}).get(("harrell_c", None), math.nan), k) for k in candidates
    ]
    scored = [(c, k) for c, k in scored if math.isfinite(c)]
    if not scored:
        return candidates[0] if candidates else None
    return max(scored)[1]


def _ci(x: NDArray[np.float64], estimate: float, alpha: float) -> tuple[float, float]:
    """Percentile interval of the finite replicates (`survfuse.metrics.interval`)."""
    x = x[np.isfinite(x)]
    if x.size < 2 or not math.isfinite(estimate):
        return math.nan, math.nan
    lo, hi = interval(estimate, x, 1.0 - alpha, "percentile")
    return float(lo), float(hi)


def _compare(
    delta: float,
    d: NDArray[np.float64],
    u: NDArray[np.float64] | None,
    u_ref: NDArray[np.float64] | None,
) -> tuple[float, str]:
    """(p, test) of one paired difference: the IJ z-test, else the bootstrap-SD z-test."""
    if not math.isfinite(delta):
        return math.nan, ""
    if u is not None and u_ref is not None:
        diff = u - u_ref
        return z_test(delta, float(diff @ diff))[2], "ij_z"
    d = d[np.isfinite(d)]
    if d.size < 2:
        return math.nan, ""
    return z_test(delta, float(np.var(d, ddof=1)))[2], "bootstrap_z"


TABLE_SCHEMA = {
    **MODEL_SCHEMA,
    "unimodal": pl.Boolean,
    "metric": pl.Utf8,
    "horizon": pl.Float64,
    "estimate": pl.Float64,
    "lower": pl.Float64,
    "upper": pl.Float64,
    "ci_method": pl.Utf8,
    "n_seeds": pl.Int64,
    "n": pl.Int64,
    "n_events": pl.Int64,
    "n_boot": pl.Int64,
    "higher_is_better": pl.Boolean,
    "reference": pl.Utf8,
    "is_reference": pl.Boolean,
    "delta": pl.Float64,
    "delta_lower": pl.Float64,
    "delta_upper": pl.Float64,
    "p_value": pl.Float64,
    "p_test": pl.Utf8,
    "in_family": pl.Boolean,
    "family_size": pl.Int64,
    "p_holm": pl.Float64,
}


def assemble_table(
    cfg: ExperimentConfig,
    groups: list[GroupData],
    scores: list[dict[str, Any]],
    family: ComparisonFamily | None = None,
) -> pl.DataFrame:
    """Build the long metrics table (one row per task x split x model x metric x horizon).

    Columns: the model (`MODEL_SCHEMA`), metric, horizon, estimate, lower, upper, ci_method
    ("percentile", or "percentile_calibration_test" for ICI / E50), n_seeds, n, n_events,
    n_boot, higher_is_better, reference, is_reference, delta (model - reference) with
    delta_lower / delta_upper, p_value and p_test ("ij_z" or "bootstrap_z"), in_family,
    family_size and p_holm (Holm over the family, `ComparisonFamily`; NaN outside it).
    """
    family = family or ComparisonFamily.of(cfg)
    alpha = cfg.evaluation.alpha
    rows: list[dict[str, Any]] = []
    references: dict[str, str | None] = {}
    for task in cfg.tasks:
        val = [
            s
            for g, s in zip(groups, scores, strict=True)
            if g.task == task and g.split == "validation"
        ]
        specs = {m.model: m.spec for g in groups if g.task == task for m in g.models}
        references[task] = choose_reference(cfg, task, val[0]["point"] if val else {}, specs)
    for g, sc in zip(groups, scores, strict=True):
        ref = references[g.task]
        ref_boot = sc["boot"].get(ref) if ref is not None else None
        infl = sc.get("infl", {})
        for m in g.models:
            unimodal = len(m.spec.modalities) == 1
            for key, est in sc["point"][m.model].items():
                metric, horizon = key
                boot = sc["boot"][m.model][key]
                method = CALIBRATION_STATISTICS.get(metric, "percentile")
                if method == "percentile":
                    lo, hi = _ci(boot, est, alpha)
                else:
                    p_cal = sc.get("p_cal", {}).get(m.model, {}).get(float(horizon or 0.0))
                    lo, hi = error_interval(
                        est, boot, 1.0 - alpha, math.nan if p_cal is None else p_cal
                    )
                row: dict[str, Any] = {
                    "task": g.task,
                    "split": g.split,
                    "model": m.model,
                    "strategy": m.spec.strategy,
                    "fusion": m.spec.strategy_name,
                    "ct_encoder": m.spec.ct_encoder,
                    "ehr_encoder": m.spec.ehr_encoder,
                    "head": m.spec.head,
                    "unimodal": unimodal,
                    "metric": metric,
                    "horizon": horizon,
                    "estimate": est,
                    "lower": lo,
                    "upper": hi,
                    "ci_method": method,
                    "n_seeds": len(m.seeds),
                    "n": int(g.time.size),
                    "n_events": int(g.event.sum()),
                    "n_boot": g.n_boot,
                    "higher_is_better": HIGHER_IS_BETTER[metric],
                    "reference": ref,
                    "is_reference": m.model == ref,
                    "delta": math.nan,
                    "delta_lower": math.nan,
                    "delta_upper": math.nan,
                    "p_value": math.nan,
                    "p_test": None,
                    "in_family": False,
                    "family_size": 0,
                    "p_holm": math.nan,
                }
                compared = metric in COMPARED_METRICS and m.model != ref
                if ref_boot is not None and compared and key in ref_boot:
                    ref_est = sc["point"][ref][key]
                    d = boot - ref_boot[key]
                    row["delta"] = est - ref_est
                    row["delta_lower"], row["delta_upper"] = _ci(d, row["delta"], alpha)
                    u = infl.get(m.model, {}).get(key)
                    u_ref = infl.get(ref, {}).get(key) if ref is not None else None
                    row["p_value"], test = _compare(row["delta"], d, u, u_ref)
                    row["p_test"] = test or None
                    row["in_family"] = family.contains(metric, g.split, unimodal)
                rows.append(row)
    # Holm over the pre-specified family, study-wide (every task and split in it together).
    p = np.array([r["p_value"] for r in rows], dtype=np.float64)
    fam = np.array([r["in_family"] for r in rows], dtype=bool)
    adj, size = holm_family(p, fam)
    for r, a, f in zip(rows, adj, fam & np.isfinite(p), strict=True):
        r["in_family"] = bool(f)
        r["p_holm"] = float(a)
        r["family_size"] = size if f else 0
    schema = TABLE_SCHEMA
    df = pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)
    # Rows in config order: tasks, splits, models (grid order), metrics, horizons.
    metric_order = [
        k for m in cfg.evaluation.metrics for k in (CALIBRATION_KEYS if m == "calibration" else [m])
    ]
    orders = {
        "task": {t: i for i, t in enumerate(cfg.tasks)},
        "split": {s: i for i, s in enumerate(EVAL_SPLITS)},
        "model": {
            m: i for i, m in enumerate(dict.fromkeys(m.model for g in groups for m in g.models))
        },
        "metric": {m: i for i, m in enumerate(metric_order)},
    }
    keys = [f"_{c}" for c in orders]
    return (
        df.with_columns(
            pl.col(c).replace_strict(o, default=len(o), return_dtype=pl.Int64).alias(f"_{c}")
            for c, o in orders.items()
        )
        .sort([*keys[:3], keys[3], "horizon"], nulls_last=False)
        .drop(keys)
    )


def evaluate_run(
    cfg: ExperimentConfig,
    rd: RunDir,
    specs: list[CellSpec],
    *,
    executor: Any = None,
    progress: bool = True,
    console: Any = None,
) -> pl.DataFrame:
    """Score every finished cell and write `metrics.parquet` + `metrics.csv`; return the table.

    Statistics of unchanged models come from `RUN_DIR/eval_cache/` (`score_groups`).
    """
    groups = build_groups(cfg, rd, specs)
    scores = score_groups(groups, rd, executor=executor, progress=progress, console=console)
    table = assemble_table(cfg, groups, scores)
    write_parquet(rd.metrics, table)
    tmp_csv = rd.metrics_csv.with_name(".metrics.csv.tmp")
    table.write_csv(tmp_csv)
    tmp_csv.replace(rd.metrics_csv)
    return table
