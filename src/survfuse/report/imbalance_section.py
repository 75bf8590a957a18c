"""The report's "Modality contributions" section (from `RUN_DIR/imbalance.parquet`).

A table per task x test split x fused model (C with both modalities, with only CT, with only
EHR, the Shapley contributions to C - 0.5, the imbalance index and the gain over the better
unimodal baseline, each with its bootstrap CI), a bar chart of the Shapley contributions, and
the training-time gradient-norm ratio (CT / EHR encoder-side parameters) per epoch, and the
modalities that branch stopping dropped as chance-level (`dropped_<m>` in a cell's history).
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from survfuse.experiment.imbalance_eval import IMBALANCE_FILE
from survfuse.report import figures, tables
from survfuse.report.context import ReportContext, Section, img

if TYPE_CHECKING:
    from matplotlib.figure import Figure


__all__ = [
    "contribution_figure",
    "contribution_table",
    "dropped_table",
    "grad_ratio_figure",
    "imbalance_section",
]

TEST_SPLITS = ("internal_test", "external_test")
COLUMNS = {
    ("harrell_c", "full"): "C (both)",
    ("harrell_c", "ct"): "C (only CT)",
    ("harrell_c", "ehr"): "C (only EHR)",
    ("shapley", "ct"): "Shapley CT",
    ("shapley", "ehr"): "Shapley EHR",
    ("imbalance_index", None): "imbalance index",
    ("fusion_gain", None): "Δ vs best unimodal",
}


def _label(row: dict[str, Any]) -> str:
    return tables.model_label({k: row[k] for k in ("strategy", "ct_encoder", "ehr_encoder")})


def contribution_table(imb: pl.DataFrame, splits: tuple[str, ...] = TEST_SPLITS) -> pl.DataFrame:
    """Display strings: task, split, model, then one `estimate [CI]` column per quantity."""
    cols = ["task", "split", "model", *COLUMNS.values(), "baseline"]
    out = []
    sel = imb.filter(pl.col("split").is_in(list(splits)))
    keys = sel.select("task", "split", "model").unique(maintain_order=True)
    for task, split, model in keys.iter_rows():
        part = sel.filter(
            (pl.col("task") == task) & (pl.col("split") == split) & (pl.col("model") == model)
        )
        first = part.row(0, named=True)
        rec = {
            "task": task,
            "split": tables.SPLIT_LABELS.get(split, split),
            "model": _label(first),
            "baseline": f"unimodal {first['reference_modality'] or '–'}",
        }
        for (q, m), name in COLUMNS.items():
            r = part.filter(
                (pl.col("quantity") == q)
                & (pl.col("modality").is_null() if m is None else pl.col("modality") == m)
            )
            rec[name] = (
                tables.fmt_ci(r["estimate"][0], r["lower"][0], r["upper"][0]) if r.height else "–"
            )
        out.append(rec)
    return pl.DataFrame(out, schema={c: pl.Utf8 for c in cols})


def _wrapped_label(row: dict[str, Any]) -> str:
    """`strategy` over `(encoders)` on two lines: long names must not squeeze the panels."""
    label = _label(row)
    name, sep, rest = label.partition(" (")
    return f"{name}\n({rest}" if sep else label


def contribution_figure(
    imb: pl.DataFrame, splits: tuple[str, ...] = TEST_SPLITS, tasks: list[str] | None = None
) -> Figure:
    """Draw the Shapley contributions of CT and EHR (bars, 95% CI whiskers) per fused model.

    One row per task (in `tasks` order), one column per split, model labels on the left column only
    and the legend below the panels.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    sel = imb.filter(pl.col("quantity") == "shapley").filter(pl.col("split").is_in(list(splits)))
    found = list(dict.fromkeys(sel["task"].to_list()))
    tasks = [t for t in (tasks or found) if t in found]
    cols = [s for s in splits if s in set(sel["split"].to_list())]
    models = list(dict.fromkeys(sel["model"].to_list()))
    nrow, ncol = max(len(tasks), 1), max(len(cols), 1)
    fig, axes = plt.subplots(
        nrow,
        ncol,
        figsize=(figures.WIDTH, 0.9 + nrow * (0.8 + 0.55 * max(len(models), 1))),
        squeeze=False,
        sharey="row",
    )
    colors = {"ct": "#1f77b4", "ehr": "#ff7f0e"}
    for i, task in enumerate(tasks):
        for j, split in enumerate(cols):
            ax = axes[i][j]
            part = sel.filter((pl.col("task") == task) & (pl.col("split") == split))
            labels = []
            for k, model in enumerate(models):
                rows = part.filter(pl.col("model") == model)
                if not rows.height:
                    continue
                labels.append((k, _wrapped_label(rows.row(0, named=True))))
                for jj, m in enumerate(("ct", "ehr")):
                    r = rows.filter(pl.col("modality") == m)
                    est, lo, hi = r["estimate"][0], r["lower"][0], r["upper"][0]
                    y = k + (jj - 0.5) * 0.38
                    ax.barh(y, est, height=0.36, color=colors[m])
                    if lo is not None and hi is not None and math.isfinite(lo * hi):
                        ax.errorbar(est, y, xerr=[[est - lo], [hi - est]], fmt="none",
                                    color="k", lw=1)  # fmt: skip
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_yticks([k for k, _ in labels], [lab for _, lab in labels], fontsize=8)
            ax.set_ylim(len(models) - 0.5, -0.5)
            ax.set_title(f"{task} · {tables.SPLIT_LABELS.get(split, split)}", fontsize=9)
            ax.set_xlabel("Shapley contribution to C − 0.5", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=m.upper()) for m, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
    return fig


