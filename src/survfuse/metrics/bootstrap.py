"""Vectorised subject-level bootstrap: resamples as weight matrices, percentile and BCa CIs.

A bootstrap resample of clusters (subjects) is a vector of multiplicities; every built-in metric
is evaluated directly on the weighted data by a kernel (no re-sorting, no copied arrays), so a
1,000-resample CI costs about as much as 1,000 Fenwick passes. The resamples depend only on
`seed` and the cluster structure, so every model scored with the same seed sees the same
resamples (what `compare` relies on).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from survfuse.interop import check_risk, check_survival
from survfuse.metrics import _kernels as K
from survfuse.metrics.auc import auc_parts, check_times, cumulative_dynamic_auc, risk_matrix
from survfuse.metrics.brier import brier_losses
from survfuse.metrics.concordance import (
    SortedSurvival,
    concordance_index,
    concordance_index_ipcw,
    uno_pair_weights,
)
from survfuse.metrics.engine import score_on_blocks
from survfuse.metrics.ipcw import CensoringModel
from survfuse.metrics.result import MetricResult, MetricUndefinedError
from survfuse.registry import look_up_option

__all__ = ["METRICS", "Resampler", "Scorer", "bootstrap", "interval", "make_scorer"]

METRICS = ("harrell_c", "uno_c", "td_auc", "mean_auc", "brier", "ibs")
CI_METHODS = ("percentile", "bca")
_CHUNK = 128  # resamples per weight block (fixed: results do not depend on memory layout)
MetricFn = Callable[[NDArray[np.float64], NDArray[np.bool_], NDArray[np.float64]], float]


class Scorer(Protocol):
    """A metric bound to one dataset and one model's predictions."""

    def point(self) -> float: ...

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        """Metric on weighted data for each row of w [B, N] -> [B] (NaN where undefined)."""
        ...

    def influence(self) -> NDArray[np.float64] | None:
        """IJ influence dtheta/dw_i [N] at w = 1, or None (then a jackknife is used)."""
        ...


