"""`conversion_report.md`: every count of a conversion, step by step, as Markdown tables."""

from __future__ import annotations

from typing import Any

import polars as pl

__all__ = ["render_report"]

_MAX_LISTED = 20


def _n(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_n(c) for c in r) + " |" for r in rows]
    return [*out, ""]


def _cohort_steps(c: dict[str, Any], inputs: dict[str, Any]) -> list[tuple[Any, ...]]:
    files = inputs["files"]
    main = files.get("master") or files.get("mapping")
    rows: list[tuple[Any, ...]] = [(f"study rows read from `{main}`", c.get("rows_in"), "")]
    rows.append(
        ("duplicate impressions dropped", c.get("duplicate_impressions_dropped"), "identical rows")
    )
    if inputs["layout"] == "split-files":
        rows += [
            (f"label rows read from `{files['labels']}`", c.get("labels_rows"), ""),
            ("duplicate label rows dropped", c.get("duplicate_label_rows_dropped"), "identical"),
            ("label rows whose impression is not in the mapping", c.get("labels_not_in_mapping"), "ignored"),
            (f"split rows read from `{files['splits']}`", c.get("splits_rows"), ""),
            ("duplicate split rows dropped", c.get("duplicate_split_rows_dropped"), "identical"),
            ("split rows whose impression is not in the mapping", c.get("splits_not_in_mapping"), "ignored"),
            ("studies without a labels row: dropped", c.get("no_labels_row_dropped"), ""),
            ("studies without a split row: dropped", c.get("no_split_row_dropped"), ""),
        ]  # fmt: skip
    fallback = inputs.get("time_fallback")
    rows += [
        (f"studies without a CT time (`{inputs['time_column']}`): dropped",
         c.get("null_time_dropped"), f"after the fallback `{fallback}`" if fallback else "no fallback"),
        ("CT time taken from the fallback", c.get("time_from_fallback"), fallback or "-"),
        ("duplicate (subject_id, prediction_time): dropped", c.get("duplicate_keys_dropped"),
         f"lowest impression_id kept; {c.get('duplicate_keys_conflicting_labels', 0)} with "
         "conflicting labels"),
        ("**cohort rows**", c.get("rows_out"), f"{_n(c.get('subjects'))} subjects"),
    ]  # fmt: skip
    return rows


def _crosscheck(cc: dict[str, Any], mism: pl.DataFrame | None) -> list[str]:
    lines = [
        "Each released horizon label recomputed from the MEDS death events (femr's rule: True =",
        "a death in (prediction_time + 1 min, + N days]; Censored = the timeline ends before",
        "+ N days; else False). Every mismatching row is in `label_crosscheck.parquet`.",
        "",
    ]
    if not cc:
        return [*lines, "No mortality label columns in the cohort: nothing to cross-check.", ""]
    rows = []
    for col, s in cc.items():
        rows.append((f"`{col}`", s["horizon_days"], s["compared"], s["mismatches"],
                     s["true_without_death"], s["false_with_death"]))  # fmt: skip
    lines += _table(
        ("label", "horizon (days)", "compared", "mismatches", "TRUE without a death in horizon",
         "FALSE with a death in horizon"),
        rows,
    )  # fmt: skip
    for col, s in cc.items():
        derived = ("True", "False", "Censored")
        grid = [(f"released {r}", *(s["table"].get(r, {}).get(d, 0) for d in derived))
                for r in ("True", "False", "Censored", "None") if r in s["table"]]  # fmt: skip
        lines += [f"`{col}` (rows: released, columns: derived):", ""]
        lines += _table(("", *(f"derived {d}" for d in derived)), grid)
    if mism is not None and mism.height:
        lines += [f"First {min(_MAX_LISTED, mism.height)} of {mism.height:,} mismatches:", ""]
        shown = mism.head(_MAX_LISTED)
        lines += _table(
            ("impression_id", "subject_id", "prediction_time", "label", "released", "derived",
             "death (days)", "follow-up (days)"),
            [(str(r[0]), str(r[1]), *r[2:]) for r in shown.iter_rows()],
        )  # fmt: skip
    return lines


