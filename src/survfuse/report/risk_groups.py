"""Risk groups: subjects of a test split cut into low / middle / high predicted risk.

The cuts are the tertiles of the development (train + validation) predictions; per group
Kaplan-Meier, hazard ratios against the low-risk group (Cox, Efron ties) and the log-rank test.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.stats import norm

from survfuse.metrics.logrank import logrank_test
from survfuse.survival.coxph import CoxPH

__all__ = [
    "GROUP_NAMES",
    "MIN_AT_RISK",
    "RiskGroups",
    "development_cuts",
    "group_hazard_ratios",
    "risk_groups",
]

GROUP_NAMES = ("low", "middle", "high")
#: A group's Kaplan-Meier curve is drawn only while at least this many subjects remain at risk:
#: past that, one event moves the curve by 10% or more (and the last one drops it to 0).
MIN_AT_RISK = 10


def development_cuts(dev_risk: NDArray[np.float64]) -> NDArray[np.float64]:
    """Return the two tertile cut-points of the development split's predicted risk."""
    finite = dev_risk[np.isfinite(dev_risk)]
    if finite.size == 0:
        raise ValueError("no finite development-split risk to cut into tertiles")
    return np.quantile(finite, [1 / 3, 2 / 3]).astype(np.float64)


def group_hazard_ratios(
    time: NDArray[np.float64],
    event: NDArray[np.bool_],
    group: NDArray[np.int64],
    n_groups: int = 3,
    alpha: float = 0.05,
) -> list[tuple[float, float, float]]:
    """Return (HR, lower, upper) of each group against group 0.

    From a Cox model on group indicators (Efron ties, Wald interval exp(beta +- z se)); group 0 is
    (1, 1, 1); NaN where a group is empty, has no event, or the fit does not converge.
    """
    nan = (math.nan, math.nan, math.nan)
    out: list[tuple[float, float, float]] = [(1.0, 1.0, 1.0)] + [nan] * (n_groups - 1)
    used = [g for g in range(1, n_groups) if event[group == g].any()]
    if not used or not event[group == 0].any():
        return out
    x = np.stack([(group == g).astype(np.float64) for g in used], axis=1)
    rows = np.isin(group, [0, *used])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit = CoxPH(ties="efron").fit(x[rows], time[rows], event[rows])
        except (ValueError, np.linalg.LinAlgError):
            return out
    if not getattr(fit, "converged_", True):
        return out
    z = float(norm.ppf(1 - alpha / 2))
    for j, g in enumerate(used):
        b, se = float(fit.coef_[j]), float(fit.se_[j])
        out[g] = (math.exp(b), math.exp(b - z * se), math.exp(b + z * se))
    return out


@dataclass
class RiskGroups:
    """One model's risk groups on one split."""

    title: str
    time: NDArray[np.float64]
    event: NDArray[np.bool_]
    group: NDArray[np.int64]  # 0 = low, 1 = middle, 2 = high
    cuts: NDArray[np.float64]
    hazard_ratios: list[tuple[float, float, float]]
    logrank_p: float

    def n(self, g: int) -> int:
        return int((self.group == g).sum())

    def events(self, g: int) -> int:
        return int(self.event[self.group == g].sum())


def risk_groups(
    title: str,
    time: NDArray[np.float64],
    event: NDArray[np.bool_],
    risk: NDArray[np.float64],
    dev_risk: NDArray[np.float64],
) -> RiskGroups:
    """Cut `risk` into groups at the development tertiles of `dev_risk`.

    A subject exactly at a cut goes to the lower group. Returns the groups, their hazard ratios and
    the log-rank p (NaN with one group).
    """
    cuts = development_cuts(dev_risk)
    group = np.digitize(risk, cuts, right=True).astype(np.int64)
    p = (
        logrank_test(time, event, group).p_value
        if np.unique(group).size > 1 and event.any()
        else math.nan
    )
    return RiskGroups(title, time, event, group, cuts, group_hazard_ratios(time, event, group), p)
