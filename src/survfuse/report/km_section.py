"""The report's "Risk groups" section.

Kaplan-Meier curves of low / middle / high predicted risk (cut at the development split's
tertiles) for each task's best fused model beside its reference model, with hazard ratios and
log-rank p on both test splits.
"""

from __future__ import annotations

import html

import numpy as np
import polars as pl

from survfuse.report import tables
from survfuse.report.context import ReportContext, Section, img
from survfuse.report.km_figure import km_risk_group_figure
from survfuse.report.risk_groups import GROUP_NAMES, MIN_AT_RISK, RiskGroups, risk_groups

__all__ = ["km_section", "risk_group_table"]

DEVELOPMENT = ("train", "validation")


def _fmt_hr(hr: tuple[float, float, float], g: int) -> str:
    return "1 (reference)" if g == 0 else tables.fmt_ci(*hr, digits=2)


def risk_group_table(groups: list[tuple[str, str, RiskGroups]]) -> pl.DataFrame:
    """Return the risk groups' display rows.

    Columns task, split, model, group (with its risk range), n, events, HR [CI] vs the low-risk
    group and the log-rank p (on the group's first row).
    """
    rows = []
    for task, split, rg in groups:
        lo, hi = rg.cuts
        ranges = (f"≤ {lo:.3g}", f"{lo:.3g} – {hi:.3g}", f"> {hi:.3g}")
        for g, name in enumerate(GROUP_NAMES):
            rows.append(
                {
                    "task": task,
                    "split": tables.SPLIT_LABELS.get(split, split),
                    "model": rg.title.split("\n")[0],
                    "risk group (risk)": f"{name} ({ranges[g]})",
                    "n": str(rg.n(g)),
                    "events": str(rg.events(g)),
                    "HR vs low [95% CI]": _fmt_hr(rg.hazard_ratios[g], g),
                    "log-rank p": tables.fmt_p(rg.logrank_p) if g == 0 else "",
                }
            )
    cols = ["task", "split", "model", "risk group (risk)", "n", "events"]
    cols += ["HR vs low [95% CI]", "log-rank p"]
    return pl.DataFrame(rows, schema=dict.fromkeys(cols, pl.Utf8))


def km_section(ctx: ReportContext) -> Section | None:
    """Build the "Risk groups" section, or None without a test split or a model to show."""
    split = ctx.split
    if not ctx.test_splits:
        return None
    shown = ctx.test_splits[-1]  # external when there is one
    dev = np.isin(split, DEVELOPMENT)
    figure_rows: list[list[RiskGroups]] = []
    listed: list[tuple[str, str, RiskGroups]] = []
    for task in ctx.tasks:
        time, event = ctx.outcome(task)
        row = []
        models = dict.fromkeys(m for m in (ctx.best_model(task), ctx.reference(task)) if m)
        for model in models:
            risk = ctx.seed_mean(model, task, "risk")
            if risk is None or not np.isfinite(risk[dev]).any():
                continue
            role = "reference" if model == ctx.reference(task) else "best fused"
            for s in ctx.test_splits:
                rows = split == s
                rg = risk_groups(
                    f"{tables.short_model(model)} ({role})\n{task} · {tables.SPLIT_LABELS[s]}",
                    time[rows],
                    event[rows],
                    risk[rows],
                    risk[dev],
                )
                listed.append((task, s, rg))
                if s == shown:
                    row.append(rg)
        if row:
            figure_rows.append(row)
    if not figure_rows:
        return None
    alpha = float(ctx.evaluation.get("alpha", 0.05))
    level = 100 * (1 - alpha)
    desc = (
        f"Kaplan-Meier curves of the {tables.SPLIT_LABELS[shown]} cohort in three groups of "
        "predicted risk (mean over seeds): the cut-points are the tertiles of the same model's "
        "predictions on the development data (train and validation), fixed before looking at "
        "the test cohort, so the groups need not be of equal size. Left: each task's best fused "
        "model (validation C); right: the reference model. Shaded: 95% pointwise band "
        "(Greenwood variance on the log(-log S) scale). Each curve stops at the last time with "
        f"at least {MIN_AT_RISK} subjects of its group at risk; past that a single event moves "
        "it by 10% or more and the last subject's event would drop it to 0. The numbers under "
        "each axis are the subjects still at risk. Table: every test split, hazard ratio "
        f"against the low-risk group (Cox model on group indicators, Efron ties, {level:.0f}% "
        "Wald interval) and the log-rank test of equal survival across the three groups."
    )
    t = risk_group_table(listed)
    return Section(
        "Risk groups",
        f"<p>{html.escape(desc)}</p>"
        + img(km_risk_group_figure(figure_rows), "Kaplan-Meier by risk group")
        + tables.to_html(t),
        desc + " (figure in report.html)\n\n" + tables.to_markdown(t),
    )
