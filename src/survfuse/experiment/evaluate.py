"""Score a finished grid: per task x split x model, seeds averaged, with bootstrap CIs and
paired comparisons against the reference (best unimodal) model, Holm-adjusted.

For each task and evaluation split (validation, internal_test, external_test):
- every model's per-seed predictions are scored with the configured metrics (Harrell and Uno C,
  td-AUC and IBS at the horizons, calibration at the calibration horizon); the model's estimate
  is the mean over its seeds;
- B subject-level resamples are drawn once per task x split (`numpy` Generator seeded from
  `evaluation.seed`, the task and the split) and shared by every model, so differences between
  models are paired; on each resample the statistic is again the mean over seeds;
- the CI is the percentile interval of the resampled statistic; the comparison against the
  reference is the percentile CI of the resampled difference, with the two-sided bootstrap
  p-value p = min(1, 2 min(#{d_b <= 0} + 1, #{d_b >= 0} + 1) / (B + 1)), Holm-adjusted over
  the models compared within each task x split x metric x horizon.

The reference is chosen per task on the validation split (never on a test split): the unimodal
model with the highest seed-averaged Harrell C (or the model of `evaluation.reference`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
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
    "HIGHER_IS_BETTER",
    "MODEL_SCHEMA",
    "CalibrationScorer",
    "GroupData",
    "evaluate_run",
    "make_scorers",
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

# Direction of each metric (for the report's wording of a difference).
HIGHER_IS_BETTER = {
    "harrell_c": True,
    "uno_c": True,
    "td_auc": True,
    "ibs": False,
    "calibration": False,
}

MetricKey = tuple[str, float | None]  # (metric, horizon or None)


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


class CalibrationScorer:
    """Calibration error at a horizon, on weighted (resampled) data.

    Subjects are cut once into `bins` quantile groups of predicted risk p_i = 1 - S_i(h) (on the
    full data, so the groups are fixed under resampling). With weights w (a resample):
    pred_g = sum_g w p / sum_g w, obs_g = 1 - weighted KM_g(h),
    error = sum_g (sum_g w) |pred_g - obs_g| / sum w.
    With w = 1 the groups, predicted and observed values are those of
    `survfuse.metrics.calibration_table`.
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


def make_scorers(
    g: GroupData, risk: NDArray[np.float64], surv: NDArray[np.float64]
) -> dict[MetricKey, Any]:
    """One scorer (`point()`, `boot(w [B, n])`) per configured metric x horizon for one prediction.

    `surv` [n, len(g.times)] holds S(t) at `g.times`. Metrics undefined on these data give NaN.
    """
    from survfuse.metrics import make_scorer

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
            h = g.cal_horizon
            sh = surv[:, col[float(h)]]
            out[(metric, h)] = build(lambda sh=sh, h=h: CalibrationScorer(t, e, sh, h, g.cal_bins))
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


