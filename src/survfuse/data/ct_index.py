"""The CT index and batches of CT volumes with a manifest of what could not be used.

CT index: one row per study, `subject_id`, `study_time`, `path` (a NIfTI file or a DICOM series
folder, relative paths against the index's folder); the study a prediction uses is the latest at
or before its `prediction_time` (`select_studies`). `iter_ct` / `load_ct_batch` load the selected
studies with `survfuse.data.imaging.load_ct`; a failure marks that row "failed" with its reason
in the manifest (`MANIFEST_SCHEMA`), never a crash of the batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl

from survfuse.data.dates import parse_dates
from survfuse.data.imaging import CTLoadError, CTLoadWarning, CTPreprocessing, CTVolume, load_ct

__all__ = [
    "MANIFEST_SCHEMA",
    "MASK_COLUMN",
    "CTIndex",
    "iter_ct",
    "load_ct_batch",
    "load_ct_index",
    "select_studies",
    "validate_ct_index",
    "write_ct_manifest",
]

#: the optional CT index column of each study's region label map (`validate_ct_index`)
MASK_COLUMN = "mask_path"

MANIFEST_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "path": pl.String(),
    "status": pl.String(),  # "ok" | "no_study" | "failed"
    "reason": pl.String(),
}


def validate_ct_index(
    df: pl.DataFrame, *, source: str = "CT index", root: str | Path | None = None
) -> pl.DataFrame:
    """Check and normalise a CT index: subject_id Int64, study_time Datetime(us), path Utf8.

    An optional `mask_path` Utf8 column names each study's region label map (a segmentation
    aligned with the study's voxels, e.g. TotalSegmentator's; null = none), read by
    `ct_radiomics(regions=...)`. Relative paths (and mask paths) are resolved against `root`
    (when given). Raises ValueError naming the column and the first offending row / subject.
    """
    for col in ("subject_id", "study_time", "path"):
        if col not in df.columns:
            raise ValueError(f"{source}: missing column {col!r} (columns: {df.columns})")
    st = df.schema["study_time"]
    study_time = pl.col("study_time")
    if st == pl.String:  # ISO 8601 only: a day/month order is never guessed (data.dates)
        study_time = pl.lit(parse_dates(df["study_time"], source=source, column="study_time"))
    elif not isinstance(st, pl.Datetime | pl.Date):
        raise ValueError(f"{source}: column 'study_time' must be a datetime, got {st}")
    if not (df.schema["subject_id"].is_integer() or df.schema["subject_id"] == pl.String):
        raise ValueError(f"{source}: column 'subject_id' must be an integer")
    out = df.with_columns(
        pl.col("subject_id").cast(pl.Int64, strict=False),
        study_time.cast(pl.Datetime("us")),
        pl.col("path").cast(pl.String),
    )
    for col in ("subject_id", "study_time", "path"):
        bad = out[col].is_null()
        if bad.any():
            i = int(bad.arg_true()[0])
            raise ValueError(
                f"{source}: column {col!r} is null or unparsable in row {i} "
                f"(subject {df['subject_id'][i]!r}, value {df[col][i]!r})"
            )
    if MASK_COLUMN in out.columns:
        if out.schema[MASK_COLUMN] not in (pl.String, pl.Null):
            raise ValueError(
                f"{source}: column {MASK_COLUMN!r} must hold paths (text), "
                f"got {out.schema[MASK_COLUMN]}"
            )
        out = out.with_columns(pl.col(MASK_COLUMN).cast(pl.String))
    if root is not None:
        base = Path(root)
        out = out.with_columns(
            pl.col(c).map_elements(
                lambda p: p if Path(p).is_absolute() else str(base / p), return_dtype=pl.String
            )
            for c in ("path", MASK_COLUMN)
            if c in out.columns
        )
    return out.select(
        "subject_id",
        "study_time",
        "path",
        *[c for c in out.columns if c not in ("subject_id", "study_time", "path")],
    )


def load_ct_index(path: str | Path) -> pl.DataFrame:
    """Read a CT index (parquet or CSV): subject_id, study_time, path (+ any extra columns).

    Relative paths resolve against the index file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CT index {path} not found")
    if path.suffix.lower() == ".csv":
        df = pl.read_csv(path, try_parse_dates=False)  # text dates: validate_ct_index, ISO only
    else:
        df = pl.read_parquet(path)
    return validate_ct_index(df, source=f"CT index {path}", root=path.parent)


@dataclass
class CTIndex:
    """A validated CT index with absolute paths; `df` columns subject_id, study_time, path."""

    df: pl.DataFrame

    @classmethod
    def load(cls, path: str | Path) -> CTIndex:
        return cls(load_ct_index(path))

    def select(self, cohort_df: pl.DataFrame, lookback_days: float | None = None) -> pl.DataFrame:
        return select_studies(cohort_df, self.df, lookback_days=lookback_days)


