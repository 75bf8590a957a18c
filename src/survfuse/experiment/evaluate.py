"""Score a finished grid: per task x split x model, seeds averaged, with bootstrap CIs and
paired comparisons against the reference (best unimodal) model, Holm-adjusted over a
pre-specified family.

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
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.data.cohort import outcome_columns
from survfuse.experiment.cell import surv_column
from survfuse.experiment.config import EVAL_SPLITS, ExperimentConfig
from survfuse.experiment.grid import CellSpec
from survfuse.experiment.rundir import RunDir

__all__ = [
    "COMPARED_METRICS",
    "HIGHER_IS_BETTER",
    "MODEL_SCHEMA",
    "CalibrationScorer",
    "ComparisonFamily",
    "GroupData",
    "assemble_table",
    "evaluate_run",
    "finish_group",
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
COMPARED_METRICS = ("harrell_c", "uno_c", "td_auc", "ibs")
# The statistics the config's `calibration` metric stands for (`metrics.calibration_ci`).
CALIBRATION_KEYS = ("cal_slope", "cal_intercept", "ici", "e50")

MetricKey = tuple[str, float | None]  # (metric, horizon or None)


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
        """The config's `evaluation.family` (a mapping of these fields) or the default."""
        spec = getattr(cfg.evaluation, "family", None)
        if spec is None:
            return cls()
        d = spec if isinstance(spec, dict) else spec.model_dump()
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def contains(self, metric: str, split: str, unimodal: bool) -> bool:
        return (
            metric in self.metrics
            and split in self.splits
            and (self.models == "all" or not unimodal)
        )


@dataclass
class ModelPreds:
    """One model's predictions on one task x split: `risk` [S, n], `surv` [S, n, len(times)]."""

    model: str
    spec: CellSpec  # the first seed's spec (strategy, encoders, head)
    seeds: list[int]
    risk: NDArray[np.float64]
    surv: NDArray[np.float64]


@dataclass
class GroupData:
    """Everything needed to score one task x split (picklable: it may go to a remote worker)."""

    task: str
    split: str
    time: NDArray[np.float64]
    event: NDArray[np.bool_]
    subject_id: NDArray[np.int64]
    train_time: NDArray[np.float64]
    train_event: NDArray[np.bool_]
    times: NDArray[np.float64]  # the survival grid stored by every cell
    metrics: list[str]
    horizons: list[float]
    cal_horizon: float
    cal_bins: int
    models: list[ModelPreds] = field(default_factory=list)
    n_boot: int = 0
    seed: int = 0


# ----------------------------------------------------------------------------- scorers
class _NaNScorer:
    """A metric that is undefined on these data (e.g. no event before a horizon)."""

    def point(self) -> float:
        return math.nan

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.full(w.shape[0], np.nan)

    def influence(self) -> NDArray[np.float64] | None:
        return None


class CalibrationScorer:
    """Grouped calibration error at a horizon, on weighted (resampled) data.

    Subjects are cut once into `bins` quantile groups of predicted risk p_i = 1 - S_i(h) (on the
    full data, so the groups are fixed under resampling). With weights w (a resample):
    pred_g = sum_g w p / sum_g w, obs_g = 1 - weighted KM_g(h),
    error = sum_g (sum_g w) |pred_g - obs_g| / sum w.
    With w = 1 the groups, predicted and observed values are those of
    `survfuse.metrics.calibration_table`. Not part of metrics.parquet (an absolute error: its
    percentile interval is not valid; the run reports ICI / E50 instead).
    """

    def __init__(
        self,
        time: NDArray[np.float64],
        event: NDArray[np.bool_],
        surv_h: NDArray[np.float64],
        horizon: float,
        bins: int,
    ) -> None:
        from survfuse.metrics.calibration import calibration_table

        self.pred = 1.0 - np.asarray(surv_h, dtype=np.float64)
        self.horizon = float(horizon)
        table = calibration_table(time, event, surv_h, horizon, n_groups=bins)
        self._point_table = table
        # Groups exactly as calibration_table makes them: equal-size ranks of 1 - S.
        n = self.pred.shape[0]
        order = np.argsort(self.pred, kind="stable")
        grp = np.empty(n, dtype=np.int64)
        grp[order] = np.arange(n) * bins // n
        self.groups = [np.flatnonzero(grp == k) for k in range(bins) if (grp == k).any()]
        self.sorted = []
        for g in self.groups:
            o = g[np.argsort(time[g], kind="stable")]
            self.sorted.append((o, np.ascontiguousarray(time[o]), np.ascontiguousarray(event[o])))

    def point(self) -> float:
        t = self._point_table
        n = t["n"].to_numpy().astype(np.float64)
        diff = np.abs(t["predicted"].to_numpy() - t["observed"].to_numpy())
        return float(np.sum(n * diff) / np.sum(n))

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        from survfuse.metrics import _kernels as K

        at = np.array([self.horizon])
        num = np.zeros(w.shape[0])
        den = np.zeros(w.shape[0])
        for o, t, e in self.sorted:
            wg = np.ascontiguousarray(w[:, o])
            ng = wg.sum(axis=1)
            pred = np.divide(wg @ self.pred[o], ng, out=np.zeros_like(ng), where=ng > 0)
            obs = 1.0 - K.weighted_km_at(t, e, wg, at)[:, 0]
            num += ng * np.abs(pred - obs)
            den += ng
        return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)

    def influence(self) -> NDArray[np.float64] | None:
        return None


