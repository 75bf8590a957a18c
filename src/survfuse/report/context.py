"""What report sections read: `ReportContext` (the run folder, config, metrics, cohort, cells),
`Section` (what a builder returns) and `img` (a figure embedded as PNG)."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from survfuse.experiment.grid import model_key
from survfuse.experiment.rundir import RunDir
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


SectionBuilder = Callable[[ReportContext], "Section | None"]


def img(fig: Any, alt: str) -> str:
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{figures.to_png_base64(fig)}">'
    )
