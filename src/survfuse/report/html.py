"""`build_report(run_dir)`: one self-contained `report.html` and a `summary.md`.

The HTML page embeds its PNG figures as base64; `summary.md` has the same tables.

Sections: the cohort table (Table 1), the headline C-index table (strategies x splits x tasks,
with CIs), the data (present / missing / failed per site x split x modality, with reasons), the
change against each task's reference (best unimodal) model as a table and a forest plot, the
other metrics, risk groups (Kaplan-Meier by development-tertile risk group), calibration,
td-AUC(t) and Brier(t), training curves, modality contributions, failed cells, a glossary and
the resolved config. Later analyses add sections by appending a builder to `SECTION_BUILDERS`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any

import polars as pl
import yaml

import survfuse
from survfuse.experiment.rundir import RunDir, write_text
from survfuse.report import figures, tables
from survfuse.report.calibration_section import calibration_section
from survfuse.report.cohort_section import cohort_section
from survfuse.report.context import ReportContext, Section, SectionBuilder, img
from survfuse.report.glossary import glossary_section
from survfuse.report.imbalance_section import imbalance_section
from survfuse.report.km_section import km_section
from survfuse.report.time_curves import time_curves_section
from survfuse.report.training_section import training_section

__all__ = ["SECTION_BUILDERS", "ReportContext", "Section", "build_report"]


def _headline(ctx: ReportContext) -> Section:
    t = tables.c_index_table(ctx.metrics)
    refs = tables.references(ctx.metrics)
    note = "; ".join(f"{k}: {v}" for k, v in refs.items())
    level = 100 * (1 - float(ctx.evaluation.get("alpha", 0.05)))
    n_boot = int(ctx.metrics["n_boot"].cast(pl.Int64).fill_null(0).max() or 0)  # type: ignore[arg-type]
    desc = (
        f"Harrell's C, mean over seeds, with {level:.0f}% subject-level bootstrap intervals "
        f"({n_boot} resamples). * marks each task's reference "
        f"model (best unimodal on validation): {note}."
    )
    return Section(
        "C-index by strategy, split and task",
        f"<p>{html.escape(desc)}</p>" + tables.to_html(t),
        desc + "\n\n" + tables.to_markdown(t),
    )


def _comparison(ctx: ReportContext) -> Section:
    t = tables.comparison_table(ctx.metrics)
    fig = figures.forest_plot(ctx.metrics)
    desc = (
        "Change in Harrell's C against each task's reference model, with the percentile "
        "interval of the difference on the same bootstrap resamples (paired). Figure: test "
        "splits only (the reference is chosen on validation), the Holm-adjusted p at each "
        "row's right ('–': not in the Holm family); the table also lists validation. "
        f"{tables.tests_note(ctx.metrics)} {tables.family_note(ctx.metrics)}"
    )
    return Section(
        "Change against the best unimodal baseline",
        f"<p>{html.escape(desc)}</p>" + img(fig, "forest plot") + tables.to_html(t),
        desc + "\n\n" + tables.to_markdown(t),
    )


def _other_metrics(ctx: ReportContext) -> Section | None:
    parts_html, parts_md = [], []
    for metric in ("uno_c", "td_auc", "ibs", "calibration"):  # calibration: older runs only
        sel = ctx.metrics.filter(pl.col("metric") == metric)
        if not sel.height:
            continue
        horizons = sorted({h for h in sel["horizon"].to_list() if h is not None}) or [None]
        for h in horizons:
            t = tables.metric_table(ctx.metrics, metric, h)
            name = tables.METRIC_LABELS[metric] + (f" at {h:g} days" if h is not None else "")
            if metric == "ibs":
                name = f"IBS up to {h:g} days"
            parts_html.append(f"<h3>{html.escape(name)}</h3>" + tables.to_html(t))
            parts_md.append(f"### {name}\n\n" + tables.to_markdown(t))
    if not parts_html:
        return None
    desc = "Lower is better for IBS and calibration error; higher for the others."
    return Section(
        "Other metrics",
        f"<p>{desc}</p>" + "".join(parts_html),
        desc + "\n\n" + "\n".join(parts_md),
    )


def _failed(ctx: ReportContext) -> Section | None:
    bad = [c for c in ctx.cells if c["status"] != "done"]
    if not bad:
        return None
    t = pl.DataFrame(
        {
            "cell": [c["cell_id"] for c in bad],
            "status": [c["status"] for c in bad],
            "error": [str(c.get("error") or "") for c in bad],
        }
    )
    return Section("Cells that did not finish", tables.to_html(t), tables.to_markdown(t))


def _data(ctx: ReportContext) -> Section | None:
    """Build the "Data" section, or None when the run has no data manifest.

    Counts per site x split x modality x encoder (present / missing / failed) and reasons.
    """
    path = ctx.rd.data_manifest
    if not path.exists():
        return None
    man = pl.read_parquet(path)
    keys = [c for c in ("site", "split", "modality", "encoder") if c in man.columns]
    counts = (
        man.group_by(keys)
        .agg(
            pl.len().alias("rows"),
            *[(pl.col("status") == st).sum().alias(st) for st in ("present", "missing", "failed")],
        )
        .sort(keys)
    )
    reasons = (
        man.filter(pl.col("status") != "present")
        .group_by(["modality", "encoder", "status", "reason"])
        .agg(pl.len().alias("rows"))
        .sort(["modality", "encoder", "rows"], descending=[False, False, True])
        .head(50)
    )
    desc = (
        "Every cohort row and modality: present (used), missing (nothing to use at or before "
        "prediction_time) or failed (data found but refused, e.g. unreadable, not a CT, too few "
        "slices); a row missing a modality is masked, never imputed. Full list: "
        "data_manifest.parquet."
    )
    body = f"<p>{html.escape(desc)}</p>" + tables.to_html(counts)
    md = f"{desc}\n\n" + tables.to_markdown(counts)
    if reasons.height:
        body += tables.to_html(reasons, caption="Why data are missing or failed")
        md += "\nWhy data are missing or failed:\n\n" + tables.to_markdown(reasons)
    return Section("Data", body, md)


def _config(ctx: ReportContext) -> Section:
    text = ctx.rd.config.read_text() if ctx.rd.config.exists() else ""
    return Section("Config", f"<pre>{html.escape(text)}</pre>", f"```yaml\n{text}```\n")


SECTION_BUILDERS: list[SectionBuilder] = [
    cohort_section,
    _headline,
    _data,
    _comparison,
    _other_metrics,
    km_section,
    calibration_section,
    time_curves_section,
    training_section,
    imbalance_section,
    _failed,
    glossary_section,
    _config,
]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1040px;
padding:16px 24px;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;
margin-top:2em}h3{font-size:1em}
table{border-collapse:collapse;font-size:12px;margin:8px 0;width:100%;table-layout:auto}
th,td{border-bottom:1px solid #e5e5e5;padding:3px 6px;text-align:left;vertical-align:top;
overflow-wrap:break-word}
th{background:#f5f5f5}caption{text-align:left;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:8px 0}
pre{background:#f7f7f7;padding:8px;font-size:11px;white-space:pre-wrap;overflow-wrap:anywhere}
.meta{color:#666;font-size:12px}
"""


