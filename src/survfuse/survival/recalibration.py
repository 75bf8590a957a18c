"""Recalibration of survival predictions on a labelled sample of a new site.

Any model's predictions are put on the log cumulative hazard scale at a horizon h,
cll_i = log(-log S_i(h)), and a Cox model with that one covariate is refitted on the sample:

    H_i'(t) = H0'(t) exp(b cll_i)

- `method="baseline"`: b = 1 (cll is an offset); only the baseline cumulative hazard H0' is
  re-estimated (Breslow). This fixes calibration-in-the-large (the intercept) and keeps the
  model's ranking and spread.
- `method="baseline+slope"`: b is the Cox coefficient of cll on the sample (the calibration
  slope) and H0' the Breslow baseline of b cll; this also shrinks (b < 1) or stretches (b > 1)
  the predicted spread.

On the sample itself the recalibrated predictions have calibration intercept 0 (both methods)
and slope 1 (`baseline+slope`) by construction; what they achieve on other patients of the
site must be measured on patients not in the sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from survfuse.interop import check_survival
from survfuse.metrics.calibration import cox_fit
from survfuse.registry import look_up_option
from survfuse.survival.baseline import StepFunction, breslow_baseline

__all__ = [
    "RECALIBRATION_METHODS",
    "SLOPE_BOUNDS",
    "Recalibration",
    "fit_recalibration",
    "log_cumhaz_at",
    "risk_scale",
]

RECALIBRATION_METHODS = ("baseline", "baseline+slope")
_EPS = 1e-10
#: bounds of `risk_scale`: the floor keeps ranks when the sample shows no signal (s <= 0); the
#: cap guards a fit that diverged (monotone likelihood on a small sample)
SLOPE_BOUNDS = (0.05, 100.0)


def risk_scale(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> float | None:
    """Return the calibration slope s of a Cox model's risk [N] on a labelled sample, clipped.

    s = the coefficient of a one-covariate Cox model of (time, event) on the risk (the
    calibration slope's own estimator, `metrics.calibration.cox_fit`); s * risk then has slope 1
    on the sample and the same ranks. None when the sample has no event, the risk is constant or
    the fit is not finite; otherwise clipped to `SLOPE_BOUNDS`. What `FusionSurvivalModel`
    (`validation_slope`) applies to its risk on the validation split after training.
    """
    t, e = check_survival(time, event)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    if not e.any() or np.ptp(r) <= 0:
        return None
    s = float(cox_fit(t, e, r).coef[0])
    if not np.isfinite(s):
        return None
    return min(max(s, SLOPE_BOUNDS[0]), SLOPE_BOUNDS[1])


def log_cumhaz_at(surv_h: ArrayLike) -> NDArray[np.float64]:
    """Return cll [N] = log(-log S(h)) of predicted survival probabilities S(h) [N].

    S(h) is clipped to [1e-10, 1 - 1e-10] so that 0 and 1 stay finite.
    """
    s = np.asarray(surv_h, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(s) | (s < 0) | (s > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"predicted survival must lie in [0, 1]; row {i} has {s[i]}")
    out: NDArray[np.float64] = np.log(-np.log(np.clip(s, _EPS, 1.0 - _EPS)))
    return out


@dataclass(frozen=True)
class Recalibration:
    """A fitted recalibration: H'(t | i) = H0'(t) exp(slope * cll_i), cll_i = log(-log S_i(h)).

    `intercept` = log H0'(h): the recalibrated cll at the horizon is intercept + slope * cll.
    """

    method: str
    horizon: float
    slope: float
    baseline: StepFunction
    n_subjects: int
    n_events: int

    @property
    def intercept(self) -> float:
        return float(np.log(max(float(self.baseline(self.horizon)), 1e-300)))

    def survival(self, surv_h: ArrayLike, times: ArrayLike) -> NDArray[np.float64]:
        """Recalibrated S'(t) [N, len(times)] of predictions S(h) [N]."""
        x = self.slope * log_cumhaz_at(surv_h)
        h0 = self.baseline(np.asarray(times, dtype=np.float64).reshape(-1))
        out: NDArray[np.float64] = np.exp(-h0[None, :] * np.exp(x)[:, None])
        return out

    def risk(self, surv_h: ArrayLike) -> NDArray[np.float64]:
        """Recalibrated log cumulative hazard at the horizon [N] (higher = worse)."""
        out: NDArray[np.float64] = self.intercept + self.slope * log_cumhaz_at(surv_h)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "horizon": self.horizon,
            "slope": self.slope,
            "intercept": self.intercept,
            "n_subjects": self.n_subjects,
            "n_events": self.n_events,
            "baseline_times": self.baseline.x.tolist(),
            "baseline_cumhaz": self.baseline.y.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recalibration:
        base = StepFunction(
            np.asarray(d["baseline_times"], dtype=np.float64),
            np.asarray(d["baseline_cumhaz"], dtype=np.float64),
        )
        return cls(
            method=str(d["method"]),
            horizon=float(d["horizon"]),
            slope=float(d["slope"]),
            baseline=base,
            n_subjects=int(d["n_subjects"]),
            n_events=int(d["n_events"]),
        )


def fit_recalibration(
    time: ArrayLike,
    event: ArrayLike,
    surv_h: ArrayLike,
    horizon: float,
    *,
    method: str = "baseline",
) -> Recalibration:
    """Fit the recalibration of predictions S(h) [N] on outcomes (time [N], event [N] bool).

    See the module docstring for the two methods. Raises ValueError when the sample has no
    event or the horizon lies beyond its follow-up.
    """
    method = look_up_option(method, RECALIBRATION_METHODS, kind="recalibration method")
    t, e = check_survival(time, event)
    cll = log_cumhaz_at(surv_h)
    if cll.shape[0] != t.shape[0]:
        raise ValueError(f"length mismatch: {cll.shape[0]} predictions for {t.shape[0]} outcomes")
    if not e.any():
        raise ValueError("recalibration needs a sample with at least one event")
    h = float(horizon)
    if not (np.isfinite(h) and 0 < h <= t.max()):
        raise ValueError(f"horizon {horizon} is outside the sample's follow-up (0, {t.max():g}]")
    slope = 1.0 if method == "baseline" else float(cox_fit(t, e, cll[:, None]).coef[0])
    # Breslow with the offset: exact in-sample calibration-in-the-large at every time.
    base = breslow_baseline(t, e, slope * cll)  # uncentred: H0' pairs with slope * cll
    return Recalibration(method, h, slope, base, int(t.shape[0]), int(e.sum()))
