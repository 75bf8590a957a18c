"""The report's "Calibration" section.

The calibration figure of each task's best fused and reference model on the test splits, every
model's slope, intercept and IBS beside the Kaplan-Meier null model's IBS, the flags, and the
smoothed calibration errors (ICI, E50).
"""

from __future__ import annotations

import html

import polars as pl

from survfuse.experiment.cell import surv_column
from survfuse.report import tables
from survfuse.report.calibration_figure import CalibrationSeries, calibration_figure
from survfuse.report.context import ReportContext, Section, img

__all__ = ["calibration_section"]


Panels = dict[tuple[str, str], list[CalibrationSeries]]


def _panels(ctx: ReportContext, horizon: float) -> tuple[Panels, dict[tuple[str, str], str]]:
    """Return the series per (task, split label) and the panel titles naming the models.

    Series are labelled by role (one colour per role across tasks).
    """
    col = surv_column(horizon)
    panels: Panels = {}
    titles: dict[tuple[str, str], str] = {}
    for task in ctx.tasks:
        time, event = ctx.outcome(task)
        ref = ctx.reference(task)
        names = []
        for model in dict.fromkeys(m for m in (ctx.best_model(task), ref) if m):
            surv = ctx.seed_mean(model, task, col)
            if surv is None:
                continue
            role = "reference" if model == ref else "best fused"
            names.append(f"{role}: {tables.short_model(model)}")
            for s in ctx.test_splits:
                rows = ctx.split == s
                panels.setdefault((task, tables.SPLIT_LABELS[s]), []).append(
                    CalibrationSeries(f"{role} model", time[rows], event[rows], surv[rows])
                )
        for s in ctx.test_splits:
            titles[(task, tables.SPLIT_LABELS[s])] = (
                f"{task} · {tables.SPLIT_LABELS[s]}\n" + "\n".join(names)
            )
    return panels, titles


def calibration_section(ctx: ReportContext) -> Section | None:
    """Build the "Calibration" section, or None when there is no curve or table to show."""
    horizon = ctx.eval_config.cal_horizon
    bins = ctx.eval_config.calibration_bins
    panels, titles = _panels(ctx, horizon)
    null = ctx.null_ibs
    summary = tables.calibration_summary(ctx.metrics, horizon, null)
    flags = tables.calibration_flags(ctx.metrics, horizon, null)
    parts_html, parts_md = [], []
    if flags.height:
        lo, hi = tables.SLOPE_RANGE
        note = (
            f"Flag (⚑ in the table): {flags.height} of {summary.height} model x test-split "
            f"results have a calibration slope outside [{lo:g}, {hi:g}] or an IBS worse than "
            "the Kaplan-Meier null model; their predicted risks should not be read as "
            "probabilities on that split without recalibration."
        )
        parts_html.append(f"<p><b>{html.escape(note)}</b></p>")
        parts_md.append(f"**{note}**\n\n" + tables.to_markdown(flags))
    elif summary.height:
        note = "No model is flagged: every slope lies in [0.8, 1.2] and every IBS beats the null."
        parts_html.append(f"<p>{html.escape(note)}</p>")
        parts_md.append(note + "\n")
    if summary.height:
        cap = f"Every model on the test splits (calibration at {horizon:g} days)"
        parts_html.append(tables.to_html(summary, caption=cap))
        parts_md.append(f"{cap}:\n\n" + tables.to_markdown(summary))
    for metric in ("ici", "e50"):
        if ctx.metrics.filter(pl.col("metric") == metric).height:
            t = tables.metric_table(ctx.metrics, metric, horizon)
            name = f"{tables.METRIC_LABELS[metric]} at {horizon:g} days"
            parts_html.append(f"<h3>{html.escape(name)}</h3>" + tables.to_html(t))
            parts_md.append(f"### {name}\n\n" + tables.to_markdown(t))
    if not panels and not parts_html:
        return None
    desc = (
        f"Calibration at {horizon:g} days, mean over seeds. Slope (1 = calibrated; below 1: "
        "predicted risks too extreme) and intercept (calibration-in-the-large: log of observed "
        "over predicted cumulative hazard with the slope fixed at 1; 0 = calibrated, above 0: "
        "risk under-predicted) of a Cox recalibration model on log(-log S(t)), with percentile "
        "bootstrap intervals. IBS beside the IBS of the Kaplan-Meier null model (everyone gets "
        "the training split's Kaplan-Meier curve; same grid and IPCW weights): a model above it "
        "predicts survival worse than ignoring every covariate. Flagged: slope outside "
        "[0.8, 1.2] or IBS above the null's."
    )
    fig_html = ""
    if panels:
        desc += (
            f" Figure: observed risk (1 - Kaplan-Meier, with its 95% log-log interval) against "
            f"mean predicted risk in {bins} quantile bins of predicted risk, for each task's "
            "best fused model and its reference; under each panel the histogram of predicted "
            "risks (where the bins lie)."
        )
        fig_html = img(calibration_figure(panels, horizon, bins, titles), "calibration")
    return Section(
        "Calibration",
        f"<p>{html.escape(desc)}</p>" + fig_html + "".join(parts_html),
        desc + " (figure in report.html)\n\n" + "\n".join(parts_md),
    )