def make_scorers(
    g: GroupData, risk: NDArray[np.float64], surv: NDArray[np.float64]
) -> dict[MetricKey, Any]:
    """One scorer (`point()`, `boot(w [B, n])`, `influence()`) per configured metric x horizon
    for one prediction; `calibration` gives cal_slope, cal_intercept, ici and e50 at the
    calibration horizon (ici and e50 share one fit, `params(w)` its parameters).

    `surv` [n, len(g.times)] holds S(t) at `g.times`. Metrics undefined on these data give NaN.
    """
    from survfuse.metrics import make_scorer
    from survfuse.metrics.calibration_ci import calibration_scorers

    out: dict[MetricKey, Any] = {}
    tau = max(g.horizons)
    col = {float(t): j for j, t in enumerate(g.times)}
    kw: dict[str, Any] = {"train_time": g.train_time, "train_event": g.train_event}

    def build(fn: Callable[..., Any]) -> Any:
        try:
            return fn()
        except ValueError:  # MetricUndefinedError, or a horizon outside the follow-up
            return _NaNScorer()

    t, e = g.time, g.event
    for metric in g.metrics:
        if metric == "harrell_c":
            out[(metric, None)] = build(lambda: make_scorer("harrell_c", t, e, risk))
        elif metric == "uno_c":
            out[(metric, None)] = build(lambda: make_scorer("uno_c", t, e, risk, tau=tau, **kw))
        elif metric == "td_auc":
            for h in g.horizons:
                out[(metric, h)] = build(
                    lambda h=h: make_scorer("td_auc", t, e, risk, times=[h], **kw)
                )
        elif metric == "ibs":
            # Why restrict the grid: the IPCW Brier score is defined before the last follow-up.
            keep = (g.times <= tau) & (g.times < t.max())
            grid = g.times[keep]
            s = surv[:, keep]
            out[(metric, tau)] = (
                build(lambda s=s, grid=grid: make_scorer("ibs", t, e, s, times=grid, **kw))
                if grid.size >= 2
                else _NaNScorer()
            )
        elif metric == "calibration":
            h = float(g.cal_horizon)
            sh = surv[:, col[h]]
            cal = build(lambda sh=sh, h=h: calibration_scorers(t, e, sh, h))
            for k in CALIBRATION_KEYS:
                out[(k, h)] = cal if isinstance(cal, _NaNScorer) else cal[k]
    return out