def grad_ratio_figure(curves: dict[str, list[tuple[str, pl.DataFrame]]]) -> Figure:
    """Draw log10 of the per-epoch gradient-norm ratio CT / EHR.

    One line per fused model x seed (one colour per model; the legend, one entry per model, sits
    below the panels).
    """
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(name.rsplit(" s", 1)[0] for s in curves.values() for name, _ in s))
    cmap = plt.get_cmap("tab20" if len(models) > 10 else "tab10")
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(models)}
    # a line style per model too: two models with the same curve (e.g. both dropped CT at the
    # same epoch) stay visible, the later dashed over the earlier
    dash = {m: ("-", "--", ":", "-.")[i % 4] for i, m in enumerate(models)}
    rows = math.ceil(len(models) / 2)
    fig, axes = plt.subplots(
        1,
        max(len(curves), 1),
        figsize=(figures.WIDTH, 3.2 + 0.22 * rows),
        squeeze=False,
        sharey=True,
    )
    drawn: set[str] = set()
    for ax, (task, series) in zip(axes[0], curves.items(), strict=False):
        for name, hist in series:
            ratio = hist["grad_ratio"].cast(pl.Float64).to_numpy()
            ok = np.isfinite(ratio) & (ratio > 0)
            model = name.rsplit(" s", 1)[0]
            if ok.any():
                ax.plot(
                    hist["epoch"].to_numpy()[ok],
                    np.log10(ratio[ok]),
                    lw=1.2,
                    c=colour[model],
                    ls=dash[model],
                )
                drawn.add(model)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("epoch", fontsize=9)
    axes[0][0].set_ylabel("log10 grad-norm CT / EHR")
    from matplotlib.lines import Line2D

    models = [m for m in models if m in drawn]  # no legend entry without a visible line
    handles = [Line2D([], [], c=colour[m], ls=dash[m], lw=1.5) for m in models]
    fig.legend(handles, models, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0.0, 0.22 * rows / (3.2 + 0.22 * rows), 1.0, 1.0))
    return fig


def _grad_curves(ctx: ReportContext) -> dict[str, list[tuple[str, pl.DataFrame]]]:
    out: dict[str, list[tuple[str, pl.DataFrame]]] = {t: [] for t in ctx.tasks}
    fused = [c for c in ctx.cells if c["status"] == "done" and len(c["modalities"]) == 2]
    for c in fused:
        f = ctx.rd.cell(c["cell_id"]) / "history.parquet"
        if not f.exists():
            continue
        hist = pl.read_parquet(f)
        if "grad_ratio" in hist.columns and hist.height:
            out.setdefault(c["task"], []).append((f"{c['strategy']} s{c['seed']}", hist))
    return {t: series for t, series in out.items() if series}


