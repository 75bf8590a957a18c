"""`precomputed`: embeddings computed elsewhere (parquet or npz) as `ModalityFeatures`.

File layouts (keys: `subject_id`, plus optionally `prediction_time` or `study_time`):

- parquet: one row per key; the embedding is either one list column (`embedding_column`,
  default "embedding") or every other numeric column (in file order);
- npz: arrays `subject_id` [M], optional `prediction_time` / `study_time` [M] (datetime64 or
  int64 microseconds), `pooled` (or `embedding`) [M, D], optional `tokens` [M, T, D] with
  `mask` [M, T].

Matching to the cohort: with `prediction_time` in the file, exact (subject_id, prediction_time);
with `study_time`, the latest study at or before `prediction_time` (never a later one); with
`subject_id` only, one row per subject. Cohort rows without a match raise an error that names
them (`on_missing="error"`, the default) or become `present=False` (`on_missing="absent"`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from survfuse.encoders.base import Encoder, cohort_keys, hash_files, hash_parts, register_encoder
from survfuse.encoders.features import ModalityFeatures
from survfuse.registry import look_up_option

__all__ = ["PrecomputedEncoder"]

_KEYS = ("subject_id", "prediction_time", "study_time")


def _read(path: Path, embedding_column: str) -> tuple[pl.DataFrame, dict[str, Any]]:
    """(keys frame with a `_row` index, arrays {pooled, tokens?, mask?}) of an embedding file."""
    if not path.is_file():
        raise FileNotFoundError(f"precomputed embeddings file {path} not found")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        if "subject_id" not in data:
            raise ValueError(f"{path}: npz needs a 'subject_id' array (has {sorted(data)})")
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
    elif path.suffix == ".parquet":
        df = pl.read_parquet(path)
        if "subject_id" not in df.columns:
            raise ValueError(f"{path}: missing column 'subject_id' (columns: {df.columns})")
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
                    f"{path}: no embedding column {embedding_column!r} and no numeric feature "
                    "columns"
                )
            pooled = df.select(feats).to_numpy().astype(np.float32)
        arrays = {"pooled": pooled}
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
        on_missing: str = "error",
    ) -> None:
        on_missing = look_up_option(on_missing, ["error", "absent"], kind="on_missing")
        modality = look_up_option(modality, ["ct", "ehr"], kind="modality")
        super().__init__(
            path=str(Path(path).resolve()),
            modality=modality,
            embedding_column=embedding_column,
            on_missing=on_missing,
        )
        self.modality = modality  # type: ignore[misc,assignment]

    def fingerprint(self) -> str:
        """Base fingerprint + the embedding file's (path, size, mtime)."""
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
        if by[-1] == "study_time":
            out = (
                left.sort("prediction_time")
                .join_asof(
                    keys.sort("study_time"),
                    left_on="prediction_time",
                    right_on="study_time",
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
        if not found.all() and self._config["on_missing"] == "error":
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
            meta={"encoder": self.name, "modality": self.modality, "path": str(path)},
        )
