"""Data layer: cohort tables, splits, MEDS EHR, CT imaging and the cohort simulator."""

from survfuse.data.cohort import Cohort, CohortError, load_cohort, validate_cohort
from survfuse.data.ct_index import (
    CTIndex,
    iter_ct,
    load_ct_batch,
    load_ct_index,
    select_studies,
    write_ct_manifest,
)
from survfuse.data.imaging import CTLoadError, CTLoadWarning, CTPreprocessing, CTVolume, load_ct
from survfuse.data.meds import MEDSDataset, MEDSSchemaError
from survfuse.data.splits import (
    SPLITS,
    SplitError,
    attach_splits,
    check_splits,
    load_splits,
    make_splits,
    save_splits,
)

__all__ = [
    "SPLITS",
    "CTIndex",
    "CTLoadError",
    "CTLoadWarning",
    "CTPreprocessing",
    "CTVolume",
    "Cohort",
    "CohortError",
    "MEDSDataset",
    "MEDSSchemaError",
    "SplitError",
    "attach_splits",
    "check_splits",
    "iter_ct",
    "load_cohort",
    "load_ct",
    "load_ct_batch",
    "load_ct_index",
    "load_splits",
    "make_splits",
    "save_splits",
    "select_studies",
    "validate_cohort",
    "write_ct_manifest",
]
