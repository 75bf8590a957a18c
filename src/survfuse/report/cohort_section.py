"""The report's cohort table ("Table 1").

Per split x site, the number of subjects, per task the events, censored subjects and median
follow-up (reverse Kaplan-Meier), and per modality how many subjects have data
(`data_manifest.parquet`).
"""

from __future__ import annotations

import html

import numpy as np
import polars as pl

from survfuse.data.cohort import outcome_columns
from survfuse.metrics.km import median_follow_up
from survfuse.report import tables
from survfuse.report.context import ReportContext, Section

__all__ = ["SPLIT_ORDER", "cohort_section", "cohort_table"]

SPLIT_ORDER = ("train", "validation", "internal_test", "external_test")
ALL_SITES = "all"


def _pct(k: int, n: int) -> str:
    return f"{k} ({100 * k / n:.0f}%)" if n else "0"


def _availability(manifest: pl.DataFrame | None) -> dict[str, pl.DataFrame]:
    """Map column name -> (subject_id, prediction_time, present) per modality.

    The column is named by the modality, and by the encoder when a modality has several.
    """
    if manifest is None or not manifest.height:
        return {}
    out = {}
    pairs = manifest.select("modality", "encoder").unique(maintain_order=True).rows()
    per_modality = {m: sum(1 for mm, _ in pairs if mm == m) for m, _ in pairs}
    for modality, encoder in pairs:
        name = f"{modality.upper()} data" + (f" ({encoder})" if per_modality[modality] > 1 else "")
        out[name] = manifest.filter(
            (pl.col("modality") == modality) & (pl.col("encoder") == encoder)
        ).select("subject_id", "prediction_time", (pl.col("status") == "present").alias("present"))
    return out


def cohort_table(
    cohort: pl.DataFrame, tasks: list[str], manifest: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Return the cohort table's display strings, one row per split x site.

    An `all` row is added per split with several sites. Columns: n; per task events (%), censored
    (%) and median follow-up in days by the reverse Kaplan-Meier method; per modality the subjects
    with usable data (%).
    """
    avail = _availability(manifest)
    keyed = cohort.with_row_index("_row")
    for name, frame in avail.items():
        keyed = keyed.join(
            frame.rename({"present": name}), on=["subject_id", "prediction_time"], how="left"
        )
    keyed = keyed.sort("_row")
    split = keyed["split"].to_numpy()
    site = keyed["site"].cast(pl.Utf8).to_numpy()
    rows = []
    for s in [s for s in SPLIT_ORDER if (split == s).any()]:
        sites = sorted(set(site[split == s]))
        for name in sites + ([ALL_SITES] if len(sites) > 1 else []):
            mask = (split == s) & ((site == name) | (name == ALL_SITES))
            n = int(mask.sum())
            rec = {"split": tables.SPLIT_LABELS.get(s, s), "site": name, "n": str(n)}
            for task in tasks:
                tcol, ecol = outcome_columns(task)
                t = keyed[tcol].cast(pl.Float64).to_numpy()[mask]
                e = keyed[ecol].cast(pl.Boolean).to_numpy()[mask]
                fu = median_follow_up(t, e) if n else float("nan")
                rec[f"{task}: events"] = _pct(int(e.sum()), n)
                rec[f"{task}: censored"] = _pct(int(n - e.sum()), n)
                rec[f"{task}: median follow-up (days)"] = f"{fu:.0f}" if np.isfinite(fu) else "–"
            for col in avail:
                rec[col] = _pct(int(keyed[col].fill_null(False).to_numpy()[mask].sum()), n)
            rows.append(rec)
    cols = list(rows[0]) if rows else ["split", "site", "n"]
    return pl.DataFrame(rows, schema=dict.fromkeys(cols, pl.Utf8))


def cohort_section(ctx: ReportContext) -> Section | None:
    """Build the "Cohort" section, or None when the cohort has no split or site column."""
    if "split" not in ctx.cohort.columns or "site" not in ctx.cohort.columns:
        return None
    man = pl.read_parquet(ctx.rd.data_manifest) if ctx.rd.data_manifest.exists() else None
    t = cohort_table(ctx.cohort, ctx.tasks, man)
    desc = (
        "Subjects per split and site. Events and censored: subjects whose event was observed or "
        "who were censored (percent of the row's n). Median follow-up: the median of the reverse "
        "Kaplan-Meier curve (censoring treated as the event, events as censored; Schemper & "
        "Smith 1996), '–' when more than half of the row had the event. Data columns: subjects "
        "with usable data for that modality at or before prediction_time (the rest are masked "
        "as missing, never imputed; see the Data section for reasons)."
    )
    return Section(
        "Cohort",
        f"<p>{html.escape(desc)}</p>" + tables.to_html(t),
        desc + "\n\n" + tables.to_markdown(t),
    )
