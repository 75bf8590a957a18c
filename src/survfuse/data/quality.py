"""The data manifest: per prediction and modality, whether data is present, missing or failed.

A study must never use bad data silently. Encoders mark a patient's modality `present = False`
when there is nothing to encode; this module says *why*, per row, from what the encoders record
(the CT loader's per-subject failures, `survfuse.data.imaging.CTLoadError` reasons) and what the
features show (no EHR events at or before `prediction_time`). The manifest has one row per
cohort row x modality x encoder:

=================  =========================================================================
subject_id         Int64
prediction_time    Datetime(us)
site, split        String (when the cohort has them)
modality           "ct" | "ehr"
encoder            the encoder's label in the study
status             "present" | "missing" (no data to use) | "failed" (data there but unusable)
reason             String, null when present (e.g. "file not found", "too few slices: ...")
=================  =========================================================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

__all__ = [
    "MANIFEST_SCHEMA",
    "NONFINITE_OUTPUT",
    "STATUSES",
    "manifest_rows",
    "manifest_summary",
]

STATUSES = ("present", "missing", "failed")
MANIFEST_SCHEMA = {
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "modality": pl.String(),
    "encoder": pl.String(),
    "status": pl.String(),
    "reason": pl.String(),
}
#: Reason suffix of a present row whose encoder output is NaN / inf (the run stops on it).
NONFINITE_OUTPUT = "output has NaN or infinite values"
_NO_DATA = {
    "ct": "no CT study at or before prediction_time",
    "ehr": "no EHR events at or before prediction_time",
}
# Statuses of the CT loader's manifest (survfuse.data.ct_index.iter_ct) -> ours.
_LOADER_STATUS = {"no_study": "missing", "failed": "failed"}


def _key(sid: Any, pt: Any) -> tuple[int, str]:
    return int(sid), str(np.datetime64(pt, "us")) if pt is not None else ""


def manifest_rows(
    keys: pl.DataFrame,
    present: Sequence[bool] | np.ndarray,
    *,
    modality: str,
    encoder: str,
    loader_manifest: Sequence[dict[str, Any]] = (),
    features: np.ndarray | None = None,
) -> pl.DataFrame:
    """Manifest rows of one encoder's output.

    Parameters
    ----------
    keys : DataFrame [N] with `subject_id`, `prediction_time` (the encoded rows, in order).
    present : [N] bool, the features' `present`.
    loader_manifest : per-row records the encoder's data loader wrote for rows it could not use
        (`subject_id`, `prediction_time`, `status` in {"no_study", "failed"}, `reason`).
    features : optional [N, D] pooled features; a present row with a NaN or infinite value is
        reported as "failed" (an encoder bug or bad input must not reach a model silently).
    """
    n = keys.height
    pres = np.asarray(present, dtype=bool)
    if pres.shape != (n,):
        raise ValueError(f"present must be [{n}], got {pres.shape}")
    status = np.where(pres, "present", "missing").astype(object)
    reason = np.full(n, _NO_DATA.get(modality, "no data"), dtype=object)
    reason[pres] = None
    if loader_manifest:
        pos = {
            _key(s, p): i
            for i, (s, p) in enumerate(
                zip(keys["subject_id"].to_list(), keys["prediction_time"].to_list(), strict=True)
            )
        }
        for rec in loader_manifest:
            i = pos.get(_key(rec["subject_id"], rec.get("prediction_time")))
            if i is None or pres[i]:
                continue
            status[i] = _LOADER_STATUS.get(str(rec.get("status")), "failed")
            reason[i] = rec.get("reason") or status[i]
    if features is not None:
        bad = pres & ~np.isfinite(np.asarray(features, dtype=np.float64)).all(axis=1)
        status[bad] = "failed"
        reason[bad] = f"{encoder} {NONFINITE_OUTPUT}"
    return pl.DataFrame(
        {
            "subject_id": keys["subject_id"].cast(pl.Int64),
            "prediction_time": keys["prediction_time"].cast(pl.Datetime("us")),
            "modality": [modality] * n,
            "encoder": [encoder] * n,
            "status": status.tolist(),
            "reason": reason.tolist(),
        },
        schema=MANIFEST_SCHEMA,
    )


def _short(reason: str) -> str:
    # Group reasons by their kind, not by path or number: "file not found", "too few slices".
    head = reason.split(":")[0].strip()
    return head if len(head) <= 60 else head[:57] + "..."


def manifest_summary(manifest: pl.DataFrame) -> list[str]:
    """Summarise the manifest in one line per modality x encoder.

    E.g. "ct (ct_radiomics): 2,011 present, 489 missing (no CT study ...: 489), 3 failed (...: 3)".
    """
    lines = []
    for (modality, encoder), part in manifest.group_by(
        ["modality", "encoder"], maintain_order=True
    ):
        bits = []
        for st in STATUSES:
            rows = part.filter(pl.col("status") == st)
            if rows.height == 0 and st != "present":
                continue
            text = f"{rows.height:,} {st}"
            if st != "present":
                counts = Counter(_short(r or st) for r in rows["reason"].to_list())
                text += " (" + ", ".join(f"{k}: {v:,}" for k, v in counts.most_common(6))
                text += ", ..." if len(counts) > 6 else ""
                text += ")"
            bits.append(text)
        lines.append(f"{modality} ({encoder}): " + ", ".join(bits))
    return lines
