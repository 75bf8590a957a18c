"""Report tables from a run's `metrics.parquet`: estimates with CIs and comparisons.

Every table is a polars DataFrame of display strings, rendered to Markdown, HTML or a rich
table by the helpers below. Models are shown as `strategy (encoders)`; the reference model of
each task is marked with `*`.
"""

from __future__ import annotations

import html
import math
from typing import Any

import polars as pl

__all__ = [
    "METRIC_LABELS",
    "P_TEST_LABELS",
    "SLOPE_RANGE",
    "SPLIT_LABELS",
    "c_index_table",
    "calibration_flags",
    "calibration_summary",
    "comparison_table",
    "family_note",
    "fmt_ci",
    "fmt_holm",
    "fmt_p",
    "md_escape",
    "metric_table",
    "model_label",
    "model_order",
    "rich_table",
    "short_model",
    "task_order",
    "tests_note",
    "to_html",
    "to_markdown",
]

SPLIT_LABELS = {
    "validation": "validation",
    "internal_test": "internal test",
    "external_test": "external test",
}
METRIC_LABELS = {
    "harrell_c": "Harrell C",
    "uno_c": "Uno C",
    "td_auc": "td-AUC",
    "ibs": "IBS",
    "cal_slope": "calibration slope",
    "cal_intercept": "calibration intercept",
    "ici": "ICI",
    "e50": "E50",
    "calibration": "calibration error",  # runs evaluated before the calibration statistics
}
# How each p-value of a comparison was made (`p_test` of metrics.parquet).
P_TEST_LABELS = {"ij_z": "IJ z", "bootstrap_z": "bootstrap z"}


def fmt_ci(est: float | None, lo: float | None, hi: float | None, digits: int = 3) -> str:
    """`0.712 [0.680, 0.741]`; `–` for a missing estimate, no interval when it is undefined."""
    if est is None or not math.isfinite(est):
        return "–"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{est:.{digits}f}"
    return f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_p(p: float | None) -> str:
    """`0.034`; below 0.001 in scientific notation (`2.1e-08`): a z-test's p is not floored."""
    if p is None or not math.isfinite(p):
        return "–"
    if p < 1e-300:
        return "<1e-300"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def fmt_holm(p: float | None, family_size: int | None) -> str:
    """Holm-adjusted p with the size m of its family, `0.012 (m = 48)`; `–` outside it."""
    if p is None or not math.isfinite(p) or not family_size:
        return "–"
    return f"{fmt_p(p)} (m = {family_size})"


def model_label(row: dict[str, Any], *, with_head: bool = False) -> str:
    """`late (ct_radiomics + ehr_onehot)`; the reference model gets a trailing `*`."""
    encs = " + ".join(e for e in (row.get("ct_encoder"), row.get("ehr_encoder")) if e)
    label = f"{row['strategy']} ({encs})" if encs else str(row["strategy"])
    if with_head:
        label += f" [{row['head']}]"
    if row.get("is_reference"):
        label += " *"
    return label


def short_model(model: str) -> str:
    """Shorten `late[ct_radiomics+ehr_onehot]/cox` to `late (ct_radiomics + ehr_onehot)`."""
    name, _, rest = model.partition("[")
    encs = rest.split("]")[0].replace("+", " + ") if rest else ""
    return f"{name} ({encs})" if encs else name


def task_order(metrics: pl.DataFrame) -> list[str]:
    """Tasks in the order of the main table (the config's order)."""
    return list(dict.fromkeys(metrics["task"].to_list()))


def _with_labels(metrics: pl.DataFrame) -> pl.DataFrame:
    with_head = metrics["head"].n_unique() > 1
    labels = [model_label(r, with_head=with_head) for r in metrics.iter_rows(named=True)]
    return metrics.with_columns(pl.Series("label", labels, dtype=pl.Utf8))


def model_order(metrics: pl.DataFrame) -> list[str]:
    # Unimodal baselines first, then fused models, each in order of first appearance (the
    # metrics table is in config order).
    """Return the models in display order: unimodal baselines first, then fused models."""
    seen: dict[str, bool] = {}
    for r in metrics.iter_rows(named=True):
        seen.setdefault(r["model"], bool(r["unimodal"]))
    return [m for m in seen if seen[m]] + [m for m in seen if not seen[m]]