def _load_cells(rd: RunDir) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    if not rd.cells.exists():
        return cells
    for d in sorted(p for p in rd.cells.iterdir() if p.is_dir() and not p.name.startswith(".")):
        spec_f, st_f = d / "spec.json", d / "status.json"
        if not (spec_f.exists() and st_f.exists()):
            continue
        spec = json.loads(spec_f.read_text())
        st = json.loads(st_f.read_text())
        spec.update(status=st.get("status"), error=st.get("error"), seconds=st.get("seconds"))
        cells.append(spec)
    return cells


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write `report.html` and `summary.md` into `run_dir`; returns both paths."""
    rd = RunDir(run_dir)
    if not rd.metrics.exists():
        raise FileNotFoundError(f"{rd.root}: no metrics.parquet; run `survfuse run` first")
    config = rd.read_config_yaml()
    ctx = ReportContext(
        rd=rd,
        config=config,
        metrics=pl.read_parquet(rd.metrics),
        cohort=pl.read_parquet(rd.cohort),
        cells=_load_cells(rd),
    )
    sections = [s for b in SECTION_BUILDERS if (s := b(ctx)) is not None]
    name = str(config.get("name", "experiment"))
    n_done = sum(c["status"] == "done" for c in ctx.cells)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = (
        f"survfuse {survfuse.__version__} · {stamp} · {n_done}/{len(ctx.cells)} cells finished · "
        f"tasks: {', '.join(ctx.tasks)} · run folder: {rd.root}"
    )
    toc = "".join(
        f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections)
    )
    body = "".join(
        f'<h2 id="s{i}">{html.escape(s.title)}</h2>{s.html}' for i, s in enumerate(sections)
    )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>survfuse report: {html.escape(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>survfuse report: {html.escape(name)}</h1><p class='meta'>{html.escape(meta)}</p>"
        f"<ul>{toc}</ul>{body}</body></html>\n"
    )
    md = [
        f"# survfuse report: {tables.md_escape(name)}\n",
        f"{tables.md_escape(meta)}\n",
        "Figures: see report.html.\n",
    ]
    md += [f"## {s.title}\n\n{s.markdown}\n" for s in sections if s.markdown]
    write_text(rd.report, page)
    write_text(rd.summary, "\n".join(md))
    return rd.report, rd.summary


def config_dict(text: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(text) or {}
    return data
