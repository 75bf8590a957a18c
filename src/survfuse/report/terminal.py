"""The run summary printed in the terminal, in a fixed width (100 columns).

Harrell's C per model and split, with the change against each task's reference model and its
Holm-adjusted p.

Models get short names, `<strategy label> [<code>]`, where the code letter stands for the
encoder combination and a legend under the table spells the codes out; a strategy label too
long for the name column is cut with `…` and listed in the legend in full. The footnotes say
what `*`, Δ, p and `–` mean.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import polars as pl

from survfuse.report.tables import METRIC_LABELS, SPLIT_LABELS, family_note, fmt_p

__all__ = ["WIDTH", "summary_lines"]

#: Default line width of the summary (a terminal at 100 columns shows it without wrapping).
WIDTH = 100
_NAME_MAX = 28  # widest short model name before a strategy label is cut
_TEST_SPLITS = ("internal_test", "external_test")


def _encoders(row: dict[str, Any]) -> str:
    return " + ".join(e for e in (row.get("ct_encoder"), row.get("ehr_encoder")) if e)


def _short_names(models: pl.DataFrame) -> tuple[dict[str, str], list[str]]:
    """Model id -> short name, and the legend entries (encoder codes, cut labels)."""
    codes: dict[str, str] = {}
    for row in models.iter_rows(named=True):
        codes.setdefault(_encoders(row), chr(ord("a") + len(codes) % 26) * (1 + len(codes) // 26))
    with_head = models["head"].n_unique() > 1
    names: dict[str, str] = {}
    cut: list[str] = []
    for row in models.iter_rows(named=True):
        tail = f" [{codes[_encoders(row)]}]" + (f"/{row['head']}" if with_head else "")
        label = str(row["strategy"])
        room = _NAME_MAX - len(" *") - len(tail)  # room for the reference mark
        if len(label) > room:
            cut.append(f"{label[: room - 1]}… = {label}")
            label = label[: room - 1] + "…"
        names[row["model"]] = label + tail
    legend = [f"[{code}] = {enc or '-'}" for enc, code in codes.items()]
    return names, legend + list(dict.fromkeys(cut))


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if value is not None and math.isfinite(value) else "–"


def _task_rows(part: pl.DataFrame, names: dict[str, str], splits: list[str]) -> list[list[str]]:
    rows = []
    for model in dict.fromkeys(part["model"].to_list()):
        rows_of = part.filter(pl.col("model") == model)
        cells = [names[model] + (" *" if rows_of["is_reference"].any() else "")]
        for split in splits:
            hit = rows_of.filter(pl.col("split") == split)
            r = hit.row(0, named=True) if hit.height else {}
            cells.append(_num(r.get("estimate"), ".3f"))
            if split in _TEST_SPLITS:
                p_holm = r.get("p_holm") if r.get("in_family") else None
                cells += [_num(r.get("delta"), "+.3f"), fmt_p(p_holm)]
        rows.append(cells)
    return rows


def summary_lines(
    metrics: pl.DataFrame, *, metric: str = "harrell_c", width: int = WIDTH
) -> list[str]:
    """Return the terminal summary of a run's `metrics.parquet`, lines of at most `width` chars.

    Per task (in the order of the metrics table): one row per model (unimodal first), the
    metric on validation and, per test split, the estimate, Δ = estimate − reference's on the
    same resamples, and the Holm-adjusted p of that difference (`–` outside the family).
    """
    sel = metrics.filter((pl.col("metric") == metric) & pl.col("horizon").is_null())
    if not sel.height:
        return [f"no {metric} results in this run"]
    first = {m: i for i, m in enumerate(dict.fromkeys(sel["model"].to_list()))}
    sel = sel.with_columns(
        pl.col("model").replace_strict(first, return_dtype=pl.Int64).alias("_order")
    ).sort(~pl.col("unimodal"), "_order", maintain_order=True)
    names, legend = _short_names(sel.unique("model", keep="first", maintain_order=True))
    present = set(sel["split"].to_list())
    splits = [s for s in SPLIT_LABELS if s in present]

    name_w = max(len(n) for n in names.values()) + len(" *")
    widths = [name_w] + [w for s in splits for w in ((5, 6, 8) if s in _TEST_SPLITS else (10,))]
    groups = ["".ljust(name_w)]
    heads = ["model".ljust(name_w)]
    for s in splits:
        cols = ["C", "Δ", "p Holm"] if s in _TEST_SPLITS else ["C"]
        span = sum(widths[len(heads) + k] for k in range(len(cols))) + 2 * (len(cols) - 1)
        groups.append(SPLIT_LABELS[s][:span].rjust(span))
        heads += [c.rjust(widths[len(heads) + k]) for k, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                         enumerate(zip(cells, widths, strict=True))).rstrip()  # fmt: skip

    title = METRIC_LABELS.get(metric, metric)
    out = [f"{title} by model and split (95% CIs: report.html, metrics.csv)"]
    for task in dict.fromkeys(sel["task"].to_list()):
        part = sel.filter(pl.col("task") == task)
        ref = part.filter(pl.col("is_reference"))
        ref_name = names[ref["model"][0]] + " *" if ref.height else "none"
        out += ["", f"task {task} (reference: {ref_name})"]
        out += ["  ".join(groups).rstrip(), line(heads)]
        out += [line(r) for r in _task_rows(part, names, splits)]
    out += ["", "Models: <strategy> [<encoders>], where"]
    for entry in legend:
        out += textwrap.wrap(entry, width=width, initial_indent="  ", subsequent_indent="    ")
    notes = [
        f"* reference model of the task, chosen on validation {title}; Δ = {title} − the "
        "reference's on the same bootstrap resamples (seeds averaged).",
        "p Holm: Holm-adjusted p of Δ; – = not in the multiple-testing family. "
        + family_note(metrics),
    ]
    for note in notes:
        out += textwrap.wrap(note, width=width, break_on_hyphens=False)
    return out