def dropped_table(ctx: ReportContext) -> pl.DataFrame:
    """Return the fused models whose training dropped a chance-level modality.

    Columns: task, model, the dropped modality, the seeds that dropped it (of the model's finished
    seeds) and at which epoch.
    """
    found: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
    n_seeds: dict[tuple[str, str], int] = {}
    for c in ctx.cells:
        if c["status"] != "done" or len(c["modalities"]) != 2:
            continue
        model = tables.model_label(c)
        n_seeds[(c["task"], model)] = n_seeds.get((c["task"], model), 0) + 1
        f = ctx.rd.cell(c["cell_id"]) / "history.parquet"
        hist = pl.read_parquet(f) if f.exists() else pl.DataFrame()
        for m in ("ct", "ehr"):
            col = f"dropped_{m}"
            if col in hist.columns:
                epochs = hist.filter(pl.col(col).fill_null(False))["epoch"].to_list()
                if epochs:
                    found.setdefault((c["task"], model, m), []).append((c["seed"], epochs[0]))
    rows = [
        {
            "task": task,
            "model": model,
            "dropped": m.upper(),
            "seeds": f"{len(hits)} of {n_seeds[(task, model)]} "
            f"({', '.join(str(s) for s, _ in sorted(hits))})",
            "epoch": ", ".join(str(e) for _, e in sorted(hits)),
        }
        for (task, model, m), hits in found.items()
    ]
    return pl.DataFrame(
        rows, schema={k: pl.Utf8 for k in ("task", "model", "dropped", "seeds", "epoch")}
    )


def imbalance_section(ctx: ReportContext) -> Section | None:
    """Build the "Modality contributions" section, or None when the run has no imbalance table.

    `survfuse run` writes the table; `survfuse report` brings it up to date before rendering.
    """
    path = ctx.rd.root / IMBALANCE_FILE
    if not path.exists():
        return None
    imb = pl.read_parquet(path)
    if not imb.height:
        return None
    level = 100 * float(imb["level"][0])
    t = contribution_table(imb)
    desc = (
        "How much each modality contributes to each fused model's C-index. C (only CT/EHR): the "
        "model scored with the other modality masked as missing at test time. Shapley: exact "
        "two-player Shapley values of v(S) = C(only S present) - 0.5 (v(∅) = 0), so "
        "Shapley CT + Shapley EHR = C (both) - 0.5. Imbalance index "
        "|φ_CT - φ_EHR| / (|φ_CT| + |φ_EHR|): 0 = equal contributions, 1 = one modality only. "
        "Δ vs best unimodal: against the better unimodal baseline with the same encoders "
        f"(chosen on validation). Seeds averaged; {level:.0f}% subject-level bootstrap "
        "intervals on the resamples of the main table."
    )
    parts_html = [f"<p>{html.escape(desc)}</p>"]
    if t.height:
        parts_html.append(
            img(contribution_figure(imb, tasks=ctx.tasks), "Shapley contributions")
            + tables.to_html(t)
        )
    curves = _grad_curves(ctx)
    md = desc + "\n\n" + tables.to_markdown(t)
    if curves:
        note = (
            "Training-time imbalance: per-epoch ratio of the gradient norms of the CT and EHR "
            "encoder-side parameters (log10; > 0: CT dominates the updates)."
        )
        parts_html.append(
            f"<p>{html.escape(note)}</p>" + img(grad_ratio_figure(curves), "grad ratio")
        )
        md += "\n" + note + " (figure in report.html)\n"
    dropped = dropped_table(ctx)
    if dropped.height:
        note = (
            "Dropped modalities: branch stopping masked these modalities as missing for every "
            "patient because their probe's validation C-index was not above chance while the "
            "other modality's was, and masking them raised the fused validation C-index "
            "by at least 0.005 (survfuse.fusion.branches). Their Shapley contribution is then 0."
        )
        parts_html.append(f"<p>{html.escape(note)}</p>" + tables.to_html(dropped))
        md += "\n" + note + "\n\n" + tables.to_markdown(dropped) + "\n"
    return Section("Modality contributions", "".join(parts_html), md)
