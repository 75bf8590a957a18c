"""Data layer: cohort tables, splits, MEDS EHR, CT imaging and the cohort simulator."""

from survfuse.data.imaging import (
    CTIndex,
    CTLoadError,
    CTLoadWarning,
    CTPreprocessing,
    CTVolume,
    iter_ct,
    load_ct,
    load_ct_batch,
    load_ct_index,
    select_studies,
    write_ct_manifest,
)
from survfuse.data.meds import MEDSDataset, MEDSSchemaError

__all__ = [
    "CTIndex",
    "CTLoadError",
    "CTLoadWarning",
    "CTPreprocessing",
    "CTVolume",
    "MEDSDataset",
    "MEDSSchemaError",
    "iter_ct",
    "load_ct",
    "load_ct_batch",
    "load_ct_index",
    "select_studies",
    "write_ct_manifest",
]
