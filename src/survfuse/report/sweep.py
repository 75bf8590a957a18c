"""Figures and Markdown of `survfuse sweep-imbalance`.

The tables come from `survfuse.experiment.sweep.run_sweep`; here: gain against the imbalance,
gain against the measured unimodal gap, and `sweep.md`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from survfuse.experiment.rundir import write_text
from survfuse.experiment.sweep import SweepResult
from survfuse.experiment.sweep_tables import BEST_FUSION, TEST_SPLITS, gap_correlation
from survfuse.report.figures import SPLIT_LABELS, WIDTH
from survfuse.report.tables import fmt_ci

__all__ = ["gap_figure", "summary_markdown", "sweep_figure", "write_sweep_report"]


def write_sweep_report(res: SweepResult) -> tuple[list[Path], Path]:
    """Write `sweep.png`, `sweep_gap.png` and `sweep.md` into the sweep folder.

    One `sweep.png` per site shift when several; returns (figure paths, summary path).
    """
    import matplotlib.pyplot as plt

    root, shifts = res.out, res.site_shifts
    figs = []
    for shift in shifts:
        fig = sweep_figure(res.table, site_shift=shift)
        path = root / ("sweep.png" if len(shifts) == 1 else f"sweep_shift{shift:g}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        figs.append(path)
    for shift in shifts:
        fig = gap_figure(res.per_cohort, site_shift=shift)
        name = "sweep_gap.png" if len(shifts) == 1 else f"sweep_gap_shift{shift:g}.png"
        fig.savefig(root / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        figs.append(root / name)
    md = summary_markdown(res.table, gap_correlation(res.per_cohort))
    return figs, write_text(root / "sweep.md", md)


def gap_figure(per_cohort: pl.DataFrame, *, site_shift: float | None = None) -> Any:
    """Plot each cohort's best-fusion gain (95% CI) against its measured unimodal gap.

    The gap is C(CT-only) - C(EHR-only); one panel per task x split, colour = nominal imbalance w.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = per_cohort.filter(pl.col("model") == BEST_FUSION)
    if site_shift is not None:
        sel = sel.filter(pl.col("site_shift") == site_shift)
    tasks = list(dict.fromkeys(sel["task"].to_list()))
    splits = [s for s in TEST_SPLITS if s in set(sel["split"].to_list())]
    fig, axes = plt.subplots(
        max(len(tasks), 1),
        max(len(splits), 1),
        figsize=(WIDTH, 3.0 * max(len(tasks), 1)),
        squeeze=False,
    )
    cmap = plt.get_cmap("viridis")
    for i, task in enumerate(tasks):
        for j, split in enumerate(splits):
            ax = axes[i][j]
            p = sel.filter((pl.col("task") == task) & (pl.col("split") == split))
            x, y = p["unimodal_gap"].to_numpy(), p["gain"].to_numpy()
            err = np.vstack([y - p["gain_lower"].to_numpy(), p["gain_upper"].to_numpy() - y])
            ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0.0), fmt="none", c="0.6")
            sc = ax.scatter(x, y, c=p["imbalance"].to_numpy(), cmap=cmap, vmin=0, vmax=1, zorder=3)
            ax.axhline(0, color="grey", lw=0.8)
            ax.axvline(0, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{task} · {SPLIT_LABELS.get(split, split)}", fontsize=9)
            ax.set_xlabel("unimodal gap C(CT-only) − C(EHR-only)")
            ax.set_ylabel("best fusion Δ C")
            fig.colorbar(sc, ax=ax, label="w")
    fig.suptitle(
        "Best-fusion gain against the measured modality balance (one point per cohort)", fontsize=10
    )
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.96))
    return fig


