"""The `Encoder` base class, the CT input source and fingerprint helpers.

An encoder turns one modality of a cohort (rows keyed by `subject_id, prediction_time`) into
`ModalityFeatures`. Anything it learns is fitted on the training split only (`fit`), kept in
`state()` arrays so it can be saved, loaded and hashed. `fingerprint()` hashes
name + config + fitted state + survfuse version; the feature store adds the input files.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
from numpy.typing import NDArray

import survfuse
from survfuse.data.ct_index import iter_ct, load_ct_index, select_studies, validate_ct_index
from survfuse.features import Modality, ModalityFeatures
from survfuse.registry import ENCODERS, all_registries

__all__ = [
    "CTSource",
    "Encoder",
    "build_encoder",
    "cohort_keys",
    "hash_arrays",
    "hash_config",
    "hash_files",
    "hash_keys",
    "hash_parts",
    "iter_ct_volumes",
    "register_encoder",
]


# ---------------------------------------------------------------------- fingerprint helpers
def _jsonable(obj: Any) -> Any:
    """Canonical JSON-able form (tuples -> lists, paths -> str, numpy scalars -> python)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "model_dump"):  # pydantic models (e.g. CTPreprocessing)
        return _jsonable(obj.model_dump())
    return obj


def hash_parts(*parts: str) -> str:
    """sha256 hex of the parts joined by NUL (order matters)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def hash_config(config: Any) -> str:
    """sha256 of a config's canonical JSON (key order does not matter)."""
    return hash_parts(json.dumps(_jsonable(config), sort_keys=True, default=str))


