"""INSPECT (Stanford CTPA cohort) -> survfuse's cohort table, CT index and flat MEDS.

`convert_inspect(cohort, meds, out, ct_root=...)` reads the release's label files (see
`survfuse.convert.inspect_tables` for the layouts and the upstream files each column name comes
from), converts the MEDS extract to the current flat schema while streaming it
(`survfuse.convert.meds_nested`), derives `pe_mortality_time` / `_event` from the MEDS death
events (`survfuse.convert.outcomes`), cross-checks the released mortality labels against them,
and writes, atomically (a temp sibling folder renamed into place):

- `cohort.parquet`: `subject_id`, `prediction_time` (the CT time), `time`, `event` (= the
  `pe_mortality` task), `site`, `pe_mortality_time`, `pe_mortality_event`, `inspect_split`
  (train / validation / internal_test), `impression_id`, `image_id` and the released labels;
- `ct_index.parquet` (with `ct_root`): `subject_id`, `study_time`, `path` (absolute) of the CT
  files that exist (`<ct_root>/CTPA/<image_id>` or `<ct_root>/<image_id>`);
- `meds/data/*.parquet` (MEDS 0.4) and `meds/metadata/` (`dataset.json`, `codes.parquet`,
  `subject_splits.parquet` with INSPECT's split as train / tuning / held_out);
- `label_crosscheck.parquet` (every released label that disagrees with the derived one),
  `conversion.json` (every count) and `conversion_report.md`.

Rows without a CT time are dropped (or take `time_fallback`, e.g. `note_DATETIME`); duplicate
`(subject_id, prediction_time)` rows keep the lowest `impression_id`; all of it is counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from survfuse import __version__
from survfuse.atomic import atomic_dir
from survfuse.convert.inspect_tables import MORTALITY_HORIZONS, InspectTables, read_inspect_tables
from survfuse.convert.meds_nested import DEFAULT_DEATH_CODES, FlattenResult, flatten_meds
from survfuse.convert.outcomes import crosscheck_labels, derive_outcomes
from survfuse.convert.report import render_report
from survfuse.convert.tables import ConversionError
from survfuse.data.cohort import validate_cohort
from survfuse.data.ct_index import validate_ct_index
from survfuse.data.meds import MEDSDataset

__all__ = ["ETL_NAME", "MEDS_SPLITS", "ConversionResult", "convert_inspect"]

ETL_NAME = "survfuse.convert.inspect"
#: survfuse split -> MEDS `subject_splits` name (`meds` 0.4 `train_split` / `tuning_split` /
#: `held_out_split`).
MEDS_SPLITS = {"train": "train", "validation": "tuning", "internal_test": "held_out"}
_CT_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


@dataclass(frozen=True)
class ConversionResult:
    """Where the converted dataset is and every count of the conversion report."""

    out: Path
    counts: dict[str, Any]

    @property
    def cohort(self) -> Path:
        return self.out / "cohort.parquet"

    @property
    def ct_index(self) -> Path | None:
        path = self.out / "ct_index.parquet"
        return path if path.is_file() else None

    @property
    def meds_root(self) -> Path:
        return self.out / "meds"

    @property
    def report(self) -> Path:
        return self.out / "conversion_report.md"


def _check_out(out: Path) -> None:
    """Refuse to replace a non-empty folder that is not an earlier conversion."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / "conversion.json").read_text()).get("etl") == ETL_NAME
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise ConversionError(
                f"--out {out} is not empty and is not an earlier conversion; choose an empty "
                "or new folder"
            )


def _resolve_keys(tables: InspectTables, counts: dict[str, Any]) -> pl.DataFrame:
    """Drop rows without a CT time; keep one row per (subject_id, prediction_time)."""
    df = tables.df
    null = df["procedure_time"].is_null()
    counts["null_time_dropped"] = int(null.sum())
    counts["time_from_fallback"] = int((df["time_source"] != tables.time_column).sum())
    df = df.filter(~null).rename({"procedure_time": "prediction_time"})
    order = pl.col("impression_id").cast(pl.Int64, strict=False)
    df = df.sort("subject_id", "prediction_time", order, "impression_id", "_row", nulls_last=True)
    key = ["subject_id", "prediction_time"]
    dup = df.filter(pl.struct(key).is_duplicated())
    conflicting = 0
    if dup.height and tables.labels:
        per_key = dup.group_by(key).agg([pl.col(c).n_unique() for c in tables.labels])
        conflicting = int(per_key.select(pl.max_horizontal(tables.labels) > 1).sum().item())
    kept = df.unique(key, keep="first", maintain_order=True)
    dropped = df.join(kept.select("_file", "_row"), on=["_file", "_row"], how="anti")
    counts["duplicate_keys_dropped"] = dropped.height
    counts["duplicate_keys_conflicting_labels"] = conflicting
    counts["duplicate_keys_examples"] = dropped["impression_id"].head(5).to_list()
    counts["rows_out"] = kept.height
    counts["subjects"] = kept["subject_id"].n_unique()
    return kept