def sweep_figure(table: pl.DataFrame, *, site_shift: float | None = None) -> Any:
    """Plot the gain over the best unimodal baseline (95% CI) against the imbalance.

    One panel per task x split, one line per model (`best fusion` in black).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = table if site_shift is None else table.filter(pl.col("site_shift") == site_shift)
    tasks = list(dict.fromkeys(sel["task"].to_list()))
    splits = [s for s in TEST_SPLITS if s in set(sel["split"].to_list())]
    models = list(dict.fromkeys(sel["model"].to_list()))
    models = [m for m in models if m != BEST_FUSION] + [BEST_FUSION]
    fig, axes = plt.subplots(
        max(len(tasks), 1),
        max(len(splits), 1),
        figsize=(WIDTH, 3.2 * max(len(tasks), 1)),
        squeeze=False,
        sharex=True,
    )
    cmap = plt.get_cmap("tab10")
    offsets = np.linspace(-0.02, 0.02, max(len(models), 1))
    for i, task in enumerate(tasks):
        for j, split in enumerate(splits):
            ax = axes[i][j]
            part = sel.filter((pl.col("task") == task) & (pl.col("split") == split))
            for k, model in enumerate(models):
                p = part.filter(pl.col("model") == model).sort("imbalance")
                if not p.height:
                    continue
                x = p["imbalance"].to_numpy() + offsets[k]
                y = p["gain"].to_numpy()
                err = np.vstack([y - p["gain_lower"].to_numpy(), p["gain_upper"].to_numpy() - y])
                best = model == BEST_FUSION
                ax.errorbar(
                    x,
                    y,
                    yerr=np.where(np.isfinite(err), err, 0.0),
                    marker="o",
                    ms=4 if not best else 6,
                    lw=2.2 if best else 1.0,
                    capsize=2,
                    color="black" if best else cmap(k % 10),
                    label=model.split("/")[0],
                )
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{task} · {SPLIT_LABELS.get(split, split)}", fontsize=9)
            ax.set_xlabel("imbalance w (image share of the modality-specific signal)")
            ax.set_ylabel("Δ C vs best unimodal")
    title = "Fusion gain over the best unimodal baseline"
    if site_shift is not None:
        title += f" (site shift {site_shift:g})"
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = math.ceil(len(labels) / 3)
    bottom = 0.03 + 0.03 * rows / max(len(tasks), 1)
    if handles:  # below the panels, so it never hides a point
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0.0, bottom, 1.0, 0.97))
    return fig


def _fmt(est: float, lo: float, hi: float) -> str:
    return fmt_ci(est, lo, hi)


def summary_markdown(table: pl.DataFrame, correlation: pl.DataFrame | None = None) -> str:
    """Return the Markdown of `sweep.md`: gains per model and imbalance, and the unimodal gaps.

    `gain [CI]` per model (rows) and imbalance (columns), per site shift, task and split; the mean
    measured unimodal gap per imbalance; where the best fusion peaks; and the Spearman correlation
    of `gap_correlation` when given.
    """
    lines = ["# survfuse sweep-imbalance", ""]
    for shift in sorted(set(table["site_shift"].to_list())):
        for task in dict.fromkeys(table["task"].to_list()):
            for split in TEST_SPLITS:
                part = table.filter(
                    (pl.col("site_shift") == shift)
                    & (pl.col("task") == task)
                    & (pl.col("split") == split)
                )
                if not part.height:
                    continue
                ws = sorted(set(part["imbalance"].to_list()))
                lines += [
                    f"## {task}, {split}, site shift {shift:g}: Δ C vs best unimodal [95% CI]",
                    "",
                    "| model | " + " | ".join(f"w={w:g}" for w in ws) + " |",
                    "|---|" + "---|" * len(ws),
                ]
                for model in dict.fromkeys(part["model"].to_list()):
                    cells = []
                    for w in ws:
                        r = part.filter((pl.col("model") == model) & (pl.col("imbalance") == w))
                        cell = (
                            _fmt(r["gain"][0], r["gain_lower"][0], r["gain_upper"][0])
                            if r.height
                            else "–"
                        )
                        if r.height and model == BEST_FUSION:
                            cell += f" ({r['selected'][0]})"
                        cells.append(cell)
                    lines.append(f"| {model} | " + " | ".join(cells) + " |")
                gaps = []
                for w in ws:
                    g = part.filter((pl.col("model") == BEST_FUSION) & (pl.col("imbalance") == w))[
                        "unimodal_gap"
                    ]
                    gaps.append(f"{g[0]:+.3f}" if g.len() and g[0] is not None else "–")
                lines.append("| unimodal gap C(CT) − C(EHR) | " + " | ".join(gaps) + " |")
                lines += ["", _peak_line(part)]
                if correlation is not None:
                    r = correlation.filter(
                        (pl.col("site_shift") == shift)
                        & (pl.col("task") == task)
                        & (pl.col("split") == split)
                    )
                    if r.height:
                        lines.append(
                            f"Spearman correlation of |unimodal gap| and best-fusion gain over "
                            f"{r['n'][0]} cohorts: {r['rho'][0]:+.2f}."
                        )
                lines.append("")
    return "\n".join(lines)


def _peak_line(part: pl.DataFrame) -> str:
    """Return where the best fusion's gain peaks and what it is at the extremes of w.

    The study's claim: largest at balanced contributions, shrinking toward 0 at the extremes.
    """
    best = part.filter(pl.col("model") == BEST_FUSION).sort("imbalance")
    if best.height < 2:
        return ""
    ws, g = best["imbalance"].to_list(), best["gain"].to_list()
    lo, hi = best["gain_lower"].to_list(), best["gain_upper"].to_list()
    gains = np.asarray([math.nan if x is None else x for x in g], dtype=np.float64)
    if not np.isfinite(gains).any():
        return "Best fusion: no finite gain."
    k = int(np.nanargmax(gains))
    ends = ", ".join(f"w={ws[i]:g}: {_fmt(g[i], lo[i], hi[i])}" for i in (0, len(ws) - 1))
    return f"Best fusion peaks at w={ws[k]:g} ({_fmt(g[k], lo[k], hi[k])}); extremes {ends}."