def render_report(counts: dict[str, Any], mismatches: pl.DataFrame | None = None) -> str:
    """Render the Markdown report of a conversion's `counts` (see `convert_inspect`)."""
    inp, c = counts["inputs"], counts["cohort"]
    lines = [
        "# INSPECT conversion report",
        "",
        f"Written by survfuse {counts['version']} (`{counts['etl']}`). Counts at every step; "
        "the same numbers are in `conversion.json`.",
        "",
        "## Inputs",
        "",
    ]
    lines += _table(("input", "value"), [
        ("layout", inp["layout"]),
        *[(f"file ({k})", f"`{v}`") for k, v in inp["files"].items()],
        ("person id column", f"`{inp['id_column']}`"),
        ("CT time column", f"`{inp['time_column']}`"),
        ("CT time fallback", inp["time_fallback"] or "none (rows without a time are dropped)"),
        ("date-time format", inp["time_format"]),
        ("MEDS", f"`{inp['meds']}`"),
        ("CT root", f"`{inp['ct_root']}`" if inp["ct_root"] else "none (no CT index)"),
        ("site", inp["site"]),
    ])  # fmt: skip
    lines += ["## Cohort rows, step by step", ""]
    lines += _table(("step", "rows", "note"), _cohort_steps(c, inp))
    miss = {k: v for k, v in c.get("missing_label_values", {}).items() if v}
    if miss:
        lines += ["Empty label values (kept as null): "
                  + ", ".join(f"`{k}` {v:,}" for k, v in miss.items()), ""]  # fmt: skip
    lines += ["## Splits (INSPECT's, per patient)", ""]
    meds_name = {"train": "train", "validation": "tuning", "internal_test": "held_out"}
    lines += _table(("inspect_split", "rows", "subjects", "MEDS subject_splits"),
                    [(k, v["rows"], v["subjects"], meds_name.get(k, k))
                     for k, v in counts.get("splits", {}).items()])  # fmt: skip
    m = counts.get("meds", {})
    lines += ["## MEDS", ""]
    lines += _table(("count", "value"), [
        ("shards (layouts)", f"{_n(m.get('shards'))} ({', '.join(m.get('layouts', []))})"),
        ("patients (nested rows)", m.get("patients")),
        ("events", m.get("events")),
        ("measurements read", m.get("measurements")),
        ("  of which static", m.get("static")),
        ("NaN numeric values written as null", m.get("nan")),
        ("rows written", m.get("rows_written")),
        ("distinct codes", m.get("codes")),
        ("subjects with timed events", m.get("subjects_with_events")),
        ("MEDS subjects not in the cohort (kept)", m.get("subjects_not_in_cohort")),
        ("cohort subjects without any MEDS event", m.get("cohort_subjects_without_events")),
    ])  # fmt: skip
    o = counts.get("outcomes", {})
    lines += ["## Outcome `pe_mortality` (derived from MEDS death events)", ""]
    lines += [
        "Event: the first death event strictly after prediction_time; censored at the subject's",
        "last timed event otherwise (as som-shahlab/tte-pretraining derives mortality times).",
        "",
    ]
    lines += _table(("count", "value"), [
        ("death codes", ", ".join(f"`{d}`" for d in o.get("death_codes", []))),
        ("death events found", o.get("death_events")),
        ("subjects with a death event", o.get("subjects_with_death")),
        ("static (untimed) death events ignored", m.get("static_deaths")),
        ("rows with the event", o.get("rows_event")),
        ("rows censored", o.get("rows_censored")),
        ("rows with a death at or before prediction_time (ignored)",
         o.get("rows_death_at_or_before_prediction")),
        ("rows with no event after prediction_time (time = 0)", o.get("rows_no_followup_time_0")),
        ("rows whose subject has no MEDS event", o.get("rows_subject_without_ehr")),
        ("median time (days)", o.get("median_time_days")),
    ])  # fmt: skip
    lines += ["## Released labels against the derived times", ""]
    lines += _crosscheck(counts.get("crosscheck", {}), mismatches)
    ct = counts.get("ct")
    lines += ["## CT studies", ""]
    if ct is None:
        lines += ["No CT root given: no CT index written (an EHR-only study).", ""]
    else:
        lines += _table(("count", "value"), [
            ("CT folder", f"`{ct['root']}`"),
            ("cohort rows with an image_id", ct["rows_with_image_id"]),
            ("cohort rows without an image_id", ct["rows_without_image_id"]),
            ("CT files found (in ct_index.parquet)", ct["found"]),
            ("CT files not found (not indexed: CT missing for that row)", ct["not_found"]),
        ])  # fmt: skip
        if ct["not_found_examples"]:
            lines += [
                "Not found, e.g.: " + ", ".join(f"`{p}`" for p in ct["not_found_examples"]),
                "",
            ]
    out = counts.get("output", {})
    lines += ["## Output", ""]
    lines += _table(("file", "rows"), [
        ("`cohort.parquet`", out.get("cohort_rows")),
        ("`ct_index.parquet`", out.get("ct_index_rows")),
        ("`meds/data/*.parquet`", out.get("meds_rows")),
        ("`label_crosscheck.parquet`", out.get("label_mismatch_rows")),
    ])  # fmt: skip
    lines += [
        "## Not done by survfuse yet",
        "",
        "`survfuse run` makes its own seeded random splits (`splits:` in the study config); it",
        "does not yet read INSPECT's predefined split. The split is kept as the cohort column",
        "`inspect_split` and in `meds/metadata/subject_splits.parquet` for when it does.",
        "",
    ]
    return "\n".join(lines)
