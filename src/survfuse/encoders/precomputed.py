"""`precomputed`: embeddings computed elsewhere (parquet or npz) as `ModalityFeatures`.

File layouts (keys: `subject_id`, plus optionally `prediction_time` or `study_time`):

- parquet: one row per key; the embedding is either one list column (`embedding_column`,
  default "embedding") or every other numeric column (in file order);
- npz: arrays `subject_id` [M], optional `prediction_time` / `study_time` [M] (datetime64 or
  int64 microseconds), `pooled` (or `embedding`) [M, D], optional `tokens` [M, T, D] with
  `mask` [M, T];
- femr (`femr.models.transformer.compute_features`, CLMBR / MOTOR), read as femr writes it:
  `subject_ids` [M], `feature_times` [M] (datetime64; the time of the last event at or before
  each prediction), `features` [M, D], as an npz (`np.savez(path, **features)`) or a parquet with
  those three columns (`features` a list column). Recognised by these names.

Matching to the cohort: with `prediction_time` in the file, exact (subject_id, prediction_time);
with `study_time`, the latest study at or before `prediction_time` (never a later one); with femr's
`feature_times`, femr's own as-of join (`femr.featurizers.join_labels`): the latest row of the
subject with `feature_time <= prediction_time`; with `subject_id` only, one row per subject.
Cohort rows without a match raise an error that names them (`on_missing="error"`) or become
`present=False` (`on_missing="absent"`), with a record in `meta["manifest"]` (status
"no_study", the reason). The default `on_missing="auto"` is "absent" for femr output (femr writes
no row for a prediction with no event at or before it: missing data, not an error) and "error"
for the other layouts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from survfuse.encoders.base import Encoder, cohort_keys, hash_files, hash_parts, register_encoder
from survfuse.features import ModalityFeatures
from survfuse.registry import look_up_option

__all__ = ["PrecomputedEncoder"]

_KEYS = ("subject_id", "prediction_time", "study_time", "feature_time")
FEMR_ARRAYS = ("subject_ids", "feature_times", "features")  # compute_features' output


def _femr(cols: dict[str, Any], path: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Keys (subject_id, feature_time) and arrays of femr's compute_features output."""
    times = np.asarray(cols["feature_times"])
    if times.dtype.kind != "M":
        raise ValueError(
            f"{path}: femr 'feature_times' must be datetime64 (compute_features writes "
            f"datetime64[s]), got {times.dtype}"
        )
    sid = np.asarray(cols["subject_ids"])
    if sid.dtype.kind not in "iu":
        raise ValueError(f"{path}: femr 'subject_ids' must be integers, got {sid.dtype}")
    keys = pl.DataFrame(
        {"subject_id": sid.astype(np.int64), "feature_time": times.astype("datetime64[us]")}
    )
    return keys, {"pooled": np.asarray(cols["features"], np.float32)}


def _read(path: Path, embedding_column: str) -> tuple[pl.DataFrame, dict[str, Any]]:
    """(keys frame with a `_row` index, arrays {pooled, tokens?, mask?}) of an embedding file."""
    if not path.is_file():
        raise FileNotFoundError(f"precomputed embeddings file {path} not found")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        if set(FEMR_ARRAYS) <= set(data):
            keys, arrays = _femr(data, path)
        else:
            keys, arrays = _npz(data, path)
    elif path.suffix == ".parquet":
        df = pl.read_parquet(path)
        if set(FEMR_ARRAYS) <= set(df.columns):
            feats = df.get_column("features")
            cols = {
                "subject_ids": df.get_column("subject_ids").to_numpy(),
                "feature_times": df.get_column("feature_times").to_numpy(),
                "features": feats.to_numpy() if feats.dtype == pl.Array else feats.to_list(),
            }
            keys, arrays = _femr(cols, path)
        else:
            keys, arrays = _parquet(df, path, embedding_column)
    else:
        raise ValueError(f"{path}: precomputed embeddings must be .parquet or .npz")
    if arrays["pooled"].ndim != 2 or arrays["pooled"].shape[0] != keys.height:
        raise ValueError(
            f"{path}: embeddings must be [{keys.height}, D], got {arrays['pooled'].shape}"
        )
    if np.isnan(arrays["pooled"]).any():
        row = int(np.flatnonzero(np.isnan(arrays["pooled"]).any(axis=1))[0])
        raise ValueError(f"{path}: NaN in the embedding of row {row}")
    return keys.with_row_index("_row"), arrays