def metric_table(
    metrics: pl.DataFrame, metric: str = "harrell_c", horizon: float | None = None
) -> pl.DataFrame:
    """Rows task x model, one column per split: `estimate (lower–upper)`."""
    sel = metrics.filter(pl.col("metric") == metric)
    if horizon is not None:
        sel = sel.filter(pl.col("horizon") == horizon)
    elif sel.height and sel["horizon"].null_count() < sel.height:
        sel = sel.filter(pl.col("horizon") == sel["horizon"].drop_nulls().min())
    sel = _with_labels(sel)
    splits = [s for s in SPLIT_LABELS if s in set(sel["split"].to_list())]
    order = {m: i for i, m in enumerate(model_order(sel))}
    out: list[dict[str, str]] = []
    for task in dict.fromkeys(sel["task"].to_list()):
        part = sel.filter(pl.col("task") == task)
        for model in sorted(dict.fromkeys(part["model"].to_list()), key=lambda m: order[m]):
            rows = part.filter(pl.col("model") == model)
            rec = {"task": str(task), "model": str(rows["label"][0])}
            for s in splits:
                r = rows.filter(pl.col("split") == s)
                rec[SPLIT_LABELS[s]] = (
                    fmt_ci(r["estimate"][0], r["lower"][0], r["upper"][0]) if r.height else "–"
                )
            out.append(rec)
    cols = ["task", "model", *[SPLIT_LABELS[s] for s in splits]]
    return (
        pl.DataFrame(out, schema={c: pl.Utf8 for c in cols})
        if out
        else pl.DataFrame(schema={c: pl.Utf8 for c in cols})
    )


def c_index_table(metrics: pl.DataFrame) -> pl.DataFrame:
    """Return the headline table: Harrell's C with CIs, strategies x splits x tasks."""
    return metric_table(metrics, "harrell_c")


def comparison_table(metrics: pl.DataFrame, metric: str = "harrell_c") -> pl.DataFrame:
    """Return the change against each task's reference model, per split.

    `delta (CI)`, p with the test that made it, and the Holm-adjusted p with its family size (`–`:
    not in the pre-specified family, e.g. every validation comparison).
    """
    sel = metrics.filter((pl.col("metric") == metric) & ~pl.col("is_reference"))
    if sel.height and sel["horizon"].null_count() < sel.height:
        sel = sel.filter(pl.col("horizon") == sel["horizon"].drop_nulls().min())
    sel = _with_labels(sel)
    order = {m: i for i, m in enumerate(model_order(sel))}
    tasks = {t: i for i, t in enumerate(task_order(metrics))}
    out = []
    for r in sorted(
        sel.iter_rows(named=True),
        key=lambda r: (tasks[r["task"]], list(SPLIT_LABELS).index(r["split"]), order[r["model"]]),
    ):
        out.append(
            {
                "task": r["task"],
                "split": SPLIT_LABELS[r["split"]],
                "model": r["label"],
                "Δ vs reference": fmt_ci(r["delta"], r["delta_lower"], r["delta_upper"]),
                "p": fmt_p(r["p_value"]),
                "test": P_TEST_LABELS.get(str(r.get("p_test")), "bootstrap"),
                "p (Holm, family size m)": fmt_holm(r["p_holm"], r.get("family_size")),
            }
        )
    cols = ["task", "split", "model", "Δ vs reference", "p", "test", "p (Holm, family size m)"]
    return (
        pl.DataFrame(out, schema={c: pl.Utf8 for c in cols})
        if out
        else pl.DataFrame(schema={c: pl.Utf8 for c in cols})
    )