def _ct_index(df: pl.DataFrame, ct_root: Path, counts: dict[str, Any]) -> pl.DataFrame:
    root = ct_root / "CTPA" if (ct_root / "CTPA").is_dir() else ct_root
    if not root.is_dir():
        raise FileNotFoundError(f"CT folder not found: {ct_root}")
    rows = df.filter(pl.col("image_id").is_not_null())
    paths, found = [], []
    for image_id in rows["image_id"].to_list():
        name = image_id if image_id.lower().endswith(_CT_SUFFIXES) else f"{image_id}.nii.gz"
        path = (root / name).resolve()
        paths.append(str(path))
        found.append(path.exists())
    rows = rows.with_columns(pl.Series("path", paths), pl.Series("_found", found))
    missing = rows.filter(~pl.col("_found"))
    counts["ct"] = {
        "root": str(root),
        "rows_with_image_id": rows.height,
        "rows_without_image_id": df.height - rows.height,
        "found": rows.height - missing.height,
        "not_found": missing.height,
        "not_found_examples": missing["path"].head(5).to_list(),
    }
    index = rows.filter(pl.col("_found")).select(
        "subject_id",
        pl.col("prediction_time").alias("study_time"),
        "path",
        "image_id",
        "impression_id",
    )
    return validate_ct_index(index, source="converted CT index")


def _code_metadata(meds: Path, codes: list[str]) -> pa.Table:
    """Return the codes.parquet rows for `codes`.

    With descriptions from the input's metadata if any (MEDS 0.1 `metadata.json`
    `code_metadata`, or a current `metadata/codes.parquet`).
    """
    desc: dict[str, tuple[str | None, list[str]]] = {}
    try:
        old = json.loads((meds / "metadata.json").read_text()).get("code_metadata") or {}
        desc = {
            c: (v.get("description"), list(v.get("parent_codes") or [])) for c, v in old.items()
        }
    except (OSError, ValueError, AttributeError):
        pass
    current = meds / "metadata" / "codes.parquet"
    if not desc and current.is_file():
        for r in pl.read_parquet(current).iter_rows(named=True):
            desc[r["code"]] = (r.get("description"), list(r.get("parent_codes") or []))
    return pa.table(
        {
            "code": pa.array(codes, pa.string()),
            "description": pa.array([desc.get(c, (None, []))[0] for c in codes], pa.string()),
            "parent_codes": pa.array(
                [desc.get(c, (None, []))[1] for c in codes], pa.list_(pa.string())
            ),
        }
    )