# ----------------------------------------------------------------------------- statistics
def group_seed(seed: int, task: str, split: str) -> int:
    """The resampling seed of one task x split: shared by every model (paired resamples)."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{task}|{split}".encode())) % (2**32)


def _nanmean_rows(x: NDArray[np.float64]) -> NDArray[np.float64]:
    ok = np.isfinite(x)
    cnt = ok.sum(axis=0)
    tot = np.where(ok, x, 0.0).sum(axis=0)
    return np.divide(tot, cnt, out=np.full(tot.shape, np.nan), where=cnt > 0)


def _smooth_key(per_seed: list[dict[MetricKey, Any]]) -> MetricKey | None:
    """The key of the ICI scorer (the one with `params`) of a model, if every seed has one."""
    for k in per_seed[0]:
        if k[0] == "ici" and all(hasattr(p[k], "params") for p in per_seed):
            return k
    return None


def group_weights(g: GroupData) -> Iterable[NDArray[np.float64]]:
    """The resample weight blocks [<=128, n] of a task x split (`Resampler.weights`)."""
    from survfuse.metrics import Resampler

    if g.n_boot <= 0:
        return iter(())
    res = Resampler.build(g.time.shape[0], g.subject_id)
    return res.weights(g.n_boot, group_seed(g.seed, g.task, g.split))


def score_blocks(
    g: GroupData,
    blocks: Iterable[NDArray[np.float64]],
    *,
    points: bool = False,
    on_block: Callable[[int], None] | None = None,
    scorers: dict[str, list[dict[MetricKey, Any]]] | None = None,
) -> dict[str, Any]:
    """Seed-averaged statistics of every model of `g` on weight blocks (concatenated in order).

    Returns {"boot": {model: {key: [sum b] array}}, "cal": {model: [per seed [sum b, P + 1]
    smooth-calibration parameters]} (for the calibration test), "point": {model: {key: value}}
    when `points`, else None}.
    """
    if scorers is None:
        scorers = {
            m.model: [make_scorers(g, m.risk[s], m.surv[s]) for s in range(len(m.seeds))]
            for m in g.models
        }
    point = None
    if points:
        point = {
            model: {
                k: float(_nanmean_rows(np.array([[sc[k].point()] for sc in per_seed]))[0])
                for k in per_seed[0]
            }
            for model, per_seed in scorers.items()
        }
    parts: dict[str, dict[MetricKey, list[NDArray[np.float64]]]] = {
        model: {k: [] for k in per_seed[0]} for model, per_seed in scorers.items()
    }
    smooth = {model: _smooth_key(per_seed) for model, per_seed in scorers.items()}
    cal: dict[str, list[list[NDArray[np.float64]]]] = {
        model: [[] for _ in per_seed] for model, per_seed in scorers.items()
    }
    for w in blocks:
        for model, per_seed in scorers.items():
            for k in per_seed[0]:
                vals = np.stack([sc[k].boot(w) for sc in per_seed])
                parts[model][k].append(_nanmean_rows(vals))
            key = smooth[model]
            if key is not None:
                for s, sc in enumerate(per_seed):
                    cal[model][s].append(sc[key].params(w))
        if on_block is not None:
            on_block(w.shape[0])
    boot = {
        model: {k: np.concatenate(v) if v else np.full(0, np.nan) for k, v in keys.items()}
        for model, keys in parts.items()
    }
    cal_out = {
        model: [np.concatenate(p) for p in per] if smooth[model] is not None and per[0] else None
        for model, per in cal.items()
    }
    return {"boot": boot, "point": point, "cal": cal_out}


def finish_group(
    g: GroupData,
    raw: dict[str, Any],
    scorers: dict[str, list[dict[MetricKey, Any]]] | None = None,
) -> dict[str, Any]:
    """Add what needs no resampling to `score_blocks`' output (points when missing): per model
    and key the seed-averaged IJ influence per subject ("infl", None without an influence
    function) and the p of the Wald test of perfect calibration of all seeds together
    ("p_cal": {horizon: p}, `metrics.calibration_ci.calibration_test`)."""
    from survfuse.metrics import Resampler
    from survfuse.metrics.calibration_ci import calibration_test

    if scorers is None:
        scorers = {
            m.model: [make_scorers(g, m.risk[s], m.surv[s]) for s in range(len(m.seeds))]
            for m in g.models
        }
    res = Resampler.build(g.time.shape[0], g.subject_id)
    point = raw.get("point") or {
        model: {
            k: float(_nanmean_rows(np.array([[sc[k].point()] for sc in per_seed]))[0])
            for k in per_seed[0]
        }
        for model, per_seed in scorers.items()
    }
    infl: dict[str, dict[MetricKey, NDArray[np.float64] | None]] = {}
    p_cal: dict[str, dict[float, float]] = {}
    for model, per_seed in scorers.items():
        infl[model] = {}
        for k in per_seed[0]:
            used = [sc[k] for sc in per_seed if math.isfinite(sc[k].point())]
            us = [sc.influence() for sc in used]
            if not used or any(u is None for u in us):
                infl[model][k] = None
            else:
                infl[model][k] = res.cluster_sum(np.mean(np.stack(us), axis=0))
        key = _smooth_key(per_seed)
        params = (raw.get("cal") or {}).get(model)
        if key is not None and params is not None:
            hat = [sc[key].params(np.ones((1, g.time.shape[0])))[0] for sc in per_seed]
            phi0 = [sc[key].phi0 for sc in per_seed]
            p_cal[model] = {
                float(key[1] or 0.0): calibration_test(
                    np.concatenate(hat), np.concatenate(phi0), np.concatenate(params, axis=1)
                )
            }
    return {"point": point, "boot": raw["boot"], "infl": infl, "p_cal": p_cal}


def score_group(g: GroupData, on_block: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Point estimates, resampled statistics, IJ influences and calibration tests of every
    model of one task x split (`score_blocks` on `group_weights`, then `finish_group`).

    Each model's statistic (point and on every resample) is the mean over its seeds.
    Returns {"point": {model: {key: value}}, "boot": {model: {key: [B] array}},
    "infl": {model: {key: [n_subjects] array or None}}, "p_cal": {model: {horizon: p}}}.
    """
    scorers = {
        m.model: [make_scorers(g, m.risk[s], m.surv[s]) for s in range(len(m.seeds))]
        for m in g.models
    }
    raw = score_blocks(g, group_weights(g), points=True, on_block=on_block, scorers=scorers)
    return finish_group(g, raw, scorers)


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
    """The reference model of a task, chosen on validation Harrell C (never on a test split)."""
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
    from survfuse.metrics import interval

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
    from survfuse.metrics import z_test

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
    """The long metrics table (one row per task x split x model x metric x horizon).

    Columns: the model (`MODEL_SCHEMA`), metric, horizon, estimate, lower, upper, ci_method
    ("percentile", or "percentile_calibration_test" for ICI / E50), n_seeds, n, n_events,
    n_boot, higher_is_better, reference, is_reference, delta (model - reference) with
    delta_lower / delta_upper, p_value and p_test ("ij_z" or "bootstrap_z"), in_family,
    family_size and p_holm (Holm over the family, `ComparisonFamily`; NaN outside it).
    """
    from survfuse.metrics import holm_family
    from survfuse.metrics.calibration_ci import CALIBRATION_STATISTICS, error_interval

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


