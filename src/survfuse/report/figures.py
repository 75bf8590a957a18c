"""Report figures (matplotlib, Agg backend): forest plot and training curves.

Kaplan-Meier: `km_figure`; calibration: `calibration_figure`; performance over time:
`time_curves`. Each function returns a Figure; `to_png_base64` embeds it in the HTML page.

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
from matplotlib.lines import Line2D

from survfuse.report.tables import model_label, model_order, short_model, task_order

__all__ = [
    "SPLIT_COLORS",
    "TrainingRun",
    "forest_plot",
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


def _holm_text(p: float | None, family_size: int | None) -> str:
    if p is None or not math.isfinite(p) or not family_size:
        return "–"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def forest_plot(
    metrics: pl.DataFrame,
    metric: str = "harrell_c",
    *,
    label: str = "Δ Harrell C",
    splits: tuple[str, ...] = ("internal_test", "external_test"),
) -> Figure:
    """Change of `metric` against each task's reference model, with CIs, on the test splits.

    One panel per task (main-table order), one row per compared model (main-table order), one
    marker per split; the Holm-adjusted p of each estimate is printed at the row's right in
    its split's colour (`–`: not in the Holm family). Validation is left out: the reference
    is chosen on it.
    """
    sel = metrics.filter(
        (pl.col("metric") == metric) & ~pl.col("is_reference") & pl.col("split").is_in(splits)
    )
    if sel.height and sel["horizon"].null_count() < sel.height:
        sel = sel.filter(pl.col("horizon") == sel["horizon"].drop_nulls().min())
    order = model_order(metrics)
    tasks = [t for t in task_order(metrics) if t in set(sel["task"].to_list())]
    tasks = tasks or ["(no comparisons)"]
    n_models = [max(sel.filter(pl.col("task") == t)["model"].n_unique(), 1) for t in tasks]
    fig, axes = plt.subplots(
        len(tasks),
        1,
        figsize=(WIDTH, 0.9 + sum(0.75 + 0.32 * n for n in n_models)),
        squeeze=False,
        gridspec_kw={"height_ratios": [0.75 + 0.32 * n for n in n_models]},
    )
    shown = [s for s in splits if s in set(sel["split"].to_list())]
    # one offset per split shown (none when no comparison exists, e.g. the reference's cells
    # are the only ones that finished)
    spread = np.linspace(-0.18, 0.18, len(shown)) if len(shown) > 1 else np.zeros(len(shown))
    offsets = dict(zip(shown, spread.tolist(), strict=True))
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        part = sel.filter(pl.col("task") == task)
        models = sorted(dict.fromkeys(part["model"].to_list()), key=order.index)
        pos = {m: i for i, m in enumerate(models)}
        for split in shown:
            rows = part.filter(pl.col("split") == split)
            y = np.array([pos[m] for m in rows["model"].to_list()], dtype=float) + offsets[split]
            d = rows["delta"].to_numpy()
            err = np.vstack(
                [
                    np.nan_to_num(d - rows["delta_lower"].to_numpy()),
                    np.nan_to_num(rows["delta_upper"].to_numpy() - d),
                ]
            )
            color = SPLIT_COLORS[split]
            ax.errorbar(d, y, xerr=err, fmt="o", ms=4, capsize=2, color=color, label=split)
            fam = rows["family_size"] if "family_size" in rows.columns else [None] * rows.height
            for yy, p, m in zip(y, rows["p_holm"].to_list(), fam, strict=True):
                ax.annotate(
                    _holm_text(p, m),
                    xy=(1.01, yy),
                    xycoords=("axes fraction", "data"),
                    fontsize=8,
                    va="center",
                    color=color,
                )
        ax.annotate(
            "Holm p",
            xy=(1.01, -0.6),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            va="bottom",
            weight="bold",
        )
        labels = [model_label(part.filter(pl.col("model") == m).row(0, named=True)) for m in models]
        ax.set_yticks(range(len(models)), labels, fontsize=8)
        ax.set_ylim(len(models) - 0.5, -0.6)
        ax.axvline(0.0, color="black", lw=0.8, ls="--")
        ref = short_model(str(part["reference"][0])) if part.height else ""
        ax.set_title(f"{task} (reference: {ref})" if ref else task, fontsize=9, loc="left")
        ax.set_xlabel(f"{label} (fused − reference; > 0: better than the reference)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    handles = [
        Line2D([], [], color=SPLIT_COLORS[s], marker="o", ls="", label=SPLIT_LABELS[s])
        for s in shown
    ]
    fig.legend(
        handles=handles, fontsize=9, loc="lower center", ncol=max(len(handles), 1), frameon=False
    )
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 0.93, 1))
    return fig


@dataclass
class TrainingRun:
    """One cell's per-epoch history.

    `seed`: its seed; `reference`: a reference-model cell (drawn grey and dashed, in the validation
    panel only: its loss is of another model).
    """

    seed: int
    history: pl.DataFrame
    reference: bool = False


def _first(h: pl.DataFrame, col: str) -> int | None:
    if col not in h.columns:
        return None
    hit = h.filter(pl.col(col).fill_null(False))["epoch"].to_list()
    return int(hit[0]) if hit else None


def _events(h: pl.DataFrame) -> list[tuple[int, str]]:
    """Return (epoch, "CT frozen" / "EHR dropped") per modality.

    A dropped branch is also frozen, so a drop is the one mark it gets.
    """
    out = []
    for m in ("ct", "ehr"):
        for what in ("dropped", "frozen"):
            e = _first(h, f"{what}_{m}")
            if e is not None:
                out.append((e, f"{m.upper()} {what}"))
                break
    return out


SEED_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def _training_row(row: Any, runs: list[TrainingRun]) -> None:
    notes = []
    for run in runs:
        h = run.history
        if "epoch" not in h.columns or not h.height:
            continue
        ep = h["epoch"].to_numpy()
        if run.reference:
            if "val_c_index" in h.columns:
                v = h["val_c_index"].cast(pl.Float64).to_numpy()
                row[2].plot(ep, v, lw=1.2, color="#7f7f7f", ls="--")
            continue
        color = SEED_COLORS[run.seed % len(SEED_COLORS)]
        own = "fused_loss" if "fused_loss" in h.columns else "train_loss"
        row[0].plot(ep, h[own].cast(pl.Float64).to_numpy(), lw=1.2, color=color)
        if own == "fused_loss":
            probe = (h["train_loss"] - h["fused_loss"]).cast(pl.Float64).to_numpy()
            if np.nanmax(np.abs(probe), initial=0.0) > 0:
                row[1].plot(ep, probe, lw=1.2, color=color)
        if "val_c_index" in h.columns:
            row[2].plot(ep, h["val_c_index"].cast(pl.Float64).to_numpy(), lw=1.2, color=color)
        for m, ls in (("ct", ":"), ("ehr", "-.")):
            if f"val_c_index_{m}" in h.columns:
                v = h[f"val_c_index_{m}"].cast(pl.Float64).to_numpy()
                row[2].plot(ep, v, lw=0.9, ls=ls, color=color, alpha=0.7)
        for e, text in _events(h):
            for ax in row:
                ax.axvline(e, color=color, lw=0.8, ls=(0, (1, 2)))
            notes.append(f"seed {run.seed}: {text} at epoch {e}")
    if notes:
        row[1].text(0.97, 0.97, "\n".join(notes), transform=row[1].transAxes, ha="right",
                    va="top", fontsize=7, bbox={"fc": "white", "ec": "#cccccc", "pad": 2})  # fmt: skip
    if not row[1].lines:
        row[1].text(0.5, 0.5, "no branch probes", ha="center", va="center", fontsize=9,
                    transform=row[1].transAxes)  # fmt: skip


def training_curves_figure(curves: dict[str, list[TrainingRun]]) -> Figure:
    """Draw the training curves, one row per task (titled by the key).

    Per epoch and seed: the fused model's own training loss, the branch probes' loss
    (train_loss - fused_loss; a frozen branch's probe leaves the sum) and the validation C-index of
    the fused model, each branch probe and the reference model. Dotted vertical lines mark the
    epochs at which a branch was frozen or dropped (listed in the middle panel).
    """
    n = max(len(curves), 1)
    fig, axes = plt.subplots(n, 3, figsize=(WIDTH, 3.2 * n + 0.7), squeeze=False)
    seeds: set[int] = set()
    for row, (title, runs) in zip(axes, curves.items(), strict=False):
        _training_row(row, runs)
        seeds |= {r.seed for r in runs if not r.reference}
        row[0].set_title(f"{title}\nfused model's own loss", fontsize=9, loc="left")
        row[1].set_title("branch-probe loss", fontsize=9)
        row[2].set_title("validation C-index", fontsize=9)
        row[0].set_ylabel("training loss (mean per batch)", fontsize=9)
        row[1].set_ylabel("sum of probe Cox NLLs", fontsize=9)
        row[2].set_ylabel("Harrell C (validation)", fontsize=9)
        for ax in row:
            ax.set_xlabel("epoch", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=SEED_COLORS[s % len(SEED_COLORS)], lw=1.2, label=f"seed {s}")
        for s in sorted(seeds)
    ]
    handles += [
        Line2D([], [], color="black", lw=0.9, ls=":", label="CT probe (C)"),
        Line2D([], [], color="black", lw=0.9, ls="-.", label="EHR probe (C)"),
        Line2D([], [], color="#7f7f7f", lw=1.2, ls="--", label="reference model (C)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    return fig


def finite(x: Any) -> bool:
    return x is not None and isinstance(x, float) and math.isfinite(x)
