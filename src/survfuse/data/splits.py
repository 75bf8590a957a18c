"""Subject-level splits: train / validation / internal test / external test.

Splits are made per subject (never per row), so a subject with several prediction times sits in
one split. Development-site subjects are split at random (seeded) within event strata; every
subject of an external site goes to "external_test". Splits are saved next to a run and reloaded,
never recomputed, and every helper asserts that no subject appears in two splits.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from survfuse.data.cohort import Cohort, validate_cohort
from survfuse.registry import look_up_option

__all__ = [
    "EVAL_SPLITS",
    "SPLITS",
    "SplitError",
    "attach_splits",
    "check_splits",
    "load_splits",
    "make_splits",
    "predefined_splits",
    "save_splits",
]

#: The split names, exactly.
SPLITS = ("train", "validation", "internal_test", "external_test")
#: The splits models are scored on (the training split never is).
EVAL_SPLITS = SPLITS[1:]


class SplitError(ValueError):
    """Splits that are inconsistent (a subject in two splits, unknown names, uncovered subjects)."""


def _cohort_df(cohort: Cohort | pl.DataFrame) -> pl.DataFrame:
    return cohort.df if isinstance(cohort, Cohort) else validate_cohort(cohort)


def check_splits(splits: pl.DataFrame, *, source: str = "splits") -> pl.DataFrame:
    """Assert a `(subject_id, split)` table is valid: known split names, one split per subject.

    Returns it with `subject_id` Int64, `split` Utf8, sorted by subject_id.
    """
    for col in ("subject_id", "split"):
        if col not in splits.columns:
            raise SplitError(f"{source}: missing column {col!r} (columns: {splits.columns})")
    df = splits.select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
    for name in df["split"].unique().to_list():
        if name is None:
            raise SplitError(f"{source}: a subject has a null split")
        look_up_option(name, SPLITS, kind="split")
    per_subject = df.unique().group_by("subject_id").agg(pl.col("split").sort())
    multi = per_subject.filter(pl.col("split").list.len() > 1)
    if multi.height:
        row = multi.sort("subject_id").row(0, named=True)
        raise SplitError(
            f"{source}: subject {row['subject_id']} appears in several splits {row['split']} "
            f"({multi.height} such subjects); splits must be disjoint by subject"
        )
    return df.unique("subject_id").sort("subject_id")


def make_splits(
    cohort: Cohort | pl.DataFrame,
    *,
    external_sites: Iterable[str] = (),
    seed: int | np.random.Generator,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    stratify: str | None = "event",
) -> pl.DataFrame:
    """Assign each subject to one of SPLITS. Returns `[subject_id, split]`, one row per subject.

    external_sites: every subject of these sites -> "external_test". The other subjects are
    shuffled with `seed` within strata (stratify: a boolean cohort column, "event" by default; a
    subject counts as positive when any of its rows is; None = no strata) and cut into
    `round(test_frac * n)` internal_test, `round(val_frac * n)` validation, the rest train, per
    stratum. Subjects are handled in sorted-id order, so the result depends only on the cohort's
    subjects, their strata and the seed. A subject seen at both an external and a development
    site is an error.
    """
    df = _cohort_df(cohort)
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(
            f"val_frac and test_frac must be in [0, 1) with a sum < 1, got {val_frac}, {test_frac}"
        )
    sites = sorted(df["site"].unique().to_list())
    external = sorted({look_up_option(s, sites, kind="external site") for s in external_sites})
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    per_site = df.group_by("subject_id").agg(
        pl.col("site").is_in(external).any().alias("ext"),
        (~pl.col("site").is_in(external)).any().alias("dev"),
    )
    both = per_site.filter(pl.col("ext") & pl.col("dev"))
    if both.height:
        sid = both.sort("subject_id")["subject_id"][0]
        raise SplitError(
            f"subject {sid} has rows at an external site and at a development site "
            f"({both.height} such subjects); a subject must belong to one side"
        )
    if stratify is None:
        strata = df.group_by("subject_id").agg(pl.lit(False).alias("stratum"))
    else:
        col = look_up_option(stratify, df.columns, kind="stratify column")
        if df.schema[col] != pl.Boolean:
            raise ValueError(f"stratify column {col!r} must be boolean, got {df.schema[col]}")
        strata = df.group_by("subject_id").agg(pl.col(col).any().alias("stratum"))
    subjects = per_site.join(strata, on="subject_id").sort("subject_id")

    ext_ids = subjects.filter(pl.col("ext"))["subject_id"].to_numpy()
    parts = [pl.DataFrame({"subject_id": ext_ids, "split": ["external_test"] * len(ext_ids)})]
    dev = subjects.filter(~pl.col("ext"))
    for stratum in (False, True):
        ids = dev.filter(pl.col("stratum") == stratum)["subject_id"].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        n_test = round(test_frac * len(ids))
        n_val = round(val_frac * len(ids))
        labels = np.array(["train"] * len(ids), dtype=object)
        labels[:n_test] = "internal_test"
        labels[n_test : n_test + n_val] = "validation"
        parts.append(pl.DataFrame({"subject_id": ids, "split": labels.tolist()}))
    out = pl.concat(
        [
            p.with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
            for p in parts
        ]
    )
    return check_splits(out, source="make_splits")


def predefined_splits(
    cohort_df: pl.DataFrame,
    column: str,
    external_sites: Iterable[str] = (),
    *,
    source: object = "cohort",
) -> pl.DataFrame:
    """Read `(subject_id, split)` from a cohort column of predefined splits.

    E.g. a release's own train / validation / test assignment; subjects of `external_sites`
    become external_test.

    Raises SplitError naming the column and subject for a missing column, a null or unknown
    value, or a subject with two values (splits must be disjoint by subject).
    """
    if column not in cohort_df.columns:
        raise SplitError(
            f"{source}: splits.column {column!r} is not a cohort column (columns: "
            f"{cohort_df.columns})"
        )
    ext = list(external_sites)
    df = cohort_df.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.when(pl.col("site").is_in(ext))
        .then(pl.lit("external_test"))
        .otherwise(pl.col(column).cast(pl.String))
        .alias("split"),
    )
    nulls = df.filter(pl.col("split").is_null())
    if nulls.height:
        raise SplitError(
            f"{source}: column {column!r} is null for subject {nulls['subject_id'][0]} "
            f"({nulls.height} rows)"
        )
    bad = df.filter(~pl.col("split").is_in(list(SPLITS)))
    if bad.height:
        row = bad.row(0, named=True)
        raise SplitError(
            f"{source}: column {column!r} has {row['split']!r} for subject {row['subject_id']} "
            f"(valid: {', '.join(SPLITS)})"
        )
    return check_splits(df, source=f"{source}: column {column!r}")


def save_splits(splits: pl.DataFrame, path: str | Path) -> Path:
    """Write checked splits to parquet (or CSV by suffix), atomically."""
    df = check_splits(splits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".csv":
        df.write_csv(tmp)
    else:
        df.write_parquet(tmp)
    tmp.replace(path)
    return path


def load_splits(path: str | Path) -> pl.DataFrame:
    """Read splits written by `save_splits` and check them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"splits file {path} not found")
    df = pl.read_csv(path) if path.suffix.lower() == ".csv" else pl.read_parquet(path)
    return check_splits(df, source=f"splits {path}")


def attach_splits(cohort_df: Any, splits_df: pl.DataFrame) -> pl.DataFrame:
    """`cohort_df` (row order kept) with a `split` column; every cohort subject must have one."""
    cdf = cohort_df.df if isinstance(cohort_df, Cohort) else cohort_df
    splits = check_splits(splits_df)
    base = cdf.drop("split") if "split" in cdf.columns else cdf
    out = base.with_columns(pl.col("subject_id").cast(pl.Int64)).join(
        splits, on="subject_id", how="left", maintain_order="left"
    )
    missing = out.filter(pl.col("split").is_null())
    if missing.height:
        raise SplitError(
            f"subject {missing['subject_id'][0]} of the cohort has no split "
            f"({missing['subject_id'].n_unique()} such subjects); were the splits made for "
            "another cohort?"
        )
    return out
