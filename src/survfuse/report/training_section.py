"""The report's "Training curves" section.

Per task, the best fused model's per-epoch loss (its own loss apart from the branch probes'
loss) and validation C-index per seed, with the reference model's curves in grey and the epochs
at which branch stopping froze or dropped a branch marked.
"""

from __future__ import annotations

import html

import polars as pl

from survfuse.report import tables
from survfuse.report.context import ReportContext, Section, img
from survfuse.report.figures import TrainingRun, training_curves_figure

__all__ = ["training_section"]


def training_section(ctx: ReportContext) -> Section | None:
    """Build the "Training curves" section, or None when no cell has a training history."""
    curves: dict[str, list[TrainingRun]] = {}
    old_format = False
    for task in ctx.tasks:
        ref = ctx.reference(task)
        runs = []
        models = list(dict.fromkeys(m for m in (ctx.best_model(task), ref) if m))
        for model in models:
            for c in ctx.cells_of(model, task):
                f = ctx.rd.cell(c["cell_id"]) / "history.parquet"
                if not f.exists():
                    continue
                h = pl.read_parquet(f)
                old_format |= "fused_loss" not in h.columns and model != ref
                runs.append(TrainingRun(int(c["seed"]), h, reference=model == ref))
        if runs:
            names = [f"{tables.short_model(m)}" for m in models]
            curves[f"{task}: " + " vs reference ".join(names)] = runs
    if not curves:
        return None
    desc = (
        "Per epoch, for each task's best fused model (one colour per seed): left, the model's "
        "own training loss (its survival loss, e.g. the Cox partial negative log-likelihood, "
        "plus any alignment term of the strategy, averaged over the epoch's batches); middle, "
        "the loss of the branch probes (one linear Cox model per modality that branch "
        "stopping trains beside the fused model and that was added to the optimised sum; a "
        "frozen branch's probe leaves the sum, which is why it steps down); right, the "
        "validation C-index of the fused model (solid), of each branch probe (dotted CT, "
        "dash-dot EHR) and of the reference model (grey, dashed). Vertical dotted lines: the "
        "epoch at which a branch was frozen or dropped (listed in the middle panel). The "
        "weights kept are those of the best validation epoch."
    )
    if old_format:
        desc += (
            " This run was trained before the model's own loss was logged apart from the "
            "probes': the left panel shows their sum."
        )
    return Section(
        "Training curves",
        f"<p>{html.escape(desc)}</p>" + img(training_curves_figure(curves), "training curves"),
        desc + " (figure in report.html)\n",
    )
