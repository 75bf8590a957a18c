"""The terminal summary: fits 100 columns, short names with a legend, Δ and Holm p per model."""

from __future__ import annotations

import math

import polars as pl

from survfuse.report.tables import fmt_p
from survfuse.report.terminal import summary_lines

SPLITS = ("validation", "internal_test", "external_test")
LONG = "cross_attention_with_a_very_long_user_label"
MODELS = [  # strategy, ct encoder, ehr encoder
    ("unimodal_ct", "ct_radiomics", None),
    ("unimodal_ehr", None, "ehr_clmbr_pretrained_on_the_development_sites"),
    ("late", "ct_radiomics", "ehr_clmbr_pretrained_on_the_development_sites"),
    (LONG, "ct_radiomics", "ehr_clmbr_pretrained_on_the_development_sites"),
    ("co_attention", "ct_radiomics", "ehr_onehot"),
]
REFERENCE = {"pe_mortality": "unimodal_ehr", "mace": "unimodal_ct"}


def _metrics() -> pl.DataFrame:
    rows = []
    for t, task in enumerate(("pe_mortality", "mace")):
        for k, (strategy, ct, ehr) in enumerate(MODELS):
            model = f"{strategy}[{'+'.join(e for e in (ct, ehr) if e)}]/cox"
            is_ref = strategy == REFERENCE[task]
            for s, split in enumerate(SPLITS):
                fused = ct is not None and ehr is not None
                in_family = fused and split != "validation"
                rows.append(
                    {
                        "task": task, "split": split, "model": model, "strategy": strategy,
                        "ct_encoder": ct, "ehr_encoder": ehr, "head": "cox",
                        "unimodal": not fused, "metric": "harrell_c", "horizon": None,
                        "estimate": 0.6 + 0.01 * k + 0.001 * s + 0.1 * t,
                        "lower": 0.5, "upper": 0.8, "is_reference": is_ref,
                        "delta": math.nan if is_ref else 0.012 * (k - 1) - 0.001 * s,
                        "p_value": math.nan if is_ref else 0.01 * (k + 1),
                        "p_test": None if is_ref else "ij_z",
                        "in_family": in_family, "family_size": 12 if in_family else 0,
                        "p_holm": 10.0 ** -(k + s + 1) if in_family else math.nan,
                    }
                )  # fmt: skip
    return pl.DataFrame(rows, schema_overrides={"horizon": pl.Float64})


def test_summary_fits_100_columns_with_short_names_and_a_legend() -> None:
    metrics = _metrics()
    lines = summary_lines(metrics, width=100)
    assert max(len(line) for line in lines) <= 100
    text = "\n".join(lines)
    # the full labels are too long for a row: the legend spells out codes and cut labels
    assert "ehr_clmbr_pretrained_on_the_development_sites" in text.replace("\n", " ")
    assert f"= {LONG}" in text.replace("\n", " ")
    for task in ("pe_mortality", "mace"):
        block = text.split(f"task {task}")[1].split("\ntask ")[0]
        rows = block.split("\nmodel ")[1].split("\n\n")[0].splitlines()[1:]
        assert len(rows) == len(MODELS)  # one line per model: no name wraps onto a second row
        starred = [ln for ln in rows if " * " in ln]
        assert len(starred) == 1 and starred[0].startswith(REFERENCE[task])
        assert f"(reference: {REFERENCE[task]} [" in block.splitlines()[0]


def test_each_row_holds_its_delta_and_holm_p() -> None:
    metrics = _metrics()
    lines = summary_lines(metrics)
    for r in metrics.filter(pl.col("task") == "mace").iter_rows(named=True):
        if r["is_reference"] or r["split"] == "validation":
            continue
        row = next(
            ln
            for ln in lines[lines.index(next(x for x in lines if x.startswith("task mace"))) :]
            if ln.startswith(r["strategy"][:10]) and f"{r['estimate']:.3f}" in ln
        )
        assert f"{r['delta']:+.3f}" in row
        expected = fmt_p(r["p_holm"]) if r["in_family"] else "–"
        assert expected in row.split()


def test_footnotes_explain_the_marks() -> None:
    text = " ".join(summary_lines(_metrics()))
    assert "* reference model of the task" in text
    assert "Holm-adjusted" in text and "m = 12" in text
    assert "– = not in the multiple-testing family" in text