def _write_meds_metadata(meta: Path, meds: Path, cohort: pl.DataFrame, flat: FlattenResult) -> None:
    meta.mkdir(parents=True, exist_ok=True)
    try:
        import meds as meds_pkg

        meds_version = str(meds_pkg.__version__)
    except (ImportError, AttributeError):
        meds_version = "0.4"
    info = {
        "dataset_name": "INSPECT",
        "etl_name": ETL_NAME,
        "etl_version": __version__,
        "meds_version": meds_version,
    }
    (meta / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    pq.write_table(_code_metadata(meds, flat.codes), meta / "codes.parquet")
    splits = (
        cohort.group_by("subject_id")
        .agg(pl.col("inspect_split").first())
        .sort("subject_id")
        .select("subject_id", pl.col("inspect_split").replace_strict(MEDS_SPLITS).alias("split"))
    )
    splits.write_parquet(meta / "subject_splits.parquet")


def convert_inspect(
    cohort: str | Path,
    meds: str | Path,
    out: str | Path,
    *,
    ct_root: str | Path | None = None,
    site: str = "inspect",
    death_codes: tuple[str, ...] | list[str] = DEFAULT_DEATH_CODES,
    time_format: str | None = None,
    time_fallback: str | None = None,
    id_column: str | None = None,
    time_column: str | None = None,
    batch_rows: int = 1_000_000,
) -> ConversionResult:
    """Convert an INSPECT release into a survfuse dataset folder `out` (see module docs).

    cohort: the master CSV or the folder with `study_mapping_*`, `labels_*`, `splits_*`.
    meds: the MEDS root (nested MEDS 0.1 / 0.2 or flat shards). ct_root: the folder holding
    `CTPA/<image_id>` (None: no CT index). death_codes: MEDS codes of death (a trailing `/`
    matches a prefix). Raises `ConversionError` (a ValueError) naming file, row and column.
    """
    out, meds = Path(out), Path(meds)
    if not site or not site.strip():
        raise ConversionError("--site must be a non-empty name")
    death_codes = tuple(death_codes)
    if not death_codes:
        raise ConversionError("at least one death code is needed to derive pe_mortality times")
    tables = read_inspect_tables(
        cohort, id_column=id_column, time_column=time_column,
        time_fallback=time_fallback, time_format=time_format,
    )  # fmt: skip
    if ct_root is not None and not tables.has_image_id:
        main = tables.files.get("master") or tables.files.get("mapping")
        raise ConversionError(
            f"{main}: missing column 'image_id' (needed with --ct-root to find CTPA/<image_id>)"
        )
    _check_out(out)
    counts: dict[str, Any] = {
        "etl": ETL_NAME,
        "version": __version__,
        "inputs": {
            "layout": tables.layout,
            "files": tables.files,
            "id_column": tables.id_column,
            "time_column": tables.time_column,
            "time_fallback": time_fallback,
            "time_format": time_format or "ISO 8601",
            "meds": str(meds),
            "ct_root": None if ct_root is None else str(ct_root),
            "site": site,
        },
        "cohort": dict(tables.counts),
    }
    keys = _resolve_keys(tables, counts["cohort"])

    def fill(tmp: Path) -> None:
        flat = flatten_meds(
            meds, tmp / "meds" / "data", death_codes=death_codes, batch_rows=batch_rows
        )
        in_meds = flat.last_event["subject_id"]
        counts["meds"] = {
            **flat.counts,
            "layouts": sorted({s["layout"] for s in flat.shards}),
            "codes": len(flat.codes),
            "subjects_with_events": in_meds.len(),
            "subjects_not_in_cohort": int((~in_meds.is_in(keys["subject_id"].implode())).sum()),
            "cohort_subjects_without_events": int(
                (~keys["subject_id"].unique().is_in(in_meds.implode())).sum()
            ),
        }
        if flat.deaths.height == 0:
            raise ConversionError(
                f"MEDS {meds}: no death events (codes {', '.join(death_codes)}) in "
                f"{flat.counts['measurements']:,} measurements; pe_mortality times cannot be "
                "derived without them (pass the death code of this extract with --death-code)"
            )
        derived, oc = derive_outcomes(
            keys.select("subject_id", "prediction_time"), flat.deaths, flat.last_event
        )
        counts["outcomes"] = {
            "death_codes": list(death_codes),
            "death_events": flat.deaths.height,
            "subjects_with_death": flat.deaths["subject_id"].n_unique(),
            **oc,
        }
        df = pl.concat([keys, derived.drop("subject_id", "prediction_time")], how="horizontal")
        mism, counts["crosscheck"] = crosscheck_labels(df, MORTALITY_HORIZONS)
        mism.write_parquet(tmp / "label_crosscheck.parquet")
        cohort_df = validate_cohort(
            df.select(
                "subject_id", "prediction_time", "time", "event",
                pl.lit(site).alias("site"),
                pl.col("time").alias("pe_mortality_time"),
                pl.col("event").alias("pe_mortality_event"),
                "inspect_split", "impression_id", "image_id", *tables.labels,
            ),
            source="converted cohort",
        )  # fmt: skip
        cohort_df.write_parquet(tmp / "cohort.parquet")
        splits = cohort_df.group_by("inspect_split").agg(
            pl.len().alias("rows"), pl.col("subject_id").n_unique().alias("subjects")
        )
        counts["splits"] = {r["inspect_split"]: {"rows": r["rows"], "subjects": r["subjects"]}
                            for r in splits.sort("inspect_split").iter_rows(named=True)}  # fmt: skip
        n_ct = 0
        if ct_root is not None:
            index = _ct_index(df, Path(ct_root), counts)
            index.write_parquet(tmp / "ct_index.parquet")
            n_ct = index.height
        _write_meds_metadata(tmp / "meds" / "metadata", meds, cohort_df, flat)
        MEDSDataset(tmp / "meds")  # survfuse reads what was written (every shard's schema)
        counts["output"] = {
            "folder": str(out),
            "cohort_rows": cohort_df.height,
            "cohort_subjects": cohort_df["subject_id"].n_unique(),
            "ct_index_rows": n_ct if ct_root is not None else None,
            "meds_rows": flat.counts["rows_written"],
            "label_mismatch_rows": mism.height,
        }
        (tmp / "conversion.json").write_text(json.dumps(counts, indent=2, default=str) + "\n")
        (tmp / "conversion_report.md").write_text(render_report(counts, mism))

    atomic_dir(out, fill)
    return ConversionResult(out, counts)