def family_note(metrics: pl.DataFrame) -> str:
    """One sentence on the Holm family of a metrics table: what is in it and its size m."""
    if "in_family" not in metrics.columns:
        return "Holm: adjusted over the models compared within each task and split."
    fam = metrics.filter(pl.col("in_family"))
    if not fam.height:
        return "Holm: no comparison is in the pre-specified family (p_holm not computed)."
    labels = ", ".join(METRIC_LABELS.get(m, m) for m in dict.fromkeys(fam["metric"].to_list()))
    splits = " and ".join(SPLIT_LABELS[s] for s in SPLIT_LABELS if s in set(fam["split"]))
    who = "every fused model" if not fam["unimodal"].any() else "every model"
    m = int(fam["family_size"].max() or 0)  # type: ignore[arg-type]
    return (
        f"Holm: adjusted over the pre-specified family, {labels} of {who} against its task's "
        f"reference on {splits}, all tasks together: m = {m} comparisons. Validation is never "
        "in the family (the reference is chosen on it)."
    )


def tests_note(metrics: pl.DataFrame) -> str:
    """Which tests made the p-values of a metrics table (the `p_test` column)."""
    used = (
        [t for t in metrics["p_test"].drop_nulls().unique().to_list() if t]
        if "p_test" in metrics.columns
        else []
    )
    if not used:
        return "p: two-sided bootstrap p-value (floored at 2 / (B + 1))."
    parts = {
        "ij_z": "IJ z = paired z-test with the infinitesimal-jackknife variance of the "
        "difference (for Harrell's C the contrast test of R survival::concordance(fit, fit_ref))",
        "bootstrap_z": "bootstrap z = z-test with the bootstrap standard deviation of the "
        "difference",
    }
    return (
        "p: two-sided, from the test named in the test column: "
        + "; ".join(parts[t] for t in sorted(used) if t in parts)
        + "."
    )


def references(metrics: pl.DataFrame) -> dict[str, str]:
    """Task -> display label of its reference model."""
    sel = _with_labels(metrics.filter(pl.col("is_reference")))
    found = {r["task"]: r["label"].rstrip(" *") for r in sel.iter_rows(named=True)}
    return {t: found[t] for t in task_order(metrics) if t in found}  # main-table order


def md_escape(text: str) -> str:
    """Return `text` safe inside a Markdown table cell.

    HTML-significant characters become entities (a site or model name must never become markup) and
    `|` is escaped.
    """
    return html.escape(text, quote=False).replace("|", "\\|")


