"""The report's "Performance over time" section.

td-AUC(t) and the Brier score BS(t) of each task's best fused and reference model on the test
splits, beside the Kaplan-Meier null model (AUC 0.5; BS of the training split's KM curve given
to everyone).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import NDArray

from survfuse.experiment.cell import surv_column
from survfuse.metrics.auc import cumulative_dynamic_auc
from survfuse.metrics.brier import brier_score
from survfuse.metrics.km import kaplan_meier
from survfuse.report import tables
from survfuse.report.context import ReportContext, Section, img
from survfuse.report.figures import WIDTH

__all__ = ["TimePanel", "auc_grid", "time_curves_figure", "time_curves_section"]

ROLE_STYLE = {
    "best fused": {"color": "#1f77b4", "ls": "-"},
    "reference": {"color": "#ff7f0e", "ls": "-"},
    "KM null": {"color": "#7f7f7f", "ls": "--"},
}
N_AUC_TIMES = 24
MIN_CASES = 10


@dataclass
class TimePanel:
    """One task x split: per role (t [K], AUC(t) [K]) and (t [K], BS(t) [K])."""

    title: str
    auc: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = field(default_factory=dict)
    brier: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = field(default_factory=dict)


def auc_grid(time: NDArray[np.float64], event: NDArray[np.bool_], t_max: float) -> np.ndarray:
    """Return `N_AUC_TIMES` times from the `MIN_CASES`-th event time to min(t_max, last follow-up).

    The end is exclusive; with fewer cases AUC(t) jumps by large steps.
    """
    if event.sum() < MIN_CASES:
        return np.empty(0)
    lo = float(np.sort(time[event])[MIN_CASES - 1])
    hi = min(float(t_max), float(np.nextafter(time.max(), -np.inf)))
    return np.linspace(lo, hi, N_AUC_TIMES) if hi > lo else np.empty(0)


def _panel(ctx: ReportContext, task: str, split: str, models: dict[str, str]) -> TimePanel:
    g = ctx.group_data(task, split)
    t, e = g.time, g.event
    kw = {"train_time": g.train_time, "train_event": g.train_event}
    panel = TimePanel(f"{task} · {tables.SPLIT_LABELS[split]}")
    grid = auc_grid(t, e, max(g.horizons))
    bs_times = g.times[(g.times >= t.min()) & (g.times < t.max())]
    rows = ctx.split == split
    for role, model in models.items():
        risk = ctx.seed_mean(model, task, "risk")
        if risk is not None and grid.size:
            panel.auc[role] = (grid, cumulative_dynamic_auc(t, e, risk[rows], grid, **kw).auc)
        surv = [ctx.seed_mean(model, task, surv_column(x)) for x in bs_times]
        if bs_times.size and all(s is not None for s in surv):
            s = np.stack([x[rows] for x in surv if x is not None], axis=1)
            panel.brier[role] = (bs_times, brier_score(t, e, s, bs_times, **kw))
    if bs_times.size:
        s0 = np.tile(kaplan_meier(g.train_time, g.train_event)(bs_times), (t.shape[0], 1))
        panel.brier["KM null"] = (bs_times, brier_score(t, e, s0, bs_times, **kw))
    if grid.size:
        panel.auc["KM null"] = (grid, np.full(grid.shape, 0.5))
    return panel


def time_curves_figure(panels: list[TimePanel]) -> Figure:
    """One row per task x split: td-AUC(t) left, Brier(t) right; the legend below."""
    n = max(len(panels), 1)
    fig, axes = plt.subplots(n, 2, figsize=(WIDTH, 2.7 * n + 0.6), squeeze=False)
    for (ax_auc, ax_bs), p in zip(axes, panels, strict=False):
        for role, (t, v) in p.auc.items():
            ax_auc.plot(t, v, lw=1.5, **ROLE_STYLE[role])  # type: ignore[arg-type]
        for role, (t, v) in p.brier.items():
            ax_bs.plot(t, v, lw=1.5, marker="o", ms=3, **ROLE_STYLE[role])  # type: ignore[arg-type]
        ax_auc.set_title(f"{p.title}: td-AUC(t)", fontsize=9)
        ax_bs.set_title(f"{p.title}: Brier score BS(t)", fontsize=9)
        ax_auc.set_ylabel("AUC(t) (higher is better)", fontsize=9)
        ax_bs.set_ylabel("BS(t) (lower is better)", fontsize=9)
        for ax in (ax_auc, ax_bs):
            ax.set_xlabel("days since prediction (t)", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], lw=1.5, label=r, **s) for r, s in ROLE_STYLE.items()]  # type: ignore[arg-type]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    return fig


def time_curves_section(ctx: ReportContext) -> Section | None:
    """Build the "Performance over time" section, or None when no panel has a curve."""
    panels, names = [], []
    for task in ctx.tasks:
        best, ref = ctx.best_model(task), ctx.reference(task)
        models = {r: m for r, m in (("best fused", best), ("reference", ref)) if m}
        if not models:
            continue
        names.append(
            f"{task}: " + "; ".join(f"{r} = {tables.short_model(m)}" for r, m in models.items())
        )
        panels += [_panel(ctx, task, s, models) for s in ctx.test_splits]
    panels = [p for p in panels if p.auc or p.brier]
    if not panels:
        return None
    desc = (
        "Discrimination and accuracy over time on the test splits (mean prediction over seeds). "
        "td-AUC(t): cumulative/dynamic AUC, cases = events by t, controls = still event-free "
        f"after t (drawn from the {MIN_CASES}th event on), cases weighted by 1/G(T_i) with G the censoring Kaplan-Meier of the training "
        "split. BS(t): IPCW Brier score of the predicted S(t) at the times every cell stores "
        "(the IBS grid); its integral is the IBS of the tables. KM null: everyone gets the "
        "training split's Kaplan-Meier curve (AUC 0.5 by construction). Models: "
        + " | ".join(names)
        + "."
    )
    return Section(
        "Performance over time",
        f"<p>{html.escape(desc)}</p>"
        + img(time_curves_figure(panels), "td-AUC and Brier over time"),
        desc + " (figure in report.html)\n",
    )