def _ratio(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


class _PairScorer:
    """Harrell's C (u = 1) or Uno's C (u = [T < tau] / G(T)^2) on sorted data."""

    def __init__(self, s: SortedSurvival, u: NDArray[np.float64], est: float, infl: Any) -> None:
        self.s, self.u, self.est, self.infl = s, u, est, infl

    def point(self) -> float:
        return self.est

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        num, den = K.weighted_pair_sums(
            self.s.time,
            self.s.event,
            self.s.rank,
            self.s.n_ranks,
            self.u,
            self.s.order,
            np.ascontiguousarray(w, dtype=np.float64),
        )
        return _ratio(num, den)

    def influence(self) -> NDArray[np.float64] | None:
        return np.asarray(self.infl)


class _AUCScorer:
    """AUC at one horizon (td_auc) or the KM-weighted mean over several (mean_auc)."""

    def __init__(
        self,
        t: NDArray[np.float64],
        e: NDArray[np.bool_],
        pred: ArrayLike,
        times: NDArray[np.float64],
        cens: CensoringModel,
        mean: bool,
    ) -> None:
        self.t, self.e, self.times, self.mean = t, e, times, mean
        self.r = risk_matrix(pred, t.shape[0], times.shape[0], "prediction")
        self.case_g, ctrl = auc_parts(t, e, times, cens)
        self.ctrl = ctrl.astype(np.float64)
        self.orders = [np.argsort(self.r[:, k], kind="stable") for k in range(times.shape[0])]
        self.t_order = np.argsort(t, kind="stable")

    def _aucs(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        out = np.empty((w.shape[0], self.times.shape[0]))
        for k in range(self.times.shape[0]):
            rk = np.ascontiguousarray(self.r[:, k])
            num, den = K.weighted_auc(self.orders[k], rk, self.case_g[:, k], self.ctrl[:, k], w)
            out[:, k] = _ratio(num, den)
        return out

    def point(self) -> float:
        return float(self.boot(np.ones((1, self.t.shape[0])))[0])

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        auc = self._aucs(w)
        if not self.mean or self.times.shape[0] == 1:
            return np.asarray(auc[:, 0])
        ws = np.ascontiguousarray(w[:, self.t_order])
        s = K.weighted_km_at(self.t[self.t_order], self.e[self.t_order], ws, self.times)
        d = -np.diff(np.concatenate([np.ones((w.shape[0], 1)), s], axis=1), axis=1)
        return _ratio(np.sum(auc * d, axis=1), 1.0 - s[:, -1])

    def influence(self) -> NDArray[np.float64] | None:
        if self.mean:
            return None
        r, g, c = self.r[:, 0], self.case_g[:, 0], self.ctrl[:, 0] > 0
        cr = np.sort(r[c])
        a = np.searchsorted(cr, r, "left") + 0.5 * (
            np.searchsorted(cr, r, "right") - np.searchsorted(cr, r, "left")
        )  # controls below each subject
        o = np.argsort(r[g > 0], kind="stable")
        rr, gg = r[g > 0][o], np.r_[0.0, np.cumsum(g[g > 0][o])]
        lo, hi = np.searchsorted(rr, r, "left"), np.searchsorted(rr, r, "right")
        b = (gg[-1] - gg[hi]) + 0.5 * (gg[hi] - gg[lo])  # g-weighted cases above each subject
        n_c, g_sum = float(c.sum()), float(g.sum())
        num = float(np.sum(g * a))
        theta = num / (g_sum * n_c)
        d_num = g * a + c * b
        d_den = g * n_c + c * g_sum
        return np.asarray((d_num - theta * d_den) / (g_sum * n_c))


class _LinearScorer:
    """Mean of per-subject losses l [N] (Brier at one time, or the IBS integrand)."""

    def __init__(self, losses: NDArray[np.float64]) -> None:
        self.loss = losses

    def point(self) -> float:
        return float(self.loss.mean())

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        return _ratio(w @ self.loss, w.sum(axis=1))

    def influence(self) -> NDArray[np.float64] | None:
        return np.asarray((self.loss - self.loss.mean()) / self.loss.shape[0])


class _CallableScorer:
    """Any metric(time, event, risk) -> float, resampled by repeating rows (a Python loop)."""

    def __init__(self, fn: MetricFn, t: Any, e: Any, r: Any) -> None:
        self.fn, self.t, self.e, self.r = fn, t, e, r

    def point(self) -> float:
        return float(self.fn(self.t, self.e, self.r))

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        out = np.empty(w.shape[0])
        rows = np.arange(self.t.shape[0])
        for b in range(w.shape[0]):
            idx = np.repeat(rows, w[b].astype(np.int64))
            try:
                out[b] = self.fn(self.t[idx], self.e[idx], self.r[idx])
            except MetricUndefinedError:
                out[b] = np.nan
        return out

    def influence(self) -> NDArray[np.float64] | None:
        return None


def make_scorer(
    metric: str | MetricFn,
    time: ArrayLike,
    event: ArrayLike,
    prediction: ArrayLike,
    *,
    train_time: ArrayLike | None = None,
    train_event: ArrayLike | None = None,
    tau: float | None = None,
    times: ArrayLike | None = None,
) -> Scorer:
    """Bind a metric to data.

    prediction: risk [N] (harrell_c, uno_c, td_auc, mean_auc) or survival [N, K] on `times`
    (brier needs one time, ibs >= 2; td_auc/mean_auc accept both).
    """
    t, e = check_survival(time, event)
    if callable(metric):
        return _CallableScorer(metric, t, e, check_risk(prediction, t.shape[0]))
    name = look_up_option(metric, METRICS, kind="metric")
    if name == "harrell_c":
        r = check_risk(prediction, t.shape[0])
        res = concordance_index(t, e, r)
        s = SortedSurvival.build(t, e, r)
        return _PairScorer(s, s.event.astype(np.float64), res.estimate, res.influence)
    if train_time is None or train_event is None:
        raise ValueError(f"metric {name!r} needs train_time and train_event (for the IPCW)")
    if name == "uno_c":
        r = check_risk(prediction, t.shape[0])
        ures = concordance_index_ipcw(
            t, e, r, train_time=train_time, train_event=train_event, tau=tau
        )
        s = SortedSurvival.build(t, e, r)
        u, _ = uno_pair_weights(s, CensoringModel(train_time, train_event), tau)
        return _PairScorer(s, u, ures.estimate, ures.influence)
    if times is None:
        raise ValueError(f"metric {name!r} needs times")
    if name in ("td_auc", "mean_auc"):
        tt = check_times(times, t)
        if name == "td_auc" and tt.shape[0] != 1:
            raise ValueError("td_auc takes one horizon in times; use mean_auc for several")
        sc = _AUCScorer(
            t, e, prediction, tt, CensoringModel(train_time, train_event), name == "mean_auc"
        )
        if name == "mean_auc":  # same number as the public function
            ref = cumulative_dynamic_auc(
                t, e, prediction, tt, train_time=train_time, train_event=train_event
            ).mean_auc
            if not math.isclose(ref, sc.point(), rel_tol=1e-9, abs_tol=1e-12):
                raise AssertionError(f"mean_auc kernel {sc.point()} != {ref}")
        return sc
    loss, tt = brier_losses(t, e, prediction, times, train_time=train_time, train_event=train_event)
    if name == "brier":
        if tt.shape[0] != 1:
            raise ValueError("brier takes one time in times; use ibs for several")
        return _LinearScorer(loss[:, 0])
    if tt.shape[0] < 2:
        raise ValueError("ibs needs at least two times")
    return _LinearScorer(np.trapezoid(loss, tt, axis=1) / (tt[-1] - tt[0]))


@dataclass(frozen=True)
class Resampler:
    """Subject-level (cluster) bootstrap weights. cluster [N] ids (None: each row a subject)."""

    n_rows: int
    inverse: NDArray[np.int64]
    n_clusters: int

    @classmethod
    def build(cls, n_rows: int, cluster: ArrayLike | None) -> Resampler:
        if cluster is None:
            return cls(n_rows, np.arange(n_rows), n_rows)
        c = np.asarray(cluster)
        if c.shape != (n_rows,):
            raise ValueError(
                f"length mismatch: cluster has shape {c.shape}, time has {n_rows} values"
            )
        _, inv = np.unique(c, return_inverse=True)
        inv = inv.reshape(-1).astype(np.int64)
        return cls(n_rows, inv, int(inv.max()) + 1)

    def weights(self, n_boot: int, seed: int) -> Iterator[NDArray[np.float64]]:
        """Blocks of row weights [<=128, N]: cluster multiplicities of n_clusters draws."""
        rng = np.random.default_rng(seed)
        m = self.n_clusters
        done = 0
        while done < n_boot:
            b = min(_CHUNK, n_boot - done)
            idx = rng.integers(0, m, size=(b, m), dtype=np.int32)
            yield K.count_draws(idx, self.inverse, m)
            done += b

    def cluster_sum(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.bincount(self.inverse, weights=x, minlength=self.n_clusters).astype(np.float64)

    def jackknife_weights(self, n_groups: int, seed: int) -> Iterator[NDArray[np.float64]]:
        """Yield delete-one-cluster weight blocks, for the BCa acceleration without IJ formula.

        Delete-one-group of clusters when there are more than n_groups clusters.
        """
        m = self.n_clusters
        if m <= n_groups:
            group = np.arange(m)
        else:
            group = np.random.default_rng(seed).permutation(m) % n_groups
        g_rows = group[self.inverse]
        n_g = int(group.max()) + 1
        for start in range(0, n_g, _CHUNK):
            ids = np.arange(start, min(start + _CHUNK, n_g))
            yield (g_rows[None, :] != ids[:, None]).astype(np.float64)


def acceleration(u: NDArray[np.float64]) -> float:
    """BCa acceleration a = sum U^3 / (6 (sum U^2)^1.5) from per-cluster influence values."""
    ss = float(np.sum(u * u))
    return 0.0 if ss == 0 else float(np.sum(u**3) / (6.0 * ss**1.5))


def interval(
    estimate: float, boots: NDArray[np.float64], level: float, method: str, accel: float = 0.0
) -> tuple[float, float]:
    """Percentile or BCa interval from bootstrap replicates [B].

    BCa: z0 = Phi^-1(P*(theta* < theta_hat) + P*(theta* = theta_hat)/2),
    q = Phi(z0 + (z0 + z_a) / (1 - a (z0 + z_a))) for z_a = Phi^-1(alpha/2), Phi^-1(1-alpha/2).
    """
    alpha = 1.0 - level
    if method == "percentile":
        q = np.array([alpha / 2, 1 - alpha / 2])
    else:
        b = boots.shape[0]
        prop = (np.sum(boots < estimate) + 0.5 * np.sum(boots == estimate)) / b
        prop = min(max(prop, 0.5 / b), 1 - 0.5 / b)
        z0 = stats.norm.ppf(prop)
        za = stats.norm.ppf([alpha / 2, 1 - alpha / 2])
        q = stats.norm.cdf(z0 + (z0 + za) / (1.0 - accel * (z0 + za)))
    lo, hi = np.quantile(boots, q)
    return float(lo), float(hi)


def _check_level(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")


def run_boot(
    scorers: Mapping[str, Scorer], res: Resampler, n_boot: int, seed: int
) -> dict[str, NDArray[np.float64]]:
    """Return replicates [n_boot] of every scorer on the same resamples.

    The engine, `metrics.engine.score_on_blocks`, with one model and one seed.
    """
    return score_on_blocks({"model": [scorers]}, res.weights(n_boot, seed))["model"]


def influence_or_jackknife(sc: Scorer, res: Resampler, seed: int) -> NDArray[np.float64]:
    """Per-cluster influence values (IJ when available, else jackknife theta_bar - theta_(i))."""
    infl = sc.influence()
    if infl is not None:
        return res.cluster_sum(infl)
    jack = np.concatenate([sc.boot(w) for w in res.jackknife_weights(1000, seed)])
    jack = jack[np.isfinite(jack)]
    return np.asarray(jack.mean() - jack)


def _drop_nan(name: str, boots: NDArray[np.float64]) -> NDArray[np.float64]:
    ok = np.isfinite(boots)
    if not ok.all():
        warnings.warn(
            f"{name}: {int((~ok).sum())} of {boots.shape[0]} resamples left the metric "
            "undefined and were dropped",
            stacklevel=3,
        )
    if ok.sum() < 2:
        raise MetricUndefinedError(f"{name}: the metric is undefined in almost every resample")
    return boots[ok]


@dataclass(frozen=True)
class Scored:
    """Models scored on the same resamples.

    The metric's `name`, the checked CI `method`, the resampler, the number of events, and per
    model its scorer and replicates [n_boot].
    """

    name: str
    method: str
    level: float
    seed: int
    res: Resampler
    n_events: int
    scorers: dict[str, Scorer]
    boots: dict[str, NDArray[np.float64]]

    def summary(self, model: str, name: str, estimate: float, accel: float) -> MetricResult:
        """Return result `name`: `estimate` with the interval of `model`'s finite replicates."""
        b = _drop_nan(name, self.boots[model])
        lo, hi = interval(estimate, b, self.level, self.method, accel)
        n, k = self.res.n_clusters, int(b.shape[0])
        return MetricResult(
            name, estimate, lo, hi, self.level, self.method, k, self.seed, n, self.n_events
        )


def score_models(
    metric: str | MetricFn,
    time: ArrayLike,
    event: ArrayLike,
    predictions: Mapping[str, ArrayLike],
    cluster: ArrayLike | None,
    n_boot: int,
    seed: int,
    level: float,
    method: str,
    options: Mapping[str, Any],
) -> Scored:
    """Check the arguments of `bootstrap` / `compare`, then score every model.

    Every model (`make_scorer` with `options`) on the same `n_boot` subject-level resamples
    drawn from `seed`.
    """
    _check_level(level, n_boot)
    method = look_up_option(method, CI_METHODS, kind="CI method")
    t, e = check_survival(time, event)
    res = Resampler.build(t.shape[0], cluster)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    scorers = {k: make_scorer(metric, t, e, p, **options) for k, p in predictions.items()}
    boots = run_boot(scorers, res, n_boot, seed)
    return Scored(name, method, level, seed, res, int(e.sum()), scorers, boots)


@overload
def bootstrap(
    metric: str | MetricFn,
    time: ArrayLike,
    event: ArrayLike,
    prediction: Mapping[str, ArrayLike],
    *,
    cluster: ArrayLike | None = ...,
    n_boot: int = ...,
    seed: int = ...,
    level: float = ...,
    method: str = ...,
    train_time: ArrayLike | None = ...,
    train_event: ArrayLike | None = ...,
    tau: float | None = ...,
    times: ArrayLike | None = ...,
) -> list[MetricResult]: ...


@overload
def bootstrap(
    metric: str | MetricFn,
    time: ArrayLike,
    event: ArrayLike,
    prediction: ArrayLike,
    *,
    cluster: ArrayLike | None = ...,
    n_boot: int = ...,
    seed: int = ...,
    level: float = ...,
    method: str = ...,
    train_time: ArrayLike | None = ...,
    train_event: ArrayLike | None = ...,
    tau: float | None = ...,
    times: ArrayLike | None = ...,
) -> MetricResult: ...


def bootstrap(
    metric: str | MetricFn,
    time: ArrayLike,
    event: ArrayLike,
    prediction: ArrayLike | Mapping[str, ArrayLike],
    *,
    cluster: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
    train_time: ArrayLike | None = None,
    train_event: ArrayLike | None = None,
    tau: float | None = None,
    times: ArrayLike | None = None,
) -> MetricResult | list[MetricResult]:
    """Subject-level bootstrap CI of a metric; vectorised (resamples are weight vectors).

    metric: one of METRICS or a callable metric(time, event, risk) -> float (then resampled
    with a Python loop). prediction: one model's risk [N] / survival [N, K], or a dict
    name -> prediction (every model on the same resamples; result names "metric[model]").
    cluster [N]: subject ids; a resample draws n_subjects subjects with replacement and keeps
    all their rows. method: "percentile" or "bca" (acceleration from the IJ influence, or a
    delete-one-subject jackknife, grouped into 1,000 groups above 1,000 subjects). For IPCW
    metrics the censoring distribution (training data) is held fixed.
    """
    kw: dict[str, Any] = dict(train_time=train_time, train_event=train_event, tau=tau, times=times)
    single = not isinstance(prediction, Mapping)
    preds = prediction if isinstance(prediction, Mapping) else {"": prediction}
    s = score_models(metric, time, event, preds, cluster, n_boot, seed, level, method, kw)
    out = []
    for k, sc in s.scorers.items():
        name = s.name if single else f"{s.name}[{k}]"
        est = sc.point()
        acc = acceleration(influence_or_jackknife(sc, s.res, seed)) if s.method == "bca" else 0.0
        out.append(s.summary(k, name, est, acc))
    return out[0] if single else out
