"""The report's glossary: every quantity and mark the report uses, defined once.

The run's own settings (horizons, truncation time, interval level, resamples) are filled in.
"""

from __future__ import annotations

import html

from survfuse.report.context import ReportContext, Section
from survfuse.report.risk_groups import MIN_AT_RISK
from survfuse.report.tables import md_escape

__all__ = ["glossary_section"]


def _entries(ctx: ReportContext) -> list[tuple[str, str]]:
    ev = ctx.eval_config
    tau = max(ev.horizons)
    hs = ", ".join(f"{h:g}" for h in ev.horizons)
    level = 100 * (1 - ev.alpha)
    return [
        ("risk", "The model's output per patient: a score where higher means worse (shorter "
         "survival), e.g. a Cox model's linear predictor. It is not a probability; the "
         "probability of an event by day t is the predicted risk at t = 1 - S(t), from the "
         "model's survival curve S(t)."),
        ("Harrell C", "Fraction of comparable pairs (the shorter time is an observed event) in "
         "which the patient with the event has the higher risk; tied risks count 1/2. 0.5 = "
         "chance, 1 = perfect ordering."),
        ("Uno C", "Concordance with inverse-probability-of-censoring weights 1/G(T_i)^2 on "
         "pairs anchored at an event before tau, G = Kaplan-Meier of the censoring times of "
         f"the training split; truncated at tau = {tau:g} days (the last horizon). Less "
         "dependent on the censoring pattern than Harrell's C (Uno et al. 2011)."),
        ("td-AUC", "Cumulative/dynamic AUC at a horizon t: cases = events by t, weighted by "
         "1/G(T_i); controls = event-free after t. Reported at "
         f"{hs} days; the 'Performance over time' section draws it as a curve."),
        ("Brier score, IBS", "BS(t) = IPCW mean squared error of the predicted S(t) against "
         "the observed status at t (Graf et al. 1999, weights from the training censoring "
         f"Kaplan-Meier). IBS = BS integrated (trapezoid) over the stored time grid (the "
         f"horizons and {ev.ibs_points} equally spaced times up to {tau:g} days), divided by "
         "the length of that range; lower is better."),
        ("KM null model", "Every patient gets the same survival curve, the Kaplan-Meier of the "
         "training split: C and AUC 0.5, and the IBS a model must beat to be better than "
         "ignoring every covariate."),
        ("calibration slope, intercept", f"At {ev.cal_horizon:g} days, from a Cox model of the "
         "outcomes on log(-log S(t)): slope 1 = calibrated, below 1 = predicted risks too "
         "extreme; intercept (calibration-in-the-large) 0 = calibrated, above 0 = risk "
         "under-predicted. A model is flagged (⚑) on a test split when its slope is outside "
         "[0.8, 1.2] or its IBS is above the KM null model's."),
        ("ICI, E50", "Integrated calibration index and median absolute error: mean and median "
         "|observed - predicted| risk at the calibration horizon, the observed risk smoothed "
         "by a Cox model on a restricted cubic spline of log(-log S) (Austin et al. 2020). "
         "These are the calibration errors of the report; no binned error is reported."),
        ("intervals", f"{level:.0f}% percentile intervals over {ev.bootstrap} subject-level "
         "bootstrap resamples (a subject's rows are resampled together), the same resamples "
         "for every model of a task and split; statistics averaged over seeds."),
        ("Δ, p, Holm", "Δ = model minus its task's reference model on the same resamples. p: "
         "two-sided test of Δ = 0 (test named beside it). Holm: p adjusted for the "
         "pre-specified family of comparisons (test splits only), with its size m; '–' = not "
         "in the family (e.g. validation, where the reference is chosen)."),
        ("*", "Marks each task's reference model: the best unimodal model on validation "
         "Harrell C (unless the config names another). 'best fused': the fused model with "
         "the highest validation Harrell C."),
        ("risk groups", "Low / middle / high predicted risk, cut at the tertiles of the "
         "model's predictions on the development data (train + validation); HR = hazard "
         "ratio against the low group (Cox, Efron ties), log-rank p for equal survival "
         f"across groups; curves stop when fewer than {MIN_AT_RISK} remain at risk."),
        ("median follow-up", "Median of the reverse Kaplan-Meier (censoring as the event)."),
        ("splits", "train / validation / internal test: development sites, split per "
         "subject; external test: every subject of the held-out sites."),
    ]  # fmt: skip


def _md_key(key: str) -> str:
    return md_escape(key).replace("*", "\\*")


def glossary_section(ctx: ReportContext) -> Section:
    """Build the "Glossary" section."""
    items = _entries(ctx)
    body = "<dl>" + "".join(
        f"<dt><b>{html.escape(k)}</b></dt><dd>{html.escape(v)}</dd>" for k, v in items
    )
    return Section(
        "Glossary",
        body + "</dl>",
        "\n".join(f"- **{_md_key(k)}**: {v}" for k, v in items) + "\n",
    )