def select_studies(
    cohort_df: pl.DataFrame, ct_index_df: pl.DataFrame, lookback_days: float | None = None
) -> pl.DataFrame:
    """For each cohort row, the latest study with `study_time <= prediction_time`.

    Returns `[subject_id, prediction_time, study_time, path]` (and `mask_path` when the index has
    it) in cohort row order; study_time and path are null when the subject has no study at or
    before prediction_time (or none within `lookback_days` before it). Ties at the same
    study_time pick the lexicographically last path.
    """
    if lookback_days is not None and not lookback_days >= 0:
        raise ValueError(f"lookback_days must be >= 0 or None, got {lookback_days}")
    for col in ("subject_id", "prediction_time"):
        if col not in cohort_df.columns:
            raise ValueError(f"cohort: missing column {col!r} (columns: {cohort_df.columns})")
    index = validate_ct_index(ct_index_df)
    carried = ["path", *([MASK_COLUMN] if MASK_COLUMN in index.columns else [])]
    index = index.select("subject_id", "study_time", *carried)
    left = cohort_df.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    ).with_row_index("_row")
    right = index.sort("subject_id", "study_time", "path").unique(
        ["subject_id", "study_time"], keep="last", maintain_order=True
    )
    out = left.sort("prediction_time").join_asof(
        right.sort("study_time"),
        left_on="prediction_time",
        right_on="study_time",
        by="subject_id",
        strategy="backward",
        check_sortedness=False,
    )
    if lookback_days is not None:
        too_old = (pl.col("prediction_time") - pl.col("study_time")) > pl.lit(
            timedelta(days=float(lookback_days))
        )
        out = out.with_columns(
            pl.when(too_old).then(None).otherwise(pl.col(c)).alias(c)
            for c in ("study_time", *carried)
        )
    return out.sort("_row").select("subject_id", "prediction_time", "study_time", *carried)


# ----------------------------------------------------------------------------- batches & manifest
def iter_ct(
    selection: pl.DataFrame,
    preprocessing: CTPreprocessing | None = None,
    *,
    strict: bool = False,
) -> Iterator[tuple[dict[str, Any], CTVolume | None]]:
    """Load the CT of each row of `select_studies` output, one at a time.

    Yields `(manifest_row, volume)`; manifest_row has MANIFEST_SCHEMA keys, status "ok" (volume
    set), "no_study" (null path) or "failed" (volume None, reason = the CTLoadError reason).
    `strict=True` re-raises the first CTLoadError instead.
    """
    prep = preprocessing or CTPreprocessing()
    for col in ("subject_id", "prediction_time", "path"):
        if col not in selection.columns:
            raise ValueError(f"CT selection: missing column {col!r} (columns: {selection.columns})")
    for rec in selection.select("subject_id", "prediction_time", "path").iter_rows(named=True):
        row = dict(rec, status="ok", reason=None)
        if rec["path"] is None:
            row.update(status="no_study", reason="no CT study at or before prediction_time")
            yield row, None
            continue
        try:
            vol = load_ct(rec["path"], prep)
        except CTLoadError as exc:
            if strict:
                raise CTLoadError(
                    exc.path,
                    f"subject {rec['subject_id']} at {rec['prediction_time']}: {exc.reason}",
                ) from exc
            row.update(status="failed", reason=exc.reason)
            yield row, None
            continue
        yield row, vol


def _warn_failures(manifest: pl.DataFrame) -> None:
    failed = manifest.filter(pl.col("status") == "failed")
    if failed.height:
        first = failed.row(0, named=True)
        warnings.warn(
            f"{failed.height} of {manifest.height} CT studies failed to load and are treated as "
            f"missing (reasons in the CT manifest); first: subject {first['subject_id']}: "
            f"{first['reason']}",
            CTLoadWarning,
            stacklevel=3,
        )


def load_ct_batch(
    selection: pl.DataFrame,
    preprocessing: CTPreprocessing | None = None,
    *,
    strict: bool = False,
    manifest_path: str | Path | None = None,
) -> tuple[list[CTVolume | None], pl.DataFrame]:
    """Load every selected CT; failures are per subject.

    Returns `(volumes, manifest)`: volumes aligned with `selection` rows (None when missing or
    failed), manifest with MANIFEST_SCHEMA. Failed loads give one CTLoadWarning counting them;
    `strict=True` raises the first CTLoadError. The manifest is written to `manifest_path`
    (e.g. `<run>/ct_manifest.parquet`) when given.
    """
    volumes: list[CTVolume | None] = []
    rows: list[dict[str, Any]] = []
    for row, vol in iter_ct(selection, preprocessing, strict=strict):
        rows.append(row)
        volumes.append(vol)
    manifest = pl.DataFrame(rows, schema=MANIFEST_SCHEMA)
    if manifest_path is not None:
        write_ct_manifest(manifest, manifest_path)
    _warn_failures(manifest)
    return volumes, manifest


def write_ct_manifest(manifest: pl.DataFrame | list[dict[str, Any]], path: str | Path) -> Path:
    """Write a CT manifest (MANIFEST_SCHEMA) atomically to `path` (parquet)."""
    df = manifest if isinstance(manifest, pl.DataFrame) else pl.DataFrame(manifest)
    df = df.select([pl.col(c).cast(t) for c, t in MANIFEST_SCHEMA.items()])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.write_parquet(tmp)
    tmp.replace(path)
    return path
