"""`ModalityFeatures`: what an encoder hands to fusion, one row per prediction.

Arrays (N predictions, T tokens, D token dim, Dp pooled dim, K codes per token):
- `subject_id` [N] int64 and `prediction_time` [N] datetime64[us]: the keys of each row;
- `pooled` [N, Dp] float32: one vector per prediction;
- `present` [N] bool: False where the patient has no data for this modality (all-zero rows);
- `tokens` [N, T, D] float32 or None: dense token features (e.g. CT patches, CLMBR states);
- `token_codes` [N, T, K] int32 or None: sparse multi-hot code ids per token (-1 = padding),
  embedded by the fusion model so a large vocabulary never becomes a dense [T, V] tensor;
- `mask` [N, T] bool or None: True where a token is real (required when tokens exist).

Saved as one `.npy` per array plus `meta.json`; `load(..., mmap=True)` memory-maps the arrays
so a 100k-patient cohort need not fit in RAM.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from survfuse.atomic import atomic_dir

__all__ = ["MODALITIES", "Modality", "ModalityFeatures"]

#: The modalities, exactly: what encoders produce and fusion models read.
MODALITIES = ("ct", "ehr")
Modality = Literal["ct", "ehr"]


def _as(a: Any, dtype: Any) -> Any:
    """Return `a` with `dtype` (no copy when it already has it, so memory maps are kept)."""
    if isinstance(a, np.ndarray) and a.dtype == dtype:
        return a
    return np.asarray(a, dtype=dtype)


_ARRAYS = ("subject_id", "prediction_time", "pooled", "present", "tokens", "token_codes", "mask")


@dataclass
class ModalityFeatures:
    """Per-prediction features of one modality (see module docstring for shapes)."""

    subject_id: NDArray[np.int64]
    prediction_time: NDArray[np.datetime64]
    pooled: NDArray[np.float32]
    present: NDArray[np.bool_]
    tokens: NDArray[np.float32] | None = None
    mask: NDArray[np.bool_] | None = None
    token_codes: NDArray[np.int32] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.subject_id = np.asarray(self.subject_id, dtype=np.int64)
        self.prediction_time = np.asarray(self.prediction_time, dtype="datetime64[us]")
        # coerce dtypes without copying arrays that already have them (memory-mapped ones stay so)
        self.pooled = _as(self.pooled, np.float32)
        self.present = _as(self.present, np.bool_)
        if self.tokens is not None:
            self.tokens = _as(self.tokens, np.float32)
        if self.mask is not None:
            self.mask = _as(self.mask, np.bool_)
        if self.token_codes is not None:
            self.token_codes = _as(self.token_codes, np.int32)
        self.validate()

    # ------------------------------------------------------------------ shape facts
    def __len__(self) -> int:
        return int(self.subject_id.shape[0])

    @property
    def pooled_dim(self) -> int:
        return int(self.pooled.shape[1])

    @property
    def num_tokens(self) -> int:
        """T, or 0 when the encoder produces pooled features only."""
        if self.mask is None:
            return 0
        return int(self.mask.shape[1])

    @property
    def token_dim(self) -> int:
        """D of the dense token features (0 when tokens are sparse codes only or absent)."""
        return 0 if self.tokens is None else int(self.tokens.shape[2])

    @property
    def vocab_size(self) -> int:
        """Number of code ids for `token_codes` (from meta; 0 when there are no codes)."""
        return int(self.meta.get("vocab_size", 0)) if self.token_codes is not None else 0

    def validate(self) -> None:
        """Check shapes and dtypes agree; raise ValueError naming the array that does not."""
        n = self.subject_id.shape[0]
        name = self.meta.get("encoder", "features")

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"{name}: {msg}")

        need(self.prediction_time.shape == (n,), f"prediction_time must be [{n}]")
        need(self.pooled.ndim == 2 and self.pooled.shape[0] == n, f"pooled must be [{n}, D]")
        need(self.present.shape == (n,), f"present must be [{n}]")
        need(self.present.dtype == np.bool_, "present must be bool")
        has_tokens = self.tokens is not None or self.token_codes is not None
        need(has_tokens == (self.mask is not None), "mask is required exactly when tokens exist")
        if self.mask is not None:
            need(self.mask.ndim == 2 and self.mask.shape[0] == n, f"mask must be [{n}, T]")
            need(self.mask.dtype == np.bool_, "mask must be bool")
            t = self.mask.shape[1]
            if self.tokens is not None:
                need(
                    self.tokens.ndim == 3 and self.tokens.shape[:2] == (n, t),
                    f"tokens must be [{n}, {t}, D], got {self.tokens.shape}",
                )
            if self.token_codes is not None:
                need(
                    self.token_codes.ndim == 3 and self.token_codes.shape[:2] == (n, t),
                    f"token_codes must be [{n}, {t}, K], got {self.token_codes.shape}",
                )
                need("vocab_size" in self.meta, "token_codes need meta['vocab_size']")

    # ------------------------------------------------------------------ row operations
    def select(self, index: ArrayLike) -> ModalityFeatures:
        """Rows `index` (integer positions or a boolean mask), materialised in memory."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)

        def take(a: NDArray[Any] | None) -> Any:
            return None if a is None else np.ascontiguousarray(a[idx])

        return replace(
            self,
            subject_id=take(self.subject_id),
            prediction_time=take(self.prediction_time),
            pooled=take(self.pooled),
            present=take(self.present),
            tokens=take(self.tokens),
            mask=take(self.mask),
            token_codes=take(self.token_codes),
            meta=dict(self.meta),
        )

    def align(self, subject_id: ArrayLike, prediction_time: ArrayLike) -> ModalityFeatures:
        """Reorder to the given keys; keys without a row become `present=False` zero rows."""
        sid = np.asarray(subject_id, dtype=np.int64)
        pt = np.asarray(prediction_time, dtype="datetime64[us]")
        lookup = {
            (int(s), int(t)): i
            for i, (s, t) in enumerate(
                zip(
                    self.subject_id.tolist(),
                    self.prediction_time.astype(np.int64).tolist(),
                    strict=True,
                )
            )
        }
        pos = np.array(
            [
                lookup.get((int(s), int(t)), -1)
                for s, t in zip(sid, pt.astype(np.int64), strict=True)
            ],
            dtype=np.int64,
        )
        found = pos >= 0
        safe = np.where(found, pos, 0)
        out = self.select(safe) if len(self) else self._empty_like(len(sid))
        out.subject_id = sid
        out.prediction_time = pt
        out.present = out.present & found
        for name in ("pooled", "tokens", "mask", "token_codes"):
            arr = getattr(out, name)
            if arr is not None and (~found).any():
                arr = np.array(arr, copy=True)
                arr[~found] = -1 if name == "token_codes" else 0
                setattr(out, name, arr)
        return out

    def _empty_like(self, n: int) -> ModalityFeatures:
        def zeros(a: NDArray[Any] | None) -> Any:
            return None if a is None else np.zeros((n, *a.shape[1:]), dtype=a.dtype)

        return replace(
            self,
            subject_id=np.zeros(n, np.int64),
            prediction_time=np.zeros(n, "datetime64[us]"),
            pooled=zeros(self.pooled),
            present=np.zeros(n, bool),
            tokens=zeros(self.tokens),
            mask=zeros(self.mask),
            token_codes=zeros(self.token_codes),
        )

    @staticmethod
    def concat(parts: list[ModalityFeatures]) -> ModalityFeatures:
        """Stack rows of features from the same encoder.

        Token counts T (and codes per token K) may differ between parts: shorter parts are
        padded with masked-out tokens (zeros; code id -1).
        """
        if not parts:
            raise ValueError("concat needs at least one ModalityFeatures")
        first = parts[0]
        for i, p in enumerate(parts[1:], start=1):
            for name in ("tokens", "mask", "token_codes"):
                if (getattr(p, name) is None) != (getattr(first, name) is None):
                    raise ValueError(
                        f"concat: part {i} has {name} but part 0 does not (or vice versa)"
                    )
            if p.pooled_dim != first.pooled_dim:
                raise ValueError(
                    f"concat: part {i} has pooled dim {p.pooled_dim} != {first.pooled_dim}"
                )
            if p.tokens is not None and p.token_dim != first.token_dim:
                raise ValueError(
                    f"concat: part {i} has token dim {p.token_dim} != {first.token_dim}"
                )
        t = max(p.num_tokens for p in parts)
        k = max((p.token_codes.shape[2] for p in parts if p.token_codes is not None), default=0)

        def pad(name: str, a: Any) -> Any:
            if name not in ("tokens", "mask", "token_codes"):
                return a
            width = [(0, 0), (0, t - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
            if name == "token_codes":
                width[2] = (0, k - a.shape[2])
            fill = -1 if name == "token_codes" else 0
            return np.pad(a, width, constant_values=fill) if any(w[1] for w in width) else a

        def cat(name: str) -> Any:
            arrays = [getattr(p, name) for p in parts]
            if arrays[0] is None:
                return None
            return np.concatenate([pad(name, a) for a in arrays], axis=0)

        return ModalityFeatures(
            subject_id=cat("subject_id"),
            prediction_time=cat("prediction_time"),
            pooled=cat("pooled"),
            present=cat("present"),
            tokens=cat("tokens"),
            mask=cat("mask"),
            token_codes=cat("token_codes"),
            meta=dict(first.meta),
        )

    # ------------------------------------------------------------------ disk
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write arrays + meta.json atomically (a temp folder renamed into place)."""

        def fill(tmp: Path) -> None:
            for name in _ARRAYS:
                arr = getattr(self, name)
                if arr is None:
                    continue
                if name == "prediction_time":
                    arr = arr.astype("datetime64[us]").astype(np.int64)
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            (tmp / "meta.json").write_text(
                json.dumps(self.meta, sort_keys=True, separators=(",", ":"))
            )

        return atomic_dir(Path(directory), fill)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, mmap: bool = True) -> ModalityFeatures:
        """Load features saved by `save`; large arrays are memory-mapped when `mmap`."""
        src = Path(directory)
        if not (src / "meta.json").exists():
            raise FileNotFoundError(f"no saved ModalityFeatures in {src} (meta.json missing)")
        mode: Literal["r"] | None = "r" if mmap else None
        arrays: dict[str, Any] = {}
        for name in _ARRAYS:
            f = src / f"{name}.npy"
            arrays[name] = np.load(f, mmap_mode=mode) if f.exists() else None
        arrays["prediction_time"] = np.asarray(arrays["prediction_time"]).astype("datetime64[us]")
        arrays["subject_id"] = np.asarray(arrays["subject_id"])
        arrays["present"] = np.asarray(arrays["present"])
        meta = json.loads((src / "meta.json").read_text())
        return cls(meta=meta, **arrays)
