"""Scoring one task x split: every model's statistics, seeds averaged, on shared resamples.

`GroupData` holds what one task x split needs (outcomes, subjects, training outcomes for the
IPCW, every model's per-seed predictions); `make_scorers` binds each configured metric to one
prediction; `score_group` gives per model the point estimates and the resampled statistics
(`score_blocks`, on the resamples of `group_weights`, shared by every model) and what needs no
resampling (`finish_group`: the seed-averaged IJ influence per subject, the Wald test of perfect
calibration). `evaluate` assembles the run's table from these.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from survfuse.experiment.grid import CellSpec
from survfuse.metrics import Resampler, make_scorer
from survfuse.metrics import _kernels as K
from survfuse.metrics.calibration import calibration_table
from survfuse.metrics.calibration_ci import calibration_scorers, calibration_test
from survfuse.metrics.engine import nanmean_rows, score_on_blocks
from survfuse.metrics.km import kaplan_meier

__all__ = [
    "CALIBRATION_KEYS",
    "CalibrationScorer",
    "GroupData",
    "MetricKey",
    "ModelPreds",
    "finish_group",
    "group_seed",
    "group_weights",
    "make_scorers",
    "null_model_scores",
    "score_blocks",
    "score_group",
]

# The statistics the config's `calibration` metric stands for (`metrics.calibration_ci`).
CALIBRATION_KEYS = ("cal_slope", "cal_intercept", "ici", "e50")

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
    """Make one scorer (`point()`, `boot(w [B, n])`, `influence()`) per metric x horizon.

    For one prediction and every configured metric; `calibration` gives cal_slope, cal_intercept,
    ici and e50 at the calibration horizon (ici and e50 share one fit, `params(w)` its
    parameters).

    `surv` [n, len(g.times)] holds S(t) at `g.times`. Metrics undefined on these data give NaN.
    """
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


def null_model_scores(g: GroupData, metrics: tuple[str, ...] = ("ibs",)) -> dict[MetricKey, float]:
    """Return point estimates of the Kaplan-Meier null model on one task x split.

    Every subject gets the training split's KM survival curve S_0(t) and the same risk, scored by
    the same scorers as the models (`make_scorers`), so its IBS is the benchmark a model must beat
    (C and AUC are 0.5 by construction). Not in metrics.parquet; the report shows it beside each
    model.
    """
    km = kaplan_meier(g.train_time, g.train_event)
    n = g.time.shape[0]
    surv = np.tile(km(g.times), (n, 1))
    only = replace(g, metrics=[m for m in g.metrics if m in metrics], models=[])
    scorers = make_scorers(only, np.zeros(n), surv)
    return {k: float(sc.point()) for k, sc in scorers.items()}


# ----------------------------------------------------------------------------- statistics
def group_seed(seed: int, task: str, split: str) -> int:
    """Return the resampling seed of one task x split: shared by every model (paired resamples)."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{task}|{split}".encode())) % (2**32)


def _smooth_key(per_seed: list[dict[MetricKey, Any]]) -> MetricKey | None:
    """Return the key of a model's ICI scorer (the one with `params`), if every seed has one."""
    for k in per_seed[0]:
        if k[0] == "ici" and all(hasattr(p[k], "params") for p in per_seed):
            return k
    return None


def group_weights(g: GroupData) -> Iterable[NDArray[np.float64]]:
    """Return the resample weight blocks [<=128, n] of a task x split (`Resampler.weights`)."""
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
                k: float(nanmean_rows(np.array([[sc[k].point()] for sc in per_seed]))[0])
                for k in per_seed[0]
            }
            for model, per_seed in scorers.items()
        }
    smooth = {model: _smooth_key(per_seed) for model, per_seed in scorers.items()}
    cal: dict[str, list[list[NDArray[np.float64]]]] = {
        model: [[] for _ in per_seed] for model, per_seed in scorers.items()
    }

    def after_block(w: NDArray[np.float64]) -> None:
        # the smooth-calibration parameters on the same resamples (for the calibration test)
        for model, per_seed in scorers.items():
            key = smooth[model]
            if key is not None:
                for s, sc in enumerate(per_seed):
                    cal[model][s].append(sc[key].params(w))
        if on_block is not None:
            on_block(w.shape[0])

    boot = score_on_blocks(scorers, blocks, on_block=after_block)
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
    """Add what needs no resampling to `score_blocks`' output (points when missing).

    Per model and key the seed-averaged IJ influence per subject ("infl", None without an
    influence function) and the p of the Wald test of perfect calibration of all seeds together
    ("p_cal": {horizon: p}, `metrics.calibration_ci.calibration_test`).
    """
    if scorers is None:
        scorers = {
            m.model: [make_scorers(g, m.risk[s], m.surv[s]) for s in range(len(m.seeds))]
            for m in g.models
        }
    res = Resampler.build(g.time.shape[0], g.subject_id)
    point = raw.get("point") or {
        model: {
            k: float(nanmean_rows(np.array([[sc[k].point()] for sc in per_seed]))[0])
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
    """Score every model of one task x split.

    Point estimates, resampled statistics, IJ influences and calibration tests
    (`score_blocks` on `group_weights`, then `finish_group`).

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
