"""The run's harmonisation step: per-site adjusted copies of encoded features.

`harmonise_encoded` writes `RUN/features/harmonised/<modality>/<encoder>/<label>`, the label
being `<method>-<reference>-<fingerprint of features, sites and options>` (reused when present),
with the fitted per-site maps (`site_maps.npz`, which `survfuse predict` applies to new patients),
and `harmonise_summary` records in `RUN/features/harmonise.json` what it used: the method, the
reference, the rows per site and whether external sites' own unlabelled features set their
adjustment (`transductive`), so that a user can tell whether the external evaluation is
transductive.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from survfuse.experiment.config import ExperimentConfig
from survfuse.experiment.rundir import RunDir
from survfuse.features import ModalityFeatures
from survfuse.features_harmonise import fit_feature_maps, harmonise_features

__all__ = ["SITE_MAPS", "harmonise_encoded", "harmonise_record", "harmonise_summary"]

#: file of the fitted per-site maps (`FeatureMaps`) inside a harmonised feature folder
SITE_MAPS = "site_maps.npz"


def harmonise_record(rd: RunDir) -> Path:
    """Return the path of the run's harmonisation record, `features/harmonise.json`."""
    return rd.root / "features" / "harmonise.json"


def _fingerprint(
    feats: ModalityFeatures, site: np.ndarray, method: str, reference: list[str] | None
) -> str:
    h = hashlib.sha256()
    h.update(f"{method}|{reference}".encode())
    h.update(str(feats.meta.get("fingerprint", "")).encode())
    h.update(np.ascontiguousarray(feats.subject_id).tobytes())
    h.update("\0".join(site.tolist()).encode())
    if "fingerprint" not in feats.meta:  # no encoder fingerprint: hash the values themselves
        h.update(np.ascontiguousarray(feats.pooled).tobytes())
    return h.hexdigest()


def harmonise_encoded(
    cfg: ExperimentConfig,
    rd: RunDir,
    cohort: pl.DataFrame,
    modality: str,
    key: str,
    feats: ModalityFeatures,
) -> Path:
    """Harmonise `feats` (rows in the cohort's order) across the cohort's `site` column.

    Uses `cfg.harmonise.method`; returns the saved folder.
    """
    method = cfg.harmonise.method
    if "site" not in cohort.columns:
        raise ValueError(f"harmonise: {method} needs a `site` column in {cfg.data.cohort}")
    sid = cohort["subject_id"].cast(pl.Int64).to_numpy()
    if not np.array_equal(np.asarray(feats.subject_id), sid):
        raise ValueError(f"harmonise: {modality} {key} feature rows do not follow the cohort")
    site = cohort["site"].cast(pl.Utf8).to_numpy().astype(str)
    reference = None
    if cfg.harmonise.reference == "development":
        dev = cohort.filter(pl.col("split") != "external_test")["site"].cast(pl.Utf8)
        reference = sorted(dev.unique().to_list())
    fp = _fingerprint(feats, site, method, reference)
    # the fingerprint is in the path: a cell's spec (and so its digest) changes with it
    label = f"{method}-{cfg.harmonise.reference}-{fp[:12]}"
    folder = rd.root / "features" / "harmonised" / modality / key / label
    meta_file = folder / "meta.json"
    done = meta_file.exists() and json.loads(meta_file.read_text()).get("harmonise_fp") == fp
    if not (done and (folder / SITE_MAPS).exists()):
        maps = fit_feature_maps(feats, site, method, reference_sites=reference)
        out = harmonise_features(feats, site, method, reference_sites=reference, maps=maps)
        out.meta["harmonise_fp"] = fp
        ModalityFeatures.save(out, folder)
        maps.save(folder / SITE_MAPS)  # `survfuse predict` maps new patients with these
    return folder


def harmonise_summary(
    cfg: ExperimentConfig, rd: RunDir, cohort: pl.DataFrame, folders: dict[str, Path]
) -> dict[str, Any]:
    """Return what harmonisation used in this run (`features/harmonise.json`).

    `folders` maps `modality/encoder` to each harmonised folder.
    """
    ext = cohort.filter(pl.col("split") == "external_test")
    external = sorted(ext["site"].cast(pl.Utf8).unique().to_list()) if "site" in ext.columns else []
    features = {}
    for name, folder in folders.items():
        meta = json.loads((folder / "meta.json").read_text())
        features[name] = {
            "folder": str(folder.relative_to(rd.root)),
            "rows_per_site": meta["harmonise"]["rows_per_site"],
            "reference_sites": meta["harmonise"]["reference_sites"],
        }
    return {
        "method": cfg.harmonise.method,
        "modalities": list(cfg.harmonise.modalities) if cfg.harmonise.method != "none" else [],
        "reference": cfg.harmonise.reference,
        "uses": "each site's unlabelled encoder outputs (never outcomes, splits or labels)",
        "external_sites": external,
        "transductive": cfg.harmonise.transductive(external),
        "features": features,
    }
