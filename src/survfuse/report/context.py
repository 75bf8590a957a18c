"""What report sections read.

`ReportContext` (the run folder, config, metrics, cohort, cells), `Section` (what a builder
returns) and `img` (a figure embedded as PNG).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl
from pydantic import ValidationError

from survfuse.data.cohort import outcome_columns
from survfuse.experiment.config import EvaluationConfig
from survfuse.experiment.grid import model_key
from survfuse.experiment.rundir import RunDir
from survfuse.experiment.scoring import GroupData, null_model_scores
from survfuse.report import figures

__all__ = ["ReportContext", "Section", "SectionBuilder", "img"]


@dataclass
class Section:
    """One report section: a title, an HTML body and its Markdown counterpart (may be empty)."""

    title: str
    html: str
    markdown: str = ""


@dataclass
class ReportContext:
    """What section builders read: the run folder, its config dict, metrics, cohort and cells."""

    rd: RunDir
    config: dict[str, Any]
    metrics: pl.DataFrame
    cohort: pl.DataFrame
    cells: list[dict[str, Any]]  # spec.json of every cell plus its "status" and "error"

    def cells_of(self, model: str, task: str) -> list[dict[str, Any]]:
        return [
            c
            for c in self.cells
            if c["task"] == task
            and c["status"] == "done"
            and model_key(c["strategy"], c["ct_encoder"], c["ehr_encoder"], c["head"]) == model
        ]

    def seed_mean(self, model: str, task: str, column: str) -> np.ndarray | None:
        """Mean over seeds of one predictions column, in cohort row order."""
        cols = []
        for c in self.cells_of(model, task):
            p = pl.read_parquet(
                self.rd.cell(c["cell_id"]) / "predictions.parquet", columns=[column]
            )
            cols.append(p[column].to_numpy())
        return np.mean(cols, axis=0) if cols else None

    def best_model(self, task: str, *, fused: bool = True) -> str | None:
        """Highest validation Harrell C (fused models only when `fused`)."""
        sel = self.metrics.filter(
            (pl.col("task") == task)
            & (pl.col("split") == "validation")
            & (pl.col("metric") == "harrell_c")
        )
        if fused and sel.filter(~pl.col("unimodal")).height:
            sel = sel.filter(~pl.col("unimodal"))
        sel = sel.filter(pl.col("estimate").is_not_nan()).sort("estimate", descending=True)
        return str(sel["model"][0]) if sel.height else None

    def reference(self, task: str) -> str | None:
        sel = self.metrics.filter((pl.col("task") == task) & pl.col("is_reference"))
        return str(sel["model"][0]) if sel.height else None

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(self.metrics["task"].to_list()))

    @property
    def evaluation(self) -> dict[str, Any]:
        ev: dict[str, Any] = self.config.get("evaluation", {})
        return ev

    @cached_property
    def eval_config(self) -> EvaluationConfig:
        """The run's evaluation settings, typed (defaults where the stored config has none).

        A config written by another survfuse version keeps the settings the report reads.
        """
        try:
            return EvaluationConfig.model_validate(self.evaluation)
        except ValidationError:
            keep = ("horizons", "calibration_horizon", "calibration_bins", "ibs_points")
            ev = {k: v for k, v in self.evaluation.items() if k in (*keep, "bootstrap", "alpha")}
            return EvaluationConfig.model_validate(ev)

    @property
    def split(self) -> np.ndarray:
        return self.cohort["split"].to_numpy()

    @property
    def test_splits(self) -> list[str]:
        """The test splits with rows, internal before external."""
        return [s for s in ("internal_test", "external_test") if (self.split == s).any()]

    def outcome(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """(time [N], event [N]) of `task` in cohort row order."""
        tcol, ecol = outcome_columns(task)
        return (
            self.cohort[tcol].cast(pl.Float64).to_numpy(),
            self.cohort[ecol].cast(pl.Boolean).to_numpy(),
        )

    def group_data(self, task: str, split: str) -> GroupData:
        """Return the scoring inputs of one task x split without models, as evaluation built them.

        Outcomes, training outcomes for the IPCW weights and the stored survival grid.
        """
        time, event = self.outcome(task)
        rows, train = self.split == split, self.split == "train"
        ev = self.eval_config
        return GroupData(
            task=task,
            split=split,
            time=time[rows],
            event=event[rows],
            subject_id=self.cohort["subject_id"].cast(pl.Int64).to_numpy()[rows],
            train_time=time[train],
            train_event=event[train],
            times=np.asarray(ev.survival_times(), dtype=np.float64),
            metrics=list(ev.metrics),
            horizons=list(ev.horizons),
            cal_horizon=ev.cal_horizon,
            cal_bins=ev.calibration_bins,
        )

    @cached_property
    def null_ibs(self) -> dict[tuple[str, str], float]:
        """(task, split) -> IBS of the Kaplan-Meier null model (`null_model_scores`)."""
        out = {}
        for task in self.tasks:
            for split in ("validation", *self.test_splits):
                if (self.split == split).any() and "ibs" in self.eval_config.metrics:
                    scores = null_model_scores(self.group_data(task, split))
                    out[(task, split)] = next(iter(scores.values()), float("nan"))
        return out


SectionBuilder = Callable[[ReportContext], "Section | None"]


def img(fig: Any, alt: str) -> str:
    """Return an `<img>` tag embedding `fig` as base64 PNG, with the alt text `alt`."""
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{figures.to_png_base64(fig)}">'
    )
