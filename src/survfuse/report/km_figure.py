"""Kaplan-Meier by risk group: one panel per model (best fused beside the reference) and task.

95% log-log bands, curves stopped where fewer than `MIN_AT_RISK` subjects remain at risk, and a
number-at-risk table under each axis (its row labels, in the group colours, are the legend).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from survfuse.metrics.km import kaplan_meier, km_confidence_band, number_at_risk
from survfuse.report.figures import WIDTH
from survfuse.report.risk_groups import GROUP_NAMES, MIN_AT_RISK, RiskGroups

__all__ = ["GROUP_COLORS", "km_risk_group_figure"]

GROUP_COLORS = ("#2ca02c", "#ff7f0e", "#d62728")


def _curve(rg: RiskGroups, g: int, ax: Axes) -> float:
    """Draw group g's KM step curve and band up to its last time with >= MIN_AT_RISK at risk.

    Returns that time (0 when the group is smaller than MIN_AT_RISK).
    """
    idx = rg.group == g
    if idx.sum() < MIN_AT_RISK:
        return 0.0
    km = kaplan_meier(rg.time[idx], rg.event[idx])
    lo, hi = km_confidence_band(km)
    t_stop = float(np.sort(rg.time[idx])[-MIN_AT_RISK])  # the last time with >= 10 at risk
    keep = km.times <= t_stop
    t = np.concatenate([[0.0], km.times[keep], [t_stop]])
    s = np.concatenate([[1.0], km.survival[keep], [km.survival[keep][-1] if keep.any() else 1.0]])
    lo_ = np.concatenate([[1.0], lo[keep], [lo[keep][-1] if keep.any() else 1.0]])
    hi_ = np.concatenate([[1.0], hi[keep], [hi[keep][-1] if keep.any() else 1.0]])
    color = GROUP_COLORS[g]
    ax.fill_between(t, lo_, hi_, step="post", color=color, alpha=0.15, lw=0)
    ax.step(t, s, where="post", color=color, lw=1.6)
    return t_stop


def _panel(rg: RiskGroups, ax: Axes, table: Axes, t_max: float) -> None:
    for g in range(len(GROUP_NAMES)):
        _curve(rg, g, ax)
    ax.set_xlim(0, t_max)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("survival probability", fontsize=9)
    ax.set_title(rg.title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8, labelbottom=False)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ticks = [t for t in ax.get_xticks() if 0 <= t <= t_max]
    table.set_xlim(ax.get_xlim())
    table.set_ylim(-0.5, len(GROUP_NAMES) - 0.5)
    table.invert_yaxis()
    for g in range(len(GROUP_NAMES)):
        at = number_at_risk(rg.time[rg.group == g], ticks)
        for x, k in zip(ticks, at, strict=True):
            table.text(x, g, str(k), ha="center", va="center", fontsize=8, color=GROUP_COLORS[g])
    table.set_yticks(range(len(GROUP_NAMES)))
    table.set_yticklabels(
        [f"{name} (n={rg.n(g)})" for g, name in enumerate(GROUP_NAMES)], fontsize=8
    )
    for lab, color in zip(table.get_yticklabels(), GROUP_COLORS, strict=True):
        lab.set_color(color)
    table.set_xticks(ticks)
    table.tick_params(labelsize=8, left=False)
    table.tick_params(axis="y", pad=14)  # clear of the numbers centred on t = 0
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
    table.set_xlabel("days since prediction (numbers at risk above)", fontsize=9)


def km_risk_group_figure(rows: list[list[RiskGroups]]) -> Figure:
    """Draw one row of panels per task (e.g. best fused model, reference).

    Each panel is a KM axis over a number-at-risk table; all panels of a row share the time axis.
    """
    n_rows = max(len(rows), 1)
    n_cols = max((len(r) for r in rows), default=1)
    fig = plt.figure(figsize=(WIDTH, 4.6 * n_rows))
    outer = fig.add_gridspec(n_rows, 1, hspace=0.42)
    for i, row in enumerate(rows):
        grid = outer[i].subgridspec(2, n_cols, height_ratios=[3.2, 1.0], hspace=0.06, wspace=0.5)
        t_max = max(
            (float(np.sort(rg.time)[-MIN_AT_RISK]) for rg in row if rg.time.size >= MIN_AT_RISK),
            default=1.0,
        )
        for j, rg in enumerate(row):
            ax = fig.add_subplot(grid[0, j])
            table = fig.add_subplot(grid[1, j])
            _panel(rg, ax, table, t_max)
    fig.subplots_adjust(left=0.14, right=0.98, top=0.95, bottom=0.07)
    return fig