def score_group(g: GroupData, on_block: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Point estimates and resampled statistics of every model of one task x split.

    Each model's statistic (point and on every resample) is the mean over its seeds.
    Returns {"point": {model: {key: value}}, "boot": {model: {key: [B] array}}}.
    """
    from survfuse.metrics import Resampler

    scorers = {
        m.model: [make_scorers(g, m.risk[s], m.surv[s]) for s in range(len(m.seeds))]
        for m in g.models
    }
    point: dict[str, dict[MetricKey, float]] = {}
    boots: dict[str, dict[MetricKey, NDArray[np.float64]]] = {}
    for model, per_seed in scorers.items():
        keys = list(per_seed[0])
        point[model] = {
            k: float(_nanmean_rows(np.array([[sc[k].point()] for sc in per_seed]))[0]) for k in keys
        }
        boots[model] = {k: np.full(g.n_boot, np.nan) for k in keys}
    if g.n_boot > 0:
        res = Resampler.build(g.time.shape[0], g.subject_id)
        start = 0
        for w in res.weights(g.n_boot, group_seed(g.seed, g.task, g.split)):
            b = w.shape[0]
            for model, per_seed in scorers.items():
                for k in per_seed[0]:
                    vals = np.stack([sc[k].boot(w) for sc in per_seed])
                    boots[model][k][start : start + b] = _nanmean_rows(vals)
            start += b
            if on_block is not None:
                on_block(b)
    return {"point": point, "boot": boots}


def _score_group_plain(g: GroupData) -> dict[str, Any]:
    return score_group(g)


# ----------------------------------------------------------------------------- assembling
def _load_group_models(
    rd: RunDir, specs: list[CellSpec], rows: NDArray[np.int64], times: NDArray[np.float64]
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
            p = pl.read_parquet(rd.cell(c.cell_id) / "predictions.parquet")
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
            models = _load_group_models(rd, task_specs, rows, times)
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


def _p_value(d: NDArray[np.float64]) -> float:
    from survfuse.metrics.compare import bootstrap_p_value

    d = d[np.isfinite(d)]
    return bootstrap_p_value(d) if d.size else math.nan


def assemble_table(
    cfg: ExperimentConfig, groups: list[GroupData], scores: list[dict[str, Any]]
) -> pl.DataFrame:
    """The long metrics table (one row per task x split x model x metric x horizon)."""
    from survfuse.metrics import holm

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
        block: list[dict[str, Any]] = []
        for m in g.models:
            for key, est in sc["point"][m.model].items():
                metric, horizon = key
                boot = sc["boot"][m.model][key]
                lo, hi = _ci(boot, est, alpha)
                row: dict[str, Any] = {
                    "task": g.task,
                    "split": g.split,
                    "model": m.model,
                    "strategy": m.spec.strategy,
                    "fusion": m.spec.strategy_name,
                    "ct_encoder": m.spec.ct_encoder,
                    "ehr_encoder": m.spec.ehr_encoder,
                    "head": m.spec.head,
                    "unimodal": len(m.spec.modalities) == 1,
                    "metric": metric,
                    "horizon": horizon,
                    "estimate": est,
                    "lower": lo,
                    "upper": hi,
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
                }
                if ref_boot is not None and m.model != ref and key in ref_boot:
                    ref_est = sc["point"][ref][key]
                    d = boot - ref_boot[key]
                    row["delta"] = est - ref_est
                    row["delta_lower"], row["delta_upper"] = _ci(d, row["delta"], alpha)
                    row["p_value"] = _p_value(d) if g.n_boot else math.nan
                block.append(row)
        # Holm over the models compared within each metric x horizon of this task x split.
        for key in {(r["metric"], r["horizon"]) for r in block}:
            fam = [r for r in block if (r["metric"], r["horizon"]) == key]
            adj = holm(np.array([r["p_value"] for r in fam], dtype=np.float64))
            for r, a in zip(fam, adj, strict=True):
                r["p_holm"] = float(a)
        rows.extend(block)
    schema = {
        **MODEL_SCHEMA,
        "unimodal": pl.Boolean,
        "metric": pl.Utf8,
        "horizon": pl.Float64,
        "estimate": pl.Float64,
        "lower": pl.Float64,
        "upper": pl.Float64,
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
        "p_holm": pl.Float64,
    }
    df = pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)
    # Rows in config order: tasks, splits, models (grid order), metrics, horizons.
    orders = {
        "task": {t: i for i, t in enumerate(cfg.tasks)},
        "split": {s: i for i, s in enumerate(EVAL_SPLITS)},
        "model": {
            m: i for i, m in enumerate(dict.fromkeys(m.model for g in groups for m in g.models))
        },
        "metric": {m: i for i, m in enumerate(cfg.evaluation.metrics)},
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
) -> pl.DataFrame:
    """Score every finished cell and write `metrics.parquet` + `metrics.csv`; return the table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from survfuse.experiment.rundir import write_parquet

    groups = build_groups(cfg, rd, specs)
    if executor is not None and hasattr(executor, "score_groups"):
        scores = executor.score_groups(groups)  # e.g. Ray: resample blocks fanned out
    elif executor is not None and (
        type(executor).__name__ != "LocalExecutor" or getattr(executor, "workers", 1) > 1
    ):
        # Task x split groups are independent: score them in the executor's workers (the
        # resamples depend only on the evaluation seed, task and split, so results are equal).
        if progress:
            from rich.console import Console

            Console(stderr=True).print(
                f"[bold]bootstrap[/bold] {len(groups)} task x split groups x "
                f"{cfg.evaluation.bootstrap} resamples ({executor.name} workers)"
            )
        scores = executor.map(_score_group_plain, groups)
    else:
        scores = []
        with Progress(
            TextColumn("[bold]bootstrap[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            disable=not progress,
        ) as bar:
            for g in groups:
                t = bar.add_task(f"{g.task}/{g.split}", total=max(g.n_boot, 1))

                def advance(b: int, t: Any = t) -> None:
                    bar.advance(t, b)

                scores.append(score_group(g, advance))
                bar.update(t, completed=max(g.n_boot, 1))
    table = assemble_table(cfg, groups, scores)
    write_parquet(rd.metrics, table)
    tmp_csv = rd.metrics_csv.with_name(".metrics.csv.tmp")
    table.write_csv(tmp_csv)
    tmp_csv.replace(rd.metrics_csv)
    return table
