"""Calibration statistics on weighted (resampled) data, and their bootstrap intervals.

A bootstrap resample is a weight vector (`bootstrap.Resampler`), so each statistic below is a
*scorer*: `point()` on the data and `boot(W)` for every row of a weight matrix W [B, N], with
the weighted Cox fits vectorised over the B resamples (Newton from the full-data fit).

- `CalibrationSlope`: b of the Cox model h(t | i) = h0(t) exp(b cll_i), cll_i = log(-log S_i(h))
  (1 = perfect; < 1: predictions too extreme). Smooth in the data: its percentile interval is
  valid.
- `CalibrationIntercept`: a = log H0(h) of the Cox model with the slope fixed at 1 (offset
  cll_i): H0(h) = sum_{events t_i <= h} w_i / sum_{T_j >= t_i} w_j H_j(h), H_j(h) = -log S_j(h)
  (0 = calibrated in the large; > 0: risk under-predicted). Smooth: percentile interval.
- `SmoothCalibration`: ICI = mean_i |obs_i - pred_i| and E50 = median_i |obs_i - pred_i| of
  Austin, Harrell & van Klaveren (2020) (`calibration.calibration`), spline knots fixed at the
  full-data quantiles. An absolute error is >= 0 and biased upward, more so under resampling:
  for a calibrated model every replicate lies above the truth 0 and the percentile interval can
  lie entirely above the estimate. `error_interval` keeps the percentile interval but sets its
  lower end to 0 when the Wald test of perfect calibration (`calibration_test`, on the
  parameters of the smooth model, which are smooth in the data) does not reject. Coverage on
  simulated calibrated and miscalibrated predictions: tests/test_metrics_calibration_ci.py and
  docs/benchmarks.md (`bias_corrected`, the bootstrap bias correction, covers worse there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from survfuse.interop import check_survival
from survfuse.metrics._cal_kernels import cox_newton
from survfuse.metrics.bootstrap import Resampler, _check_level, interval
from survfuse.metrics.calibration import (
    _EPS,
    _check_horizon,
    _check_prob,
    calibration,
    cox_fit,
    rcs_basis,
)
from survfuse.metrics.result import MetricResult

__all__ = [
    "CALIBRATION_STATISTICS",
    "CalibrationIntercept",
    "CalibrationIntervals",
    "CalibrationSlope",
    "SmoothCalibration",
    "bias_corrected",
    "calibration_intervals",
    "calibration_scorers",
    "calibration_test",
    "error_interval",
    "weighted_cox",
]

# statistic -> its interval method (`calibration_intervals`)
CALIBRATION_STATISTICS = {
    "cal_slope": "percentile",
    "cal_intercept": "percentile",
    "ici": "percentile_calibration_test",
    "e50": "percentile_calibration_test",
}
_KNOT_Q = {3: [0.10, 0.50, 0.90], 4: [0.05, 0.35, 0.65, 0.95], 5: [0.05, 0.275, 0.5, 0.725, 0.95]}


def bias_corrected(
    estimate: float, boots: NDArray[np.float64], level: float, *, lower_bound: float | None = 0.0
) -> tuple[float, float, float]:
    """Bootstrap bias correction (Efron & Tibshirani 1993, ch. 10 and 13.4).

    estimate_bc = 2 theta_hat - mean(theta*); interval = the basic bootstrap interval
    [2 theta_hat - q_{1-alpha/2}, 2 theta_hat - q_{alpha/2}] of the pivot theta_hat - theta,
    both clipped at `lower_bound` (0 for an absolute error). The interval contains estimate_bc
    whenever mean(theta*) lies between the two quantiles of theta*.
    Returns (estimate_bc, lower, upper); NaN when fewer than two finite replicates.
    """
    b = boots[np.isfinite(boots)]
    if b.shape[0] < 2 or not np.isfinite(estimate):
        return float("nan"), float("nan"), float("nan")
    alpha = 1.0 - level
    q_lo, q_hi = np.quantile(b, [alpha / 2, 1 - alpha / 2])
    est, lo, hi = 2 * estimate - float(b.mean()), 2 * estimate - q_hi, 2 * estimate - q_lo
    if lower_bound is not None:
        est, lo, hi = (max(lower_bound, v) for v in (est, lo, hi))
    return float(est), float(lo), float(hi)


class _RiskSets:
    """Data sorted by time once; `at_risk(v)` = sum of v over T_j >= T_i for each row i."""

    def __init__(self, time: NDArray[np.float64], event: NDArray[np.bool_]) -> None:
        n = time.shape[0]
        self.order = np.argsort(time, kind="stable")
        self.time = np.ascontiguousarray(time[self.order])
        self.event = np.ascontiguousarray(event[self.order])
        new = np.r_[True, self.time[1:] != self.time[:-1]]
        self.first = np.maximum.accumulate(np.where(new, np.arange(n), 0))

    def at_risk(self, v: NDArray[np.float64]) -> NDArray[np.float64]:
        rc = np.cumsum(v[:, ::-1], axis=1)[:, ::-1]
        return np.asarray(rc[:, self.first])


def weighted_cox(
    rs: _RiskSets,
    x: NDArray[np.float64],
    w: NDArray[np.float64],
    beta0: NDArray[np.float64],
    horizon: float,
    *,
    max_iter: int = 30,
    tol: float = 1e-9,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Breslow-ties Cox fits for every row of w [B, N] (time-sorted order), Newton from beta0.

    x [N, P] is time-sorted (and centred by the caller). Maximises
    sum_i w_i e_i (x_i b - log sum_{T_j >= T_i} w_j exp(x_j b)) per row (`_cal_kernels`).
    Returns beta [B, P] and log H0(horizon) [B] (Breslow, same centring); NaN where Newton
    did not converge.
    """
    beta, logh0 = cox_newton(
        rs.time,
        rs.event,
        np.ascontiguousarray(x, dtype=np.float64),
        np.ascontiguousarray(w, dtype=np.float64),
        np.asarray(beta0, dtype=np.float64),
        max_iter,
        tol,
        float(horizon),
    )
    return beta, logh0


