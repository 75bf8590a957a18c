"""The run directory: its layout, atomic writes and which cells are finished.

Layout::

    RUN_DIR/config.yaml                 the resolved config (absolute paths, defaults filled in)
    RUN_DIR/run.json                    survfuse version, start/finish times, cell counts
    RUN_DIR/data/cohort.parquet         the cohort with its `split` column (every task's outcome)
    RUN_DIR/data/splits.parquet         subject_id -> split (kept on resume)
    RUN_DIR/data_manifest.parquet       per row x modality x encoder: present / missing / failed
                                        and the reason (survfuse.data.quality)
    RUN_DIR/.survfuse.lock              the running process's lock (survfuse.experiment.lock)
    RUN_DIR/features/store/             the FeatureStore cache
    RUN_DIR/features/index.json         modality -> encoder label -> feature folder (relative)
    RUN_DIR/encoders/<modality>/<label> fitted encoders (for `survfuse predict`)
    RUN_DIR/cells/<cell_id>/            spec.json, status.json, predictions.parquet,
                                        history.parquet (training curve), model/
    RUN_DIR/metrics.parquet, metrics.csv
    RUN_DIR/report.html, summary.md

A cell folder is written under a temporary name and renamed into place, so after a crash (even
`kill -9`) a cell folder is either complete or absent (`status.json` is the last file written).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import polars as pl

from survfuse.atomic import atomic_dir
from survfuse.paths import check_cell_id, check_name, inside

__all__ = [
    "RunDir",
    "atomic_dir",
    "remove_debris",
    "write_json",
    "write_parquet",
    "write_text",
]


def _atomic_file(path: Path, write: Any) -> Path:
    # Why the cleanup: a full disk or a permission error must not leave `.x.tmp-*` behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (temp file in the same folder, then rename)."""
    return _atomic_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON with sorted keys to `path` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: Path, df: pl.DataFrame) -> Path:
    """Write `df` to `path` atomically (temp file in the same folder, then rename)."""
    return _atomic_file(path, df.write_parquet)


# Temp names of survfuse's atomic writes: `.name.tmp-XXXXXXXX` (files and folders),
# `.name.tmp` (csv) and the store's `.fingerprint.XXXXXXXX`.
_DEBRIS = (".*.tmp-*", ".*.tmp", ".fingerprint.*")


def remove_debris(rd: RunDir, *, store: bool = True) -> int:
    """Remove the temp files and folders an interrupted run left in `rd`; return how many.

    Call it only while holding the run folder's lock (`survfuse.experiment.lock.RunLock`): then
    no other process is writing here. `store=False` leaves `features/store` alone (a store
    shared with other runs is theirs too).
    """
    import shutil

    removed = 0
    if not rd.root.is_dir():
        return 0
    for pattern in _DEBRIS:
        for p in sorted(rd.root.rglob(pattern), key=lambda q: len(q.parts), reverse=True):
            if not store and p.is_relative_to(rd.store):
                continue
            if not p.exists():  # inside a folder removed already
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


class RunDir:
    """Paths of one run directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def cohort(self) -> Path:
        return self.root / "data" / "cohort.parquet"

    @property
    def splits(self) -> Path:
        return self.root / "data" / "splits.parquet"

    @property
    def store(self) -> Path:
        return self.root / "features" / "store"

    @property
    def features_index(self) -> Path:
        return self.root / "features" / "index.json"

    def encoder_dir(self, modality: str, key: str) -> Path:
        return inside(self.root, Path("encoders", modality, check_name(key, "encoder label")))

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    @property
    def data_manifest(self) -> Path:
        return self.root / "data_manifest.parquet"

    def cell(self, cell_id: str) -> Path:
        """Return the folder of a cell; the id is checked so that it cannot name a path outside."""
        return inside(self.cells, check_cell_id(cell_id), "cell folder")

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.parquet"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"

    def cell_status(self, cell_id: str) -> dict[str, Any] | None:
        """Return the cell's `status.json`, or None when it has not finished (or never ran)."""
        f = self.cell(cell_id) / "status.json"
        if not f.exists():
            return None
        try:
            out: dict[str, Any] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return out

    def is_done(self, cell_id: str, digest: str) -> bool:
        """Return True when the cell finished successfully for exactly this spec digest."""
        st = self.cell_status(cell_id)
        return (
            st is not None
            and st.get("status") == "done"
            and st.get("digest") == digest
            and (self.cell(cell_id) / "predictions.parquet").exists()
        )

    def read_config_yaml(self) -> dict[str, Any]:
        import yaml

        if not self.config.exists():
            raise FileNotFoundError(f"{self.root} is not a survfuse run (no config.yaml)")
        try:
            data = yaml.safe_load(self.config.read_text())
        except yaml.YAMLError as exc:  # e.g. a `!!python` tag: never constructed
            raise ValueError(
                f"{self.config}: not a survfuse config ({' '.join(str(exc).split())})"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.config}: not a survfuse config (not a mapping)")
        return data
