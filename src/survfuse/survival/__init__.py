"""Survival losses, heads (registered in `survfuse.registry.HEADS`) and the linear Cox model."""

from __future__ import annotations

from survfuse.survival.baseline import StepFunction, breslow_baseline
from survfuse.survival.coxph import CoxPH, CoxPHConvergenceWarning, cox_log_likelihood
from survfuse.survival.heads import CoxHead, DiscreteTimeHead, SurvivalHead
from survfuse.survival.losses import bin_times, cox_partial_nll, discrete_time_nll, time_bin_cuts

__all__ = [
    "CoxHead",
    "CoxPH",
    "CoxPHConvergenceWarning",
    "DiscreteTimeHead",
    "StepFunction",
    "SurvivalHead",
    "bin_times",
    "breslow_baseline",
    "cox_log_likelihood",
    "cox_partial_nll",
    "discrete_time_nll",
    "time_bin_cuts",
]
