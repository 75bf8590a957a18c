"""A CT-only variant of examples/tiny.yaml on a simulated folder (shared by the harmonisation
and recalibration tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from survfuse.experiment.config import ExperimentConfig
from survfuse.experiment.config_load import parse_config

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"


def ct_only_config(sim: Path, strategy: dict[str, Any], **top: Any) -> ExperimentConfig:
    """tiny.yaml on the simulated folder `sim`, the CT encoder only, one `strategy`, and the
    top-level keys `top` replaced (e.g. harmonise, evaluation, feature_store)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["data"] = {
        "cohort": str(sim / "cohort.parquet"),
        "ct_index": str(sim / "ct_index.parquet"),
        "meds_root": str(sim / "meds"),
    }
    raw["encoders"]["ehr"] = []
    raw["strategies"] = [strategy]
    raw.update(top)
    return parse_config(raw)
