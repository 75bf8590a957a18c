"""Report figures (matplotlib, Agg backend): forest plot, KM by risk tertile, calibration,
training curves. Each function returns a Figure; `to_png_base64` embeds it in the HTML page.

Figures are at most 10 inches wide so the page never scrolls sideways.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.figure import Figure
from numpy.typing import NDArray

from survfuse.metrics.km import kaplan_meier

__all__ = [
    "CalibrationSeries",
    "KMPanel",
    "calibration_figure",
    "forest_plot",
    "km_tertile_figure",
    "to_png_base64",
    "training_curves_figure",
]

WIDTH = 10.0  # inches; at 100 dpi this fits a 1000 px column
SPLIT_COLORS = {"validation": "#7f7f7f", "internal_test": "#1f77b4", "external_test": "#d62728"}
SPLIT_LABELS = {
    "validation": "validation",
    "internal_test": "internal test",
    "external_test": "external test",
}


def to_png_base64(fig: Figure, *, dpi: int = 100) -> str:
    """PNG bytes of `fig`, base64-encoded (for `<img src="data:image/png;base64,...">`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def forest_plot(
    metrics: pl.DataFrame, metric: str = "harrell_c", *, label: str = "Δ Harrell C"
) -> Figure:
    """Change of `metric` against each task's reference model, with CIs, per split and task.

    One panel per task; one row per compared model; one marker per split.
    """
    sel = metrics.filter((pl.col("metric") == metric) & ~pl.col("is_reference"))
    if sel.height and sel["horizon"].null_count() < sel.height:
        sel = sel.filter(pl.col("horizon") == sel["horizon"].drop_nulls().min())
    tasks = list(dict.fromkeys(sel["task"].to_list())) or ["(no comparisons)"]
    n_models = max((sel.filter(pl.col("task") == t)["model"].n_unique() for t in tasks), default=1)
    height = 1.2 + 0.42 * max(n_models, 1)
    fig, axes = plt.subplots(1, len(tasks), figsize=(WIDTH, height), squeeze=False, sharey=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        part = sel.filter(pl.col("task") == task)
        models = list(dict.fromkeys(part["model"].to_list()))
        labels = []
        for r in part.unique("model", keep="first", maintain_order=True).iter_rows(named=True):
            encs = "+".join(e for e in (r["ct_encoder"], r["ehr_encoder"]) if e)
            labels.append(f"{r['strategy']}\n({encs})")
        splits = [s for s in SPLIT_COLORS if s in set(part["split"].to_list())]
        # one offset per split (none when the task has no comparison, e.g. its cells failed)
        offsets = (
            np.linspace(-0.25, 0.25, len(splits)) if len(splits) > 1 else np.zeros(len(splits))
        )
        for off, split in zip(offsets, splits, strict=True):
            rows = part.filter(pl.col("split") == split)
            pos = {m: i for i, m in enumerate(models)}
            y = np.array([pos[m] for m in rows["model"].to_list()], dtype=float) + off
            d = rows["delta"].to_numpy()
            lo = rows["delta_lower"].to_numpy()
            hi = rows["delta_upper"].to_numpy()
            err = np.vstack([np.nan_to_num(d - lo), np.nan_to_num(hi - d)])
            ax.errorbar(
                d,
                y,
                xerr=err,
                fmt="o",
                ms=4,
                capsize=2,
                color=SPLIT_COLORS[split],
                label=SPLIT_LABELS[split],
            )
        ax.axvline(0.0, color="black", lw=0.8, ls="--")
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ref = part["reference"][0] if part.height else ""
        ax.set_title(f"{task}\nreference: {ref}", fontsize=8)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    handles, labels_ = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels_,
        fontsize=7,
        loc="lower center",
        ncol=max(len(labels_), 1),
        bbox_to_anchor=(0.5, -0.02),
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


@dataclass
class KMPanel:
    """One KM panel: observed outcomes and predicted risk of one cohort."""

    title: str
    time: NDArray[np.float64]
    event: NDArray[np.bool_]
    risk: NDArray[np.float64]


def _km_steps(
    time: NDArray[np.float64], event: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:

    km = kaplan_meier(time, event)
    return np.concatenate([[0.0], km.times]), np.concatenate([[1.0], km.survival])


def km_tertile_figure(panels: list[KMPanel]) -> Figure:
    """Kaplan-Meier curves of the low / middle / high predicted-risk tertiles, per panel."""
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(WIDTH, 3.6), squeeze=False)
    colors = ["#2ca02c", "#ff7f0e", "#d62728"]
    for ax, p in zip(axes[0], panels, strict=False):
        cuts = np.quantile(p.risk, [1 / 3, 2 / 3])
        group = np.digitize(p.risk, cuts, right=True)
        for g, name in enumerate(("low", "middle", "high")):
            idx = group == g
            if idx.sum() == 0:
                continue
            t, s = _km_steps(p.time[idx], p.event[idx])
            ax.step(t, s, where="post", color=colors[g], label=f"{name} risk (n={int(idx.sum())})")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("days since prediction")
        ax.set_ylabel("survival")
        ax.set_title(p.title, fontsize=8)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@dataclass
class CalibrationSeries:
    """Predicted S(horizon) and observed outcomes of one model on one split."""

    label: str
    time: NDArray[np.float64]
    event: NDArray[np.bool_]
    surv_h: NDArray[np.float64]


def calibration_points(
    s: CalibrationSeries, horizon: float, bins: int
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(mean predicted risk, observed 1 - KM(horizon)) per quantile bin of predicted risk."""

    pred = 1.0 - s.surv_h
    order = np.argsort(pred, kind="stable")
    xs, ys = [], []
    for idx in np.array_split(order, min(bins, len(order))):
        if idx.size == 0:
            continue
        km = kaplan_meier(s.time[idx], s.event[idx])
        xs.append(float(pred[idx].mean()))
        ys.append(1.0 - float(km(horizon)))
    return np.array(xs), np.array(ys)


def calibration_figure(
    panels: dict[str, list[CalibrationSeries]], horizon: float, bins: int = 10
) -> Figure:
    """Observed vs predicted risk at `horizon` (quantile bins), one panel per task."""
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(WIDTH, 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items(), strict=False):
        hi = 0.05
        for s in series:
            x, y = calibration_points(s, horizon, bins)
            ax.plot(x, y, "o-", ms=3, label=s.label)
            hi = max(hi, float(np.nanmax(np.concatenate([x, y]))) if x.size else hi)
        lim = min(1.0, hi * 1.1)
        ax.plot([0, lim], [0, lim], color="black", lw=0.8, ls="--")
        ax.set_xlim(0, lim)
        ax.set_ylim(0, lim)
        ax.set_xlabel(f"predicted risk at {horizon:g} days")
        ax.set_ylabel("observed (1 - KM)")
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def training_curves_figure(curves: dict[str, list[tuple[str, pl.DataFrame]]]) -> Figure:
    """Training loss and validation C-index over epochs: one row per task, one line per cell."""
    n = max(len(curves), 1)
    fig, axes = plt.subplots(n, 2, figsize=(WIDTH, 2.8 * n), squeeze=False)
    for row, (title, series) in zip(axes, curves.items(), strict=False):
        for label, h in series:
            if "epoch" not in h.columns or h.height == 0:
                continue
            ep = h["epoch"].to_numpy()
            if "train_loss" in h.columns:
                row[0].plot(ep, h["train_loss"].to_numpy(), lw=1, label=label)
            val_col = next(
                (c for c in ("val_c_index", "val_cindex", "val_loss") if c in h.columns), None
            )
            if val_col is not None:
                v = h[val_col].cast(pl.Float64).to_numpy()
                row[1].plot(ep, v, lw=1, label=label)
                row[1].set_ylabel(val_col)
        row[0].set_title(f"{title}: training loss", fontsize=8)
        row[1].set_title(f"{title}: validation", fontsize=8)
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def finite(x: Any) -> bool:
    return x is not None and isinstance(x, float) and math.isfinite(x)
