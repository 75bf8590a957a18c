"""The run directory: its layout, atomic writes and which cells are finished.

Layout::

    RUN_DIR/config.yaml                 the resolved config (absolute paths, defaults filled in)
    RUN_DIR/run.json                    survfuse version, start/finish times, cell counts
    RUN_DIR/data/cohort.parquet         the cohort with its `split` column (every task's outcome)
    RUN_DIR/data/splits.parquet         subject_id -> split (kept on resume)
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

__all__ = [
    "RunDir",
    "atomic_dir",
    "write_json",
    "write_parquet",
    "write_text",
]


def write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: Path, df: pl.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    df.write_parquet(tmp)
    os.replace(tmp, path)
    return path


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
        return self.root / "encoders" / modality / key

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    def cell(self, cell_id: str) -> Path:
        return self.cells / cell_id

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
        """The cell's `status.json`, or None when the cell has not finished (or never ran)."""
        f = self.cell(cell_id) / "status.json"
        if not f.exists():
            return None
        try:
            out: dict[str, Any] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return out

    def is_done(self, cell_id: str, digest: str) -> bool:
        """True when the cell finished successfully for exactly this spec digest."""
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
        data: dict[str, Any] = yaml.safe_load(self.config.read_text())
        return data