def _npz(data: dict[str, Any], path: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Keys and arrays of survfuse's npz layout (module docstring)."""
    if "subject_id" not in data:
        raise ValueError(
            f"{path}: npz needs a 'subject_id' array, or femr's {list(FEMR_ARRAYS)} "
            f"(has {sorted(data)})"
        )
    pooled = data.get("pooled", data.get("embedding"))
    if pooled is None:
        raise ValueError(f"{path}: npz needs a 'pooled' (or 'embedding') array [M, D]")
    cols: dict[str, Any] = {"subject_id": np.asarray(data["subject_id"], np.int64)}
    for k in ("prediction_time", "study_time"):
        if k in data:
            v = np.asarray(data[k])
            cols[k] = v.astype("datetime64[us]") if v.dtype.kind == "M" else v.astype(np.int64)
    keys = pl.DataFrame(cols)
    for k in ("prediction_time", "study_time"):
        if k in keys.columns:
            keys = keys.with_columns(pl.col(k).cast(pl.Datetime("us")))
    arrays = {"pooled": np.asarray(pooled, np.float32)}
    if "tokens" in data:
        arrays["tokens"] = np.asarray(data["tokens"], np.float32)
        arrays["mask"] = np.asarray(
            data.get("mask", np.ones(arrays["tokens"].shape[:2], bool)), bool
        )
    return keys, arrays


def _parquet(
    df: pl.DataFrame, path: Path, embedding_column: str
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Keys and arrays of survfuse's parquet layout (module docstring)."""
    if "subject_id" not in df.columns:
        raise ValueError(
            f"{path}: missing column 'subject_id', or femr's {list(FEMR_ARRAYS)} "
            f"(columns: {df.columns})"
        )
    key_cols = [c for c in _KEYS if c in df.columns]
    keys = df.select(key_cols).with_columns(
        pl.col(c).cast(pl.Datetime("us")) for c in key_cols if c != "subject_id"
    )
    keys = keys.with_columns(pl.col("subject_id").cast(pl.Int64))
    if embedding_column in df.columns:
        pooled = np.asarray(df.get_column(embedding_column).to_list(), np.float32)
    else:
        feats = [c for c in df.columns if c not in key_cols and df.schema[c].is_numeric()]
        if not feats:
            raise ValueError(
                f"{path}: no embedding column {embedding_column!r} and no numeric feature columns"
            )
        pooled = df.select(feats).to_numpy().astype(np.float32)
    return keys, {"pooled": pooled}


@register_encoder("precomputed")
class PrecomputedEncoder(Encoder):
    """Features read from a file of embeddings (see module docstring); `source` is unused."""

    modality = "ct"  # the modality of the embeddings; set `modality` in config to override
    learns = False

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        modality: str = "ct",
        embedding_column: str = "embedding",
        on_missing: str = "auto",
    ) -> None:
        on_missing = look_up_option(on_missing, ["auto", "error", "absent"], kind="on_missing")
        modality = look_up_option(modality, ["ct", "ehr"], kind="modality")
        super().__init__(
            path=str(Path(path).resolve()),
            modality=modality,
            embedding_column=embedding_column,
            on_missing=on_missing,
        )
        self.modality = modality  # type: ignore[misc,assignment]

    def fingerprint(self) -> str:
        """Return the base fingerprint + the embedding file's (path, size, mtime)."""
        return hash_parts(super().fingerprint(), hash_files([self._config["path"]]))

    def input_files(self) -> list[Path]:
        return [Path(self._config["path"])]

    def _match(self, cohort: pl.DataFrame, keys: pl.DataFrame, path: Path) -> pl.DataFrame:
        left = cohort.select(
            pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
        ).with_row_index("_crow")
        if "prediction_time" in keys.columns:
            by = ["subject_id", "prediction_time"]
        elif "study_time" in keys.columns:
            by = ["subject_id", "study_time"]
        elif "feature_time" in keys.columns:
            # femr.featurizers.join_labels: rows sorted by (subject, time), stably; the last row
            # at or before the prediction wins, so of equal keys the last in the file does
            keys = keys.sort("subject_id", "feature_time", "_row").unique(
                ["subject_id", "feature_time"], keep="last", maintain_order=True
            )
            by = ["subject_id", "feature_time"]
        else:
            by = ["subject_id"]
            if cohort.select("subject_id").is_duplicated().any():
                # One embedding per subject reused at several prediction times may hold data
                # recorded after the earlier ones: the leakage rule cannot be checked here.
                warnings.warn(
                    f"{path}: embeddings are keyed by subject_id only, but the cohort has "
                    "several prediction times per subject; the same embedding is used for all "
                    "of them (add prediction_time or study_time keys to rule out leakage)",
                    stacklevel=3,
                )
        dup = keys.filter(pl.struct(by).is_duplicated())
        if dup.height:
            raise ValueError(f"{path}: duplicate key {dup.select(by).row(0, named=True)}")
        if by[-1] in ("study_time", "feature_time"):
            out = (
                left.sort("prediction_time")
                .join_asof(
                    keys.sort(by[-1]),
                    left_on="prediction_time",
                    right_on=by[-1],
                    by="subject_id",
                    strategy="backward",
                    check_sortedness=False,
                )
                .sort("_crow")
            )
        else:
            out = left.join(keys, on=by, how="left").sort("_crow")
        return out

    def encode(self, cohort: pl.DataFrame, source: Any = None) -> ModalityFeatures:
        path = Path(self._config["path"])
        keys, arrays = _read(path, self._config["embedding_column"])
        sid, pt = cohort_keys(cohort)
        matched = self._match(cohort, keys, path)
        rows = matched.get_column("_row").to_numpy()
        found = ~matched.get_column("_row").is_null().to_numpy()
        femr = "feature_time" in keys.columns
        if femr and self.modality != "ehr":
            warnings.warn(
                f"{path}: femr compute_features output (an EHR representation) read by a "
                f"precomputed encoder with modality={self.modality!r}; set modality='ehr'",
                stacklevel=2,
            )
        on_missing = self._config["on_missing"]
        if on_missing == "auto":
            on_missing = "absent" if femr else "error"
        if not found.all() and on_missing == "error":
            miss = matched.filter(pl.col("_row").is_null()).head(3)
            known = keys.get_column("subject_id").unique().sort().head(5).to_list()
            raise ValueError(
                f"{path}: {int((~found).sum())} of {len(found)} cohort rows have no embedding, "
                f"e.g. {miss.select('subject_id', 'prediction_time').to_dicts()} (the file has "
                f"subject_ids like {known}; keys: {[c for c in _KEYS if c in keys.columns]}); "
                "pass on_missing='absent' to mark them not present"
            )
        idx = np.where(found, np.nan_to_num(rows.astype(np.float64)), 0).astype(np.int64)
        pooled = arrays["pooled"][idx]
        pooled[~found] = 0
        tokens = mask = None
        if "tokens" in arrays:
            tokens = arrays["tokens"][idx]
            mask = arrays["mask"][idx] & found[:, None]
            tokens[~found] = 0
        return ModalityFeatures(
            subject_id=sid,
            prediction_time=pt,
            pooled=pooled,
            present=found,
            tokens=tokens,
            mask=mask,
            meta={
                "encoder": self.name,
                "modality": self.modality,
                "path": str(path),
                "manifest": self._absent(sid, pt, found, keys, path),
            },
        )

    def _absent(
        self,
        sid: np.ndarray[Any, Any],
        pt: np.ndarray[Any, Any],
        found: np.ndarray[Any, Any],
        keys: pl.DataFrame,
        path: Path,
    ) -> list[dict[str, Any]]:
        """Manifest records (as `iter_ct_volumes` writes them) of the rows without a match."""
        if "prediction_time" in keys.columns:
            reason = f"no embedding at this prediction_time in {path.name}"
        elif "study_time" in keys.columns or "feature_time" in keys.columns:
            reason = f"no {self.modality.upper()} features at or before prediction_time"
        else:
            reason = f"no embedding for this subject in {path.name}"
        return [
            {
                "subject_id": int(sid[i]),
                "prediction_time": str(np.datetime64(pt[i], "us")),
                "path": str(path),
                "status": "no_study",
                "reason": reason,
            }
            for i in np.flatnonzero(~found)
        ]