def _breslow_at(
    rs: _RiskSets, w: NDArray[np.float64], rel: NDArray[np.float64], horizon: float
) -> NDArray[np.float64]:
    """H0(h) = sum_{events t_i <= h} w_i / sum_{T_j >= t_i} w_j rel_j, for every row of w."""
    s0 = rs.at_risk(w * rel)
    use = rs.event & (rs.time <= horizon)
    num = np.where(use, w, 0.0)
    return np.asarray(np.sum(np.divide(num, s0, out=np.zeros_like(s0), where=s0 > 0), axis=1))


class _Base:
    def __init__(
        self, time: ArrayLike, event: ArrayLike, surv_h: ArrayLike, horizon: float
    ) -> None:
        t, e = check_survival(time, event)
        self.s = _check_prob(surv_h, t.shape[0], "surv_t")
        self.horizon = _check_horizon(horizon, t)
        if not e.any():
            raise ValueError("calibration needs at least one event")
        self.t, self.e = t, e
        self.rs = _RiskSets(t, e)
        self.cll = np.log(-np.log(np.clip(self.s, _EPS, 1.0 - _EPS)))

    def _sorted(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.ascontiguousarray(np.asarray(w, dtype=np.float64)[:, self.rs.order])

    def influence(self) -> NDArray[np.float64] | None:
        return None


class CalibrationSlope(_Base):
    """Calibration slope (see the module docstring); `point()` = `calibration(...).slope`."""

    def __init__(
        self, time: ArrayLike, event: ArrayLike, surv_h: ArrayLike, horizon: float
    ) -> None:
        super().__init__(time, event, surv_h, horizon)
        self.est = float(cox_fit(self.t, self.e, self.cll[:, None]).coef[0])
        xs = self.cll[self.rs.order]
        self.x = (xs - xs.mean())[:, None]

    def point(self) -> float:
        return self.est

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        beta, _ = weighted_cox(self.rs, self.x, self._sorted(w), np.array([self.est]), self.horizon)
        return np.asarray(beta[:, 0])


class CalibrationIntercept(_Base):
    """Calibration intercept a = log H0(h) with the slope fixed at 1 (module docstring)."""

    def __init__(
        self, time: ArrayLike, event: ArrayLike, surv_h: ArrayLike, horizon: float
    ) -> None:
        super().__init__(time, event, surv_h, horizon)
        self.rel = np.exp(self.cll)[self.rs.order]  # H_j(h) = -log S_j(h)
        self.est = float(self.boot(np.ones((1, self.t.shape[0])))[0])

    def point(self) -> float:
        return self.est

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        h0 = _breslow_at(self.rs, self._sorted(w), self.rel, self.horizon)
        return np.log(h0, out=np.full_like(h0, np.nan), where=h0 > 0)


class SmoothCalibration(_Base):
    """ICI (`stat="ici"`) or E50 (`stat="e50"`) at the horizon on weighted data.

    The smooth observed probability is the Cox model on a restricted cubic spline basis x of
    cll (knots at the full-data quantiles, kept under resampling), centred:
    obs_i = 1 - exp(-exp(a + x_i b)) with a = log H0(h); delta_i = |obs_i - (1 - S_i(h))|;
    ICI = sum w delta / sum w, E50 = weighted median of delta. `point()` equals
    `calibration(...).ici` / `.e50`. `params(w)` gives phi = (b, a) per resample; perfect
    calibration is phi0 = (1, 0, ..., 0, mean cll). Scorers made by `with_stat` share one fit
    per weight block.
    """

    def __init__(
        self,
        time: ArrayLike,
        event: ArrayLike,
        surv_h: ArrayLike,
        horizon: float,
        *,
        stat: str = "ici",
        n_knots: int = 3,
    ) -> None:
        super().__init__(time, event, surv_h, horizon)
        if stat not in ("ici", "e50"):
            raise ValueError(f"stat must be 'ici' or 'e50', got {stat!r}")
        self.stat = stat
        res = calibration(self.t, self.e, self.s, self.horizon, n_knots=n_knots)
        self.est = {"ici": res.ici, "e50": res.e50}
        knots = np.quantile(self.cll, _KNOT_Q[n_knots])
        if np.unique(knots).shape[0] < n_knots:
            basis = self.cll[:, None]
        else:
            basis = rcs_basis(self.cll, knots)
        xs = basis[self.rs.order]
        self.x = np.ascontiguousarray(xs - xs.mean(axis=0))
        self.beta0 = cox_fit(self.t, self.e, basis).coef
        self.pred = (1.0 - self.s)[self.rs.order]
        self.phi0 = np.zeros(self.x.shape[1] + 1)
        self.phi0[0] = 1.0
        self.phi0[-1] = float(self.cll.mean())
        self._memo: dict[str, Any] = {"w": None}

    def with_stat(self, stat: str) -> SmoothCalibration:
        """Return the same fit, reporting another statistic (shares the per-block fit)."""
        if stat not in ("ici", "e50"):
            raise ValueError(f"stat must be 'ici' or 'e50', got {stat!r}")
        other = object.__new__(SmoothCalibration)
        other.__dict__.update(self.__dict__)
        other.stat = stat
        return other

    def point(self) -> float:
        return float(self.est[self.stat])

    def _fit(self, w: NDArray[np.float64]) -> dict[str, Any]:
        if self._memo["w"] is not w:
            ws = self._sorted(w)
            beta, logh0 = weighted_cox(self.rs, self.x, ws, self.beta0, self.horizon)
            lin = np.clip(logh0[:, None] + beta @ self.x.T, -50.0, 50.0)
            delta = np.abs(1.0 - np.exp(-np.exp(lin)) - self.pred)
            self._memo.update(w=w, ws=ws, delta=delta, phi=np.column_stack([beta, logh0]))
        return self._memo

    def params(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        """Return phi = (b, log H0(h)) [B, P + 1] of the smooth calibration model per resample."""
        return np.asarray(self._fit(w)["phi"])

    def boot(self, w: NDArray[np.float64]) -> NDArray[np.float64]:
        m = self._fit(w)
        ws, delta = m["ws"], m["delta"]
        if self.stat == "ici":
            tot = ws.sum(axis=1)
            return np.divide(
                np.sum(ws * delta, axis=1), tot, out=np.full(tot.shape, np.nan), where=tot > 0
            )
        return _weighted_median(delta, ws)


def _weighted_median(x: NDArray[np.float64], w: NDArray[np.float64]) -> NDArray[np.float64]:
    """Return the median of each row of x with integer weights w.

    Equal to np.median of the repeated values: the mean of the values at 0-based positions
    floor((n-1)/2) and ceil((n-1)/2), n = sum w.
    """
    o = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, o, axis=1)
    cw = np.cumsum(np.take_along_axis(w, o, axis=1), axis=1)
    n = cw[:, -1:]
    # the value at position q is the first sorted value whose cumulative weight exceeds q
    lo = np.minimum(np.sum(cw <= np.floor((n - 1) / 2), axis=1), x.shape[1] - 1)
    hi = np.minimum(np.sum(cw <= np.ceil((n - 1) / 2), axis=1), x.shape[1] - 1)
    rows = np.arange(x.shape[0])
    out = 0.5 * (xs[rows, lo] + xs[rows, hi])
    bad = (n[:, 0] <= 0) | ~np.all(np.isfinite(x), axis=1)
    return np.where(bad, np.nan, out)


def calibration_test(
    phi_hat: NDArray[np.float64], phi0: NDArray[np.float64], phi_boot: NDArray[np.float64]
) -> float:
    """Return the p-value of H0: perfect calibration.

    The Wald test W = d' S^-1 d ~ chi2(len(d)) with d = phi_hat - phi0 and S the bootstrap
    covariance of phi* [B, len(d)] (non-finite rows dropped). Several seeds: pass the concatenated
    parameters of all of them.
    """
    ok = np.all(np.isfinite(phi_boot), axis=1)
    pb = phi_boot[ok]
    d = np.asarray(phi_hat, dtype=np.float64) - np.asarray(phi0, dtype=np.float64)
    if pb.shape[0] <= d.shape[0] + 1 or not np.all(np.isfinite(d)):
        return float("nan")
    cov = np.atleast_2d(np.cov(pb.T))
    try:
        wald = float(d @ np.linalg.solve(cov, d))
    except np.linalg.LinAlgError:
        wald = float(d @ np.linalg.pinv(cov) @ d)
    return float(stats.chi2.sf(wald, d.shape[0]))


def error_interval(
    estimate: float, boots: NDArray[np.float64], level: float, p_calibrated: float
) -> tuple[float, float]:
    """Return the interval of an absolute calibration error (ICI, E50).

    The percentile interval of the replicates, with its lower end set to 0 when perfect calibration
    is not rejected at 1 - level (`calibration_test`). Why: the error is >= 0 and biased upward, so
    for a calibrated model every replicate lies above the truth 0 and the plain percentile interval
    never covers it; the test gives that case its nominal coverage (docs/benchmarks.md).
    """
    b = boots[np.isfinite(boots)]
    if b.shape[0] < 2 or not np.isfinite(estimate):
        return float("nan"), float("nan")
    alpha = 1.0 - level
    lo, hi = (float(v) for v in np.quantile(b, [alpha / 2, 1 - alpha / 2]))
    if not (p_calibrated <= alpha):  # NaN (no test) counts as not rejected
        lo = 0.0
    return lo, hi


def calibration_scorers(
    time: ArrayLike, event: ArrayLike, surv_h: ArrayLike, horizon: float, *, n_knots: int = 3
) -> dict[str, Any]:
    """One scorer per statistic of `CALIBRATION_STATISTICS` (ICI and E50 share one fit)."""
    smooth = SmoothCalibration(time, event, surv_h, horizon, n_knots=n_knots)
    return {
        "cal_slope": CalibrationSlope(time, event, surv_h, horizon),
        "cal_intercept": CalibrationIntercept(time, event, surv_h, horizon),
        "ici": smooth,
        "e50": smooth.with_stat("e50"),
    }


@dataclass(frozen=True)
class CalibrationIntervals:
    """Bootstrap intervals of the calibration statistics.

    `results`: statistic -> MetricResult; `p_calibrated`: the Wald test of perfect calibration
    (`calibration_test`) that sets the lower ends of ICI / E50.
    """

    results: dict[str, MetricResult]
    p_calibrated: float


def calibration_intervals(
    time: ArrayLike,
    event: ArrayLike,
    surv_h: ArrayLike,
    horizon: float,
    *,
    cluster: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_knots: int = 3,
) -> CalibrationIntervals:
    """Compute bootstrap intervals of the calibration slope, intercept, ICI and E50.

    Slope and intercept get percentile intervals, ICI / E50 `error_interval`; all on the same
    subject-level resamples.

    Parameters
    ----------
    time, event : array-like [N]
        Follow-up (days) and event indicator (True = observed).
    surv_h : array-like [N]
        Predicted S_i(horizon).
    horizon : float
        Time of the calibration.
    cluster : array-like [N], optional
        Subject ids: a resample draws subjects with replacement and keeps all their rows.
    n_boot, seed, level : int, int, float
        Number of resamples, their seed and the two-sided interval level.
    n_knots : {3, 4, 5}
        Spline knots of the smooth calibration model (see `calibration`).

    Returns
    -------
    CalibrationIntervals
        One MetricResult per statistic and the p-value of perfect calibration.
    """
    _check_level(level, n_boot)
    t, e = check_survival(time, event)
    scorers = calibration_scorers(t, e, surv_h, horizon, n_knots=n_knots)
    smooth: SmoothCalibration = scorers["ici"]
    res = Resampler.build(t.shape[0], cluster)
    boots: dict[str, list[NDArray[np.float64]]] = {k: [] for k in scorers}
    phis = []
    for w in res.weights(n_boot, seed):
        for k, sc in scorers.items():
            boots[k].append(sc.boot(w))
        phis.append(smooth.params(w))
    phi_hat = smooth.params(np.ones((1, t.shape[0])))[0]
    p_cal = calibration_test(phi_hat, smooth.phi0, np.concatenate(phis))
    out: dict[str, MetricResult] = {}
    for name, sc in scorers.items():
        b = np.concatenate(boots[name])
        fin = b[np.isfinite(b)]
        est = sc.point()
        if CALIBRATION_STATISTICS[name] == "percentile":
            lo, hi = interval(est, fin, level, "percentile")
        else:
            lo, hi = error_interval(est, fin, level, p_cal)
        out[name] = MetricResult(
            name,
            est,
            lo,
            hi,
            level,
            CALIBRATION_STATISTICS[name],
            int(fin.shape[0]),
            seed,
            res.n_clusters,
            int(e.sum()),
        )
    return CalibrationIntervals(out, p_cal)
