"""Calibration figure: observed against predicted risk at a horizon in quantile bins.

Observed risk in quantile bins of predicted risk, with the Kaplan-Meier interval of each observed
value, and a histogram of the predicted risks under each panel. One row per task, one column per
test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import NDArray

from survfuse.metrics.km import kaplan_meier, km_confidence_band
from survfuse.report.figures import WIDTH

__all__ = ["CalibrationSeries", "calibration_figure", "calibration_points"]

MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")


@dataclass
class CalibrationSeries:
    """Predicted S(horizon) and observed outcomes of one model on one split."""

    label: str
    time: NDArray[np.float64]
    event: NDArray[np.bool_]
    surv_h: NDArray[np.float64]


def calibration_points(
    s: CalibrationSeries, horizon: float, bins: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Return, per quantile bin of predicted risk p = 1 - S(h), the points of the calibration plot.

    Rows: mean p, observed 1 - KM(h) and the 95% interval of the observed value (log-log Greenwood
    band of the bin's KM): [4, bins].
    """
    pred = 1.0 - s.surv_h
    order = np.argsort(pred, kind="stable")
    out = []
    for idx in np.array_split(order, min(bins, len(order))):
        if idx.size == 0:
            continue
        km = kaplan_meier(s.time[idx], s.event[idx])
        lo, hi = km_confidence_band(km)
        k = int(np.searchsorted(km.times, horizon, side="right")) - 1
        surv = float(km(horizon))
        s_lo, s_hi = (1.0, 1.0) if k < 0 else (float(lo[k]), float(hi[k]))
        if not np.isfinite(s_lo):  # every subject of the bin had the event by h
            s_lo = s_hi = 0.0
        out.append((float(pred[idx].mean()), 1.0 - surv, 1.0 - s_hi, 1.0 - s_lo))
    a = np.array(out, dtype=np.float64).reshape(-1, 4).T
    return a[0], a[1], a[2], a[3]


def calibration_figure(
    panels: dict[tuple[str, str], list[CalibrationSeries]],
    horizon: float,
    bins: int = 10,
    titles: dict[tuple[str, str], str] | None = None,
) -> Figure:
    """Draw the calibration figure of `panels[(task, split label)]`, the series of each panel.

    One colour per series label across panels. Rows are tasks in the order given, columns splits.
    """
    tasks = list(dict.fromkeys(t for t, _ in panels))
    splits = list(dict.fromkeys(s for _, s in panels))
    fig = plt.figure(figsize=(WIDTH, 4.3 * len(tasks) + 0.6))
    outer = fig.add_gridspec(len(tasks), len(splits), hspace=0.45, wspace=0.25)
    labels: dict[str, str] = {}
    for i, task in enumerate(tasks):
        for j, split in enumerate(splits):
            series = panels.get((task, split), [])
            inner = outer[i, j].subgridspec(2, 1, height_ratios=[3.0, 1.0], hspace=0.08)
            ax, hist = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
            pts = [calibration_points(s, horizon, bins) for s in series]
            # the axes cover the points (not their intervals, which may reach 1 in small bins)
            top = max([0.05, *(float(np.nanmax(np.r_[x, y])) for x, y, _, _ in pts)])
            lim = min(1.0, top * 1.15)
            for s, (x, y, lo, hi) in zip(series, pts, strict=True):
                color = labels.setdefault(s.label, MODEL_COLORS[len(labels) % len(MODEL_COLORS)])
                ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", ms=3.5, lw=1.2, capsize=2,
                            color=color, alpha=0.9)  # fmt: skip
                # risks beyond the axis are counted in the last bin
                hist.hist(np.clip(1.0 - s.surv_h, 0.0, lim), bins=np.linspace(0, lim, 26).tolist(),
                          histtype="step", color=color, lw=1.2)  # fmt: skip
            ax.plot([0, lim], [0, lim], color="black", lw=0.8, ls="--")
            ax.set_xlim(0, lim)
            ax.set_ylim(0, lim)
            hist.set_xlim(0, lim)
            ax.tick_params(labelsize=8, labelbottom=False)
            hist.tick_params(labelsize=8)
            ax.set_ylabel(f"observed risk at {horizon:g} d\n(1 − Kaplan-Meier)", fontsize=9)
            hist.set_ylabel("subjects", fontsize=9)
            hist.set_xlabel(f"predicted risk at {horizon:g} days (1 − S(t))", fontsize=9)
            ax.set_title((titles or {}).get((task, split), f"{task} · {split}"), fontsize=8)
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", lw=1.2, label=lab) for lab, c in labels.items()]
    handles.append(Line2D([], [], color="black", lw=0.8, ls="--", label="perfect calibration"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=9,
               frameon=False)  # fmt: skip
    fig.subplots_adjust(left=0.1, right=0.98, top=0.96, bottom=0.9 / fig.get_figheight())
    return fig