def to_markdown(df: pl.DataFrame) -> str:
    """Return `df` as a GitHub-flavoured Markdown table."""
    cols = df.columns
    lines = [
        "| " + " | ".join(md_escape(c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in df.iter_rows():
        lines.append("| " + " | ".join(md_escape(str(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def to_html(df: pl.DataFrame, *, caption: str | None = None) -> str:
    """Return `df` as an HTML table (escaped); repeated task cells are blanked for readability."""
    cols = df.columns
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    last_task = None
    for row in df.iter_rows(named=True):
        cells = []
        for c in cols:
            v = str(row[c])
            if c == "task":
                v, last_task = ("" if v == last_task else v), v
            cells.append(f"<td>{html.escape(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def rich_table(df: pl.DataFrame, *, title: str | None = None) -> Any:
    """Return a `rich.table.Table` of the display frame (for the terminal)."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in df.columns:
        table.add_column(c, overflow="fold")
    last_task = None
    for row in df.iter_rows(named=True):
        values = []
        for c in df.columns:
            v = str(row[c])
            if c == "task":
                v, last_task = ("" if v == last_task else v), v
            values.append(v)
        table.add_row(*values)
    return table


#: A calibration slope outside this range is flagged in the report (risks too extreme below,
#: too timid above; the range external-validation guidance commonly accepts).
SLOPE_RANGE = (0.8, 1.2)


NullIBS = dict[tuple[str, str], float]  # (task, split) -> IBS of the Kaplan-Meier null model


def _calibration_rows(
    metrics: pl.DataFrame, horizon: float, null_ibs: NullIBS | None
) -> list[dict[str, Any]]:
    """Return, per test split x model (main-table order), the calibration rows.

    Slope, intercept and IBS rows (None if absent), the null model's IBS and the reasons to flag it.
    """
    lo, hi = SLOPE_RANGE
    sel = _with_labels(metrics.filter(pl.col("split").is_in(["internal_test", "external_test"])))
    order = {m: i for i, m in enumerate(model_order(sel))}
    tasks = {t: i for i, t in enumerate(task_order(metrics))}
    keys = sel.select("task", "split", "model").unique()
    out = []
    for task, split, model in sorted(
        keys.rows(), key=lambda k: (tasks[k[0]], list(SPLIT_LABELS).index(k[1]), order[k[2]])
    ):
        part = sel.filter(
            (pl.col("task") == task) & (pl.col("split") == split) & (pl.col("model") == model)
        )

        def row(metric: str, h: float | None, part: pl.DataFrame = part) -> dict[str, Any] | None:
            r = part.filter(pl.col("metric") == metric)
            if h is not None:
                r = r.filter(pl.col("horizon") == h)
            return r.row(0, named=True) if r.height else None

        slope, ibs = row("cal_slope", horizon), row("ibs", None)
        null = (null_ibs or {}).get((task, split), math.nan)
        reasons = []
        if slope is not None and slope["estimate"] is not None:
            if slope["estimate"] < lo:
                reasons.append("risks too extreme (slope < 0.8: overfitted or shifted)")
            elif slope["estimate"] > hi:
                reasons.append("risks too timid (slope > 1.2)")
        if ibs is not None and math.isfinite(null) and (ibs["estimate"] or 0.0) > null:
            reasons.append("IBS worse than the Kaplan-Meier null model")
        out.append(
            {
                "task": task,
                "split": split,
                "label": part["label"][0],
                "slope": slope,
                "intercept": row("cal_intercept", horizon),
                "ibs": ibs,
                "null": null,
                "reasons": reasons,
            }
        )
    return out


def _ci_of(r: dict[str, Any] | None, digits: int = 3) -> str:
    return fmt_ci(r["estimate"], r["lower"], r["upper"], digits) if r else "–"


def _ibs_vs_null(r: dict[str, Any]) -> str:
    null = r["null"]
    return f"{_ci_of(r['ibs'])} vs {null:.3f}" if math.isfinite(null) else _ci_of(r["ibs"])


def calibration_flags(
    metrics: pl.DataFrame, horizon: float, null_ibs: NullIBS | None = None
) -> pl.DataFrame:
    """Return the models to distrust as risk predictors on a test split.

    Flagged: calibration slope at `horizon` outside `SLOPE_RANGE`, or (with `null_ibs`) an IBS above
    the Kaplan-Meier null model's. Columns task, split, model, calibration slope [CI], IBS [CI] vs
    the null model's, meaning; empty when nothing is flagged.
    """
    rows = [
        {
            "task": r["task"],
            "split": SPLIT_LABELS.get(r["split"], r["split"]),
            "model": r["label"],
            "calibration slope": _ci_of(r["slope"], 2),
            "IBS vs KM null": _ibs_vs_null(r),
            "meaning": "; ".join(r["reasons"]),
        }
        for r in _calibration_rows(metrics, horizon, null_ibs)
        if r["reasons"]
    ]
    cols = ["task", "split", "model", "calibration slope", "IBS vs KM null", "meaning"]
    return pl.DataFrame(rows, schema=dict.fromkeys(cols, pl.String))


def calibration_summary(
    metrics: pl.DataFrame, horizon: float, null_ibs: NullIBS | None = None
) -> pl.DataFrame:
    """Return every model on every test split with its calibration and IBS.

    Calibration slope and intercept at `horizon` with CIs, IBS with CI beside the Kaplan-Meier null
    model's IBS, and a flag column.
    """
    rows = [
        {
            "task": r["task"],
            "split": SPLIT_LABELS.get(r["split"], r["split"]),
            "model": r["label"],
            "slope [CI]": _ci_of(r["slope"], 2),
            "intercept [CI]": _ci_of(r["intercept"], 2),
            "IBS [CI]": _ci_of(r["ibs"]),
            "IBS of KM null": f"{r['null']:.3f}" if math.isfinite(r["null"]) else "–",
            "flag": "⚑ " + "; ".join(r["reasons"]) if r["reasons"] else "",
        }
        for r in _calibration_rows(metrics, horizon, null_ibs)
    ]
    cols = ["task", "split", "model", "slope [CI]", "intercept [CI]", "IBS [CI]"]
    cols += ["IBS of KM null", "flag"]
    return pl.DataFrame(rows, schema=dict.fromkeys(cols, pl.String))