# ----------------------------------------------------------------------------- running
def _split_entry(score: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "point": score["point"][model],
        "boot": score["boot"][model],
        "infl": score["infl"][model],
        "p_cal": score["p_cal"].get(model, {}),
    }


def _progress(progress: bool, console: Any = None) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]bootstrap[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        console=console,
    )


def _score_pool(subs: list[GroupData], workers: int, bar: Any, task: Any) -> list[dict[str, Any]]:
    """`score_group` of each (one-model) group in `workers` spawned processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out: list[dict[str, Any] | None] = [None] * len(subs)
    ctx = multiprocessing.get_context("spawn")  # torch and numba state must not be forked
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(score_group, g): i for i, g in enumerate(subs)}
        for fut in as_completed(futures):
            i = futures[fut]
            out[i] = fut.result()
            bar.advance(task, max(subs[i].n_boot, 1))
    return [o for o in out if o is not None]


def score_groups(
    groups: list[GroupData],
    rd: RunDir | None,
    *,
    executor: Any = None,
    progress: bool = True,
    console: Any = None,
) -> list[dict[str, Any]]:
    """`score_group` of every group, per-model statistics read from / written to the run's
    evaluation cache (`eval_cache.EvalCache`; no cache when `rd` is None). Only models whose
    entry is missing are scored: by `executor.score_groups` (Ray), in the local executor's
    worker processes, or here, with a progress bar."""
    from dataclasses import replace

    from survfuse.experiment.eval_cache import CACHE_DIR, EvalCache, group_digest, model_digest

    cache = EvalCache(rd.root / CACHE_DIR) if rd is not None else None
    digests: list[dict[str, str]] = []
    cached: list[dict[str, dict[str, Any]]] = []
    subs: list[tuple[int, GroupData]] = []
    for i, g in enumerate(groups):
        gd = group_digest(g)
        digests.append({m.model: model_digest(gd, m) for m in g.models})
        hit = {}
        if cache is not None:
            for m in g.models:
                e = cache.load(digests[i][m.model])
                if e is not None:
                    hit[m.model] = e
        cached.append(hit)
        missing = [m for m in g.models if m.model not in hit]
        if missing:
            subs.append((i, replace(g, models=missing)))
    n_models = sum(len(g.models) for g in groups)
    n_todo = sum(len(s.models) for _, s in subs)
    workers = int(getattr(executor, "workers", 1) or 1)
    new: list[tuple[int, dict[str, Any]]] = []
    with _progress(progress, console) as bar:

        def say(msg: str) -> None:
            if progress:
                bar.console.print(msg)

        if n_todo < n_models:
            say(
                f"[bold]evaluation[/bold] {n_models - n_todo} of {n_models} model x split "
                f"statistics read from {CACHE_DIR}/"
            )
        if not subs:
            pass
        elif executor is not None and hasattr(executor, "score_groups"):
            say(
                f"[bold]bootstrap[/bold] {n_todo} model x split statistics x "
                f"{groups[0].n_boot} resamples ({executor.name})"
            )
            raws = executor.score_groups([s for _, s in subs])  # e.g. Ray: blocks fanned out
            new = [(i, finish_group(s, r)) for (i, s), r in zip(subs, raws, strict=True)]
        elif executor is not None and type(executor).__name__ == "LocalExecutor" and workers > 1:
            # one job per model: even load on the workers, progress as models finish
            jobs = [(i, replace(s, models=[m])) for i, s in subs for m in s.models]
            t = bar.add_task(
                f"{len(jobs)} models x splits ({workers} workers)",
                total=sum(max(j.n_boot, 1) for _, j in jobs),
            )
            outs = _score_pool([j for _, j in jobs], workers, bar, t)
            new = [(i, o) for (i, _), o in zip(jobs, outs, strict=True)]
        elif executor is not None and type(executor).__name__ != "LocalExecutor":
            say(f"[bold]bootstrap[/bold] {len(subs)} task x split groups ({executor.name})")
            outs = executor.map(score_group, [s for _, s in subs])
            new = [(i, o) for (i, _), o in zip(subs, outs, strict=True)]
        else:
            for i, s in subs:
                t = bar.add_task(
                    f"{s.task}/{s.split} ({len(s.models)} models)", total=max(s.n_boot, 1)
                )

                def advance(b: int, t: Any = t) -> None:
                    bar.advance(t, b)

                new.append((i, score_group(s, advance)))
                bar.update(t, completed=max(s.n_boot, 1))
    for i, score in new:
        for model in score["point"]:
            entry = _split_entry(score, model)
            cached[i][model] = entry
            if cache is not None:
                cache.save(digests[i][model], entry)
    if cache is not None:
        cache.prune({d for ds in digests for d in ds.values()})
    out = []
    for g, hit in zip(groups, cached, strict=True):
        models = [m.model for m in g.models]
        out.append(
            {
                "point": {m: hit[m]["point"] for m in models},
                "boot": {m: hit[m]["boot"] for m in models},
                "infl": {m: hit[m]["infl"] for m in models},
                "p_cal": {m: hit[m]["p_cal"] for m in models},
            }
        )
    return out


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

    Statistics of unchanged models come from `RUN_DIR/eval_cache/` (`score_groups`)."""
    from survfuse.experiment.rundir import write_parquet

    groups = build_groups(cfg, rd, specs)
    scores = score_groups(groups, rd, executor=executor, progress=progress, console=console)
    table = assemble_table(cfg, groups, scores)
    write_parquet(rd.metrics, table)
    tmp_csv = rd.metrics_csv.with_name(".metrics.csv.tmp")
    table.write_csv(tmp_csv)
    tmp_csv.replace(rd.metrics_csv)
    return table