def hash_arrays(arrays: Mapping[str, NDArray[Any]]) -> str:
    """sha256 over names, dtypes, shapes and bytes of arrays (fitted state)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def hash_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """sha256 over (resolved path, size, mtime_ns) of each file; a missing file hashes as such.

    Cheap for 100k files (a stat each) and changes whenever a file is rewritten.
    """
    h = hashlib.sha256()
    for p in sorted({str(Path(p).resolve()) for p in paths}):
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def cohort_keys(cohort: pl.DataFrame) -> tuple[NDArray[np.int64], NDArray[np.datetime64]]:
    """(`subject_id` int64 [N], `prediction_time` datetime64[us] [N]) of a cohort frame."""
    for col in ("subject_id", "prediction_time"):
        if col not in cohort.columns:
            raise ValueError(f"cohort is missing column {col!r} (has {cohort.columns})")
    sid = cohort.get_column("subject_id").cast(pl.Int64).to_numpy()
    pt = cohort.get_column("prediction_time").cast(pl.Datetime("us")).to_numpy()
    return np.asarray(sid, dtype=np.int64), np.asarray(pt, dtype="datetime64[us]")


def hash_keys(subject_id: NDArray[np.int64], prediction_time: NDArray[np.datetime64]) -> str:
    """sha256 of the ordered (subject_id, prediction_time) keys."""
    return hash_arrays(
        {
            "subject_id": np.asarray(subject_id, np.int64),
            "prediction_time": np.asarray(prediction_time, "datetime64[us]").astype(np.int64),
        }
    )


# ---------------------------------------------------------------------- CT source
@dataclass
class CTSource:
    """Where CT studies live: a CT index (`subject_id`, `study_time`, `path`) and its folder.

    Relative paths in `index` resolve against `root` (the index file's folder).
    `lookback_days` limits how old the latest study at or before `prediction_time` may be.
    """

    index: pl.DataFrame
    root: Path = field(default_factory=Path.cwd)
    lookback_days: float | None = None
    index_path: Path | None = None

    def __post_init__(self) -> None:

        self.root = Path(self.root)
        where = f"CT index {self.index_path}" if self.index_path else "CT index"
        self.index = validate_ct_index(self.index, source=where, root=self.root)

    @classmethod
    def from_index(
        cls, path: str | os.PathLike[str], *, lookback_days: float | None = None
    ) -> CTSource:
        """Read a CT index (parquet or CSV); relative paths resolve against its folder."""
        path = Path(path)
        return cls(
            index=load_ct_index(path),
            root=path.parent,
            lookback_days=lookback_days,
            index_path=path,
        )

    def studies(self, cohort: pl.DataFrame) -> pl.DataFrame:
        """Return the latest study at or before each prediction.

        Columns [subject_id, prediction_time, study_time, path]. Rows follow `cohort`'s order;
        `path` is null when no study qualifies (`survfuse.data.ct_index.select_studies`).
        """
        return select_studies(cohort, self.index, lookback_days=self.lookback_days)

    def input_files(self) -> list[Path]:
        """Every CT file of the index (plus the index file) for the store's fingerprint."""
        files = [Path(p) for p in self.index.get_column("path").to_list() if p is not None]
        if self.index_path is not None:
            files.append(self.index_path)
        return files


def iter_ct_volumes(
    cohort: pl.DataFrame,
    source: CTSource,
    preprocessing: Any,
    studies: pl.DataFrame | None = None,
) -> Iterator[tuple[int, Any, dict[str, Any] | None]]:
    """For each cohort row: (row, CTVolume or None, manifest entry or None).

    Volumes come from `survfuse.data.ct_index.iter_ct` (`load_ct(path, preprocessing)`). A row with
    no study (status "no_study") or whose study failed to load (status "failed", the data layer's
    `CTLoadError` reason) yields None and its manifest entry (JSON-able: prediction_time as ISO
    text), so the store can report why `present` is False. `studies`: `source.studies(cohort)`
    when the caller already has it.
    """
    studies = source.studies(cohort) if studies is None else studies
    for i, (row, vol) in enumerate(iter_ct(studies, preprocessing)):
        if vol is None:
            entry = dict(row)
            entry["prediction_time"] = str(entry["prediction_time"])
            yield i, None, entry
        else:
            yield i, vol, None


# ---------------------------------------------------------------------- encoder base
class Encoder(abc.ABC):
    """A frozen modality encoder.

    Subclasses set `name` and `modality`, implement `encode`, and (when they learn anything)
    `fit` + `state()` / `set_state()`. `learns = False` encoders have `fit` as a no-op.
    """

    name: ClassVar[str] = ""
    modality: ClassVar[Modality]
    learns: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        self._config: dict[str, Any] = dict(config)
        self.fitted: bool = not self.learns

    # ------------------------------------------------------------------ config / state
    def config(self) -> dict[str, Any]:
        """JSON-serialisable hyper-parameters (enough to rebuild the encoder)."""
        return _jsonable(self._config)  # type: ignore[no-any-return]

    def state(self) -> dict[str, NDArray[Any]]:
        """Fitted state as named arrays (empty for encoders that learn nothing)."""
        return {}

    def set_state(self, state: Mapping[str, NDArray[Any]]) -> None:
        """Restore what `state()` returned."""
        if state:
            raise ValueError(f"encoder {self.name!r} has no fitted state, got {sorted(state)}")

    # ------------------------------------------------------------------ fit / encode
    def fit(self, cohort: pl.DataFrame, source: Any) -> Encoder:
        """Learn from the training-split rows `cohort` (no-op unless the encoder learns)."""
        self.fitted = True
        return self

    @abc.abstractmethod
    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        """Features for `cohort`'s rows, in the order of its (subject_id, prediction_time)."""

    def check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(
                f"encoder {self.name!r} learns from the training split: call fit() "
                "(or FeatureStore.encode(..., fit_cohort=train_rows)) before encode()"
            )

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha256 of name + config + fitted state + survfuse version."""
        state = hash_arrays(self.state()) if self.fitted else "unfitted"
        return hash_parts(
            "encoder", self.name, hash_config(self.config()), state, survfuse.__version__
        )

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `encoder.json` (name, config, fitted) and `state.npz` (fitted arrays)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = self.state()
        tmp = d / f".state.{os.getpid()}.npz"
        np.savez(tmp, **state)  # type: ignore[arg-type]
        os.replace(tmp, d / "state.npz")
        info = {
            "name": self.name,
            "config": self.config(),
            "fitted": self.fitted,
            "version": survfuse.__version__,
        }
        (d / "encoder.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Encoder:
        """Rebuild an encoder saved by `save` (from the registry when called on `Encoder`)."""
        d = Path(directory)
        meta_file = d / "encoder.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no saved encoder in {d} (encoder.json missing)")
        info = json.loads(meta_file.read_text())
        klass = cls if cls.name == info["name"] else ENCODERS.get(info["name"])
        enc: Encoder = klass(**info["config"])
        with np.load(d / "state.npz") as z:
            state = {k: z[k] for k in z.files}
        if info.get("fitted", False):
            enc.set_state(state)
            enc.fitted = True
        return enc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


def register_encoder(name: str) -> Any:
    """Class decorator: set `cls.name` and register it in `survfuse.registry.ENCODERS`."""

    def deco(klass: type[Encoder]) -> type[Encoder]:
        klass.name = name
        return ENCODERS.register(name)(klass)  # type: ignore[no-any-return]

    return deco


def build_encoder(name: str, **config: Any) -> Encoder:
    """Instantiate the registered encoder `name` (unknown names suggest the closest)."""
    all_registries()  # imports every encoder module, so every name is registered

    klass = ENCODERS.get(name)
    enc: Encoder = klass(**config)
    return enc
