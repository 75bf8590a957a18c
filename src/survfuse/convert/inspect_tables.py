"""INSPECT label files -> one normalised table: one row per CT study (impression).

Two layouts of the public release are read (column names as the upstream code spells them):

- **master file**: `cohort_0.2.0_master_file_anon.csv` (som-shahlab/INSPECT_public
  `ehr/run_all_ehr.py`), one row per study with the person id, the CT time, `split` and the
  labels. The person id is `person_id` (som-shahlab/tte-pretraining
  `src/labeling/generate_tte_labels.py`), `patient_id` (INSPECT_public
  `get_model_performance.py`) or `PatientID` (INSPECT_public
  `ehr/2_generate_labels_and_features.py`); the CT time `procedure_DATETIME` (tte-pretraining
  README, `--index_time_column`), `procedure_time` or `StudyTime` (same files);
- **split files** (the 2025 AIMI release): `study_mapping_*.tsv` (`impression_id`, `person_id`,
  `image_id`, `procedure_DATETIME`, `note_DATETIME`), `labels_*.tsv` and `splits_*.tsv`
  (`impression_id`, `split`), joined on `impression_id` (INSPECT_public
  `image/radfusion3/data/dataset_1d.py` merges labels and splits on `impression_id`;
  `dataset_2d.py` reads `image_id`, which already ends in `.nii.gz`).

Labels (`pe_positive_nlp`, `{1,6,12}_month_mortality`, `{1,6,12}_month_readmission`,
`12_month_PH`; INSPECT_public `get_label_counts.py`) are `True` / `False` / `Censored` in any
capitalisation (the 2025 files write `TRUE`; INSPECT_public `dataset_1d.py` also treats `Censor`
as censored); they are normalised to `True` / `False` / `Censored`. Splits `train` / `valid` /
`test` (tte-pretraining `src/training/2_inference.py`) map to survfuse's `train` /
`validation` / `internal_test`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from survfuse.convert.tables import (
    ConversionError,
    parse_datetime,
    parse_int_ids,
    read_table,
    require_columns,
    where,
)

__all__ = [
    "ID_COLUMNS",
    "LABEL_COLUMNS",
    "MORTALITY_HORIZONS",
    "SPLIT_MAP",
    "TIME_COLUMNS",
    "InspectTables",
    "find_inspect_files",
    "read_inspect_tables",
]

ID_COLUMNS = ("person_id", "patient_id", "PatientID")
TIME_COLUMNS = ("procedure_DATETIME", "procedure_time", "StudyTime")
LABEL_COLUMNS = (
    "pe_positive_nlp",
    "1_month_mortality",
    "6_month_mortality",
    "12_month_mortality",
    "1_month_readmission",
    "6_month_readmission",
    "12_month_readmission",
    "12_month_PH",
)
#: Horizon (days) of each released mortality label: femr TimeHorizon(1 minute, N days) in
#: INSPECT_public `ehr/2_generate_labels_and_features.py`.
MORTALITY_HORIZONS = {"1_month_mortality": 30, "6_month_mortality": 180, "12_month_mortality": 365}
SPLIT_MAP = {"train": "train", "valid": "validation", "test": "internal_test"}
_LABEL_VALUES = {"true": "True", "false": "False", "censored": "Censored", "censor": "Censored"}
_PATTERNS = {"mapping": "study_mapping_*", "labels": "labels_*", "splits": "splits_*"}


@dataclass
class InspectTables:
    """The joined study table and what happened on the way (counts for the report).

    `df` columns: `_file` / `_row` (where the study's time came from, for messages),
    `impression_id`, `subject_id` Int64, `procedure_time` Datetime(us) (null when missing),
    `time_source`, `image_id`, `inspect_split` and the label columns found (normalised text).
    """

    df: pl.DataFrame
    layout: str
    files: dict[str, str]
    id_column: str
    time_column: str
    labels: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    has_image_id: bool = True


def find_inspect_files(cohort: str | Path) -> dict[str, Path]:
    """`{"master": file}` for a file, or `{"mapping", "labels", "splits"}` found in a folder."""
    cohort = Path(cohort)
    if cohort.is_file():
        return {"master": cohort}
    if not cohort.is_dir():
        raise FileNotFoundError(f"INSPECT cohort not found: {cohort}")
    found: dict[str, Path] = {}
    for key, pattern in _PATTERNS.items():
        hits = sorted(
            p for p in cohort.iterdir() if p.match(pattern + ".tsv") or p.match(pattern + ".csv")
        )
        if len(hits) > 1:
            names = ", ".join(p.name for p in hits)
            raise ConversionError(
                f"{cohort}: several {pattern} files ({names}); pass the folder of one release"
            )
        if hits:
            found[key] = hits[0]
    if len(found) == 3:
        return found
    masters = sorted(cohort.glob("cohort_*master_file*.csv"))
    if len(masters) == 1 and not found:
        return {"master": masters[0]}
    missing = [f"{_PATTERNS[k]}.tsv" for k in _PATTERNS if k not in found]
    raise ConversionError(
        f"{cohort}: expected study_mapping_*.tsv, labels_*.tsv and splits_*.tsv (missing: "
        f"{', '.join(missing)}) or one cohort_*master_file*.csv"
    )


def _pick(df: pl.DataFrame, given: str | None, options: tuple[str, ...], src: Path) -> str:
    if given is not None:
        require_columns(df, [given], src)
        return given
    for col in options:
        if col in df.columns:
            return col
    raise ConversionError(
        f"{src}: missing column {options[0]!r} (also accepted: {', '.join(options[1:])}; "
        f"columns: {', '.join(df.columns)})"
    )


def _with_rows(df: pl.DataFrame, src: Path) -> pl.DataFrame:
    return df.with_columns(
        pl.lit(str(src)).alias("_file"), pl.int_range(pl.len(), dtype=pl.Int64).alias("_row")
    )


def _normalise_labels(df: pl.DataFrame, src: Path, counts: dict[str, Any]) -> list[str]:
    """Normalise the label columns of `df` in place of their text; returns their names."""
    labels = [c for c in LABEL_COLUMNS if c in df.columns]
    missing: dict[str, int] = {}
    for col in labels:
        low = df[col].str.strip_chars().str.to_lowercase()
        bad = low.is_not_null() & ~low.is_in(list(_LABEL_VALUES))
        if bad.any():
            i = int(bad.arg_true()[0])
            raise ConversionError(
                f"{where(src, int(df['_row'][i]), col)}: unknown label {df[col][i]!r} "
                "(expected True, False or Censored in any capitalisation)"
            )
        missing[col] = int(low.is_null().sum())
        df.replace_column(df.get_column_index(col), low.replace_strict(_LABEL_VALUES, default=None))
    counts["missing_label_values"] = missing
    return labels


def _normalise_split(df: pl.DataFrame, src: Path) -> pl.DataFrame:
    low = df["split"].str.strip_chars().str.to_lowercase()
    bad = ~low.is_in(list(SPLIT_MAP)) | low.is_null()
    if bad.any():
        i = int(bad.arg_true()[0])
        raise ConversionError(
            f"{where(src, int(df['_row'][i]), 'split')}: unknown split {df['split'][i]!r} "
            "(expected train, valid or test)"
        )
    return df.with_columns(low.replace_strict(SPLIT_MAP).alias("inspect_split"))


def _dedupe(df: pl.DataFrame, src: Path, columns: list[str], what: str) -> tuple[pl.DataFrame, int]:
    """Drop exact duplicate impressions; conflicting ones are an error naming both rows."""
    if "impression_id" not in df.columns:
        return df, 0
    dup = df.filter(pl.col("impression_id").is_duplicated())
    if dup.height == 0:
        return df, 0
    for _, grp in dup.group_by("impression_id", maintain_order=True):
        for col in columns:
            if grp[col].n_unique() > 1:
                r0, r1 = int(grp["_row"][0]), int(grp["_row"][1])
                raise ConversionError(
                    f"{where(src, r1, col)}: impression {grp['impression_id'][0]} has {what} "
                    f"{grp[col][1]!r} here and {grp[col][0]!r} in row {r0 + 1}"
                )
    kept = df.unique("impression_id", keep="first", maintain_order=True)
    return kept, df.height - kept.height


def read_inspect_tables(
    cohort: str | Path,
    *,
    id_column: str | None = None,
    time_column: str | None = None,
    time_fallback: str | None = None,
    time_format: str | None = None,
) -> InspectTables:
    """Read an INSPECT release's label files into one study table (see module docs).

    Checks (each a one-line `ConversionError` naming file, row and column): required columns,
    integer person ids, ISO (or `time_format`) date-times, known label and split spellings,
    consistent duplicates and one split per subject.
    """
    files = find_inspect_files(cohort)
    counts: dict[str, Any] = {}
    if "master" in files:
        src = files["master"]
        df = _with_rows(read_table(src), src)
        counts["rows_in"] = df.height
        id_col = _pick(df, id_column, ID_COLUMNS, src)
        t_col = _pick(df, time_column, TIME_COLUMNS, src)
        require_columns(df, ["split"], src)
        labels = _normalise_labels(df, src, counts)
        df = _normalise_split(df, src)
        keep = [c for c in (id_col, t_col, time_fallback, "image_id", "split") if c in df.columns]
        df, counts["duplicate_impressions_dropped"] = _dedupe(df, src, keep + labels, "value")
        layout = "master-file"
        split_src, split_rows = src, df["_row"]
    else:
        src = files["mapping"]
        df = _with_rows(read_table(src), src)
        counts["rows_in"] = df.height
        require_columns(df, ["impression_id"], src)
        id_col = _pick(df, id_column, ID_COLUMNS, src)
        t_col = _pick(df, time_column, TIME_COLUMNS, src)
        keep = [c for c in (id_col, t_col, time_fallback, "image_id") if c in df.columns]
        df, counts["duplicate_impressions_dropped"] = _dedupe(df, src, keep, "value")
        lab_src, spl_src = files["labels"], files["splits"]
        lab = _with_rows(read_table(lab_src), lab_src)
        spl = _with_rows(read_table(spl_src), spl_src)
        require_columns(lab, ["impression_id"], lab_src)
        require_columns(spl, ["impression_id", "split"], spl_src)
        counts["labels_rows"], counts["splits_rows"] = lab.height, spl.height
        labels = _normalise_labels(lab, lab_src, counts)
        spl = _normalise_split(spl, spl_src)
        lab, counts["duplicate_label_rows_dropped"] = _dedupe(lab, lab_src, labels, "label")
        spl, counts["duplicate_split_rows_dropped"] = _dedupe(spl, spl_src, ["split"], "split")
        ids = df["impression_id"]
        counts["labels_not_in_mapping"] = int((~lab["impression_id"].is_in(ids.implode())).sum())
        counts["splits_not_in_mapping"] = int((~spl["impression_id"].is_in(ids.implode())).sum())
        lab_cols = ["impression_id", *labels]
        df = df.join(lab.select(lab_cols), on="impression_id", how="left", maintain_order="left")
        has_lab = df["impression_id"].is_in(lab["impression_id"].implode())
        counts["no_labels_row_dropped"] = int((~has_lab).sum())
        spl_keep = spl.select("impression_id", "inspect_split", pl.col("_row").alias("_srow"))
        df = df.filter(has_lab).join(
            spl_keep, on="impression_id", how="left", maintain_order="left"
        )
        counts["no_split_row_dropped"] = int(df["inspect_split"].is_null().sum())
        df = df.filter(pl.col("inspect_split").is_not_null())
        layout = "split-files"
        split_src, split_rows = spl_src, df["_srow"]
    subject = parse_int_ids(df[id_col], src, id_col, rows=df["_row"])
    when = parse_datetime(df[t_col], src, t_col, fmt=time_format, rows=df["_row"])
    primary = when.is_not_null()
    source: pl.Expr = pl.when(primary).then(pl.lit(t_col))
    if time_fallback is not None:
        require_columns(df, [time_fallback], src)
        fb = parse_datetime(df[time_fallback], src, time_fallback, fmt=time_format, rows=df["_row"])
        source = (
            pl.when(primary).then(pl.lit(t_col)).when(fb.is_not_null()).then(pl.lit(time_fallback))
        )
        when = pl.select(pl.coalesce(when, fb)).to_series()
    image = df["image_id"] if "image_id" in df.columns else pl.lit(None, dtype=pl.String)
    imp = df["impression_id"] if "impression_id" in df.columns else pl.lit(None, dtype=pl.String)
    out = df.select(
        "_file",
        "_row",
        imp.alias("impression_id"),
        subject.alias("subject_id"),
        when.alias("procedure_time"),
        source.alias("time_source"),
        image.alias("image_id"),
        "inspect_split",
        *labels,
    )
    _one_split_per_subject(out.with_columns(split_rows.alias("_srow")), split_src)
    files_out = {k: str(v) for k, v in files.items()}
    return InspectTables(
        out, layout, files_out, id_col, t_col, labels, counts, "image_id" in df.columns
    )


def _one_split_per_subject(df: pl.DataFrame, src: Path) -> None:
    first = df.group_by("subject_id", maintain_order=True).agg(
        pl.col("inspect_split").first().alias("first_split"),
        pl.col("_srow").first().alias("first_row"),
    )
    raw = {v: k for k, v in SPLIT_MAP.items()}
    bad = df.join(first, on="subject_id").filter(pl.col("inspect_split") != pl.col("first_split"))
    if bad.height:
        n = bad["subject_id"].n_unique()
        r = bad.sort("_srow").row(0, named=True)
        raise ConversionError(
            f"{where(src, r['_srow'], 'split')}: subject {r['subject_id']} is in split "
            f"{raw[r['inspect_split']]!r} here and {raw[r['first_split']]!r} in row "
            f"{r['first_row'] + 1} "
            f"({n} such subjects); INSPECT splits are per patient"
        )
