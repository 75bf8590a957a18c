"""`predict_cohort`: risks and survival curves for new patients from a finished cell.

Uses the run's stored, fitted encoders (`RUN_DIR/encoders/<modality>/<label>`) and the cell's
saved model (`RUN_DIR/cells/<cell_id>/model`). The new cohort needs only `subject_id` and
`prediction_time`. A patient without a CT study or without EHR events gets `has_<modality> =
False` and still receives a prediction from the modalities it has (the strategies treat absence
as a mask); a patient with no data in any modality the model uses gets NaN risk and survival:
the model would return its no-information output (e.g. risk 0.0), which reads like a real
prediction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from survfuse.data.cohort import read_table
from survfuse.data.dates import parse_dates
from survfuse.data.meds import MEDSDataset
from survfuse.encoders.base import CTSource, Encoder
from survfuse.experiment.cell import surv_column
from survfuse.experiment.config_load import parse_config
from survfuse.experiment.grid import CellSpec
from survfuse.experiment.harmonise_step import SITE_MAPS
from survfuse.experiment.rundir import RunDir, write_parquet
from survfuse.features_harmonise import FeatureMaps, harmonise_features
from survfuse.fusion import FusionSurvivalModel
from survfuse.registry import look_up_option

__all__ = ["load_keys", "missing_data_warning", "predict_cohort"]

#: Subject ids a warning names before "and N more".
_SHOWN_IDS = 5


def load_keys(path: str | Path, *, date_format: str | None = None) -> pl.DataFrame:
    """`subject_id` (Int64) and `prediction_time` (Datetime us) of a parquet or CSV cohort.

    Text dates must be ISO 8601 unless `date_format` (a strftime pattern) declares them.
    """
    path = Path(path)
    df = read_table(path)
    for col in ("subject_id", "prediction_time"):
        if col not in df.columns:
            raise ValueError(f"{path}: missing column {col!r} (has {df.columns})")
    if df.schema["prediction_time"] == pl.String:
        df = df.with_columns(
            parse_dates(
                df["prediction_time"],
                source=str(path),
                column="prediction_time",
                date_format=date_format,
            )
        )
    return df.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    )


def missing_data_warning(predictions: pl.DataFrame) -> str | None:
    """Return one line naming the patients with no data in any modality (NaN risk), or None.

    The patients are those of `predict_cohort`'s output; None when every patient has some data.
    """
    flags = [c for c in predictions.columns if c.startswith("has_")]
    if not flags:
        return None
    none = predictions.filter(~pl.any_horizontal(flags))
    if not none.height:
        return None
    ids = [str(i) for i in none["subject_id"].head(_SHOWN_IDS).to_list()]
    more = f" and {none.height - len(ids)} more" if none.height > len(ids) else ""
    modalities = " or ".join(c.removeprefix("has_").upper() for c in flags)
    return (
        f"{none.height} of {predictions.height} patients have no {modalities} data at their "
        f"prediction_time (risk NaN): subject_id {', '.join(ids)}{more}"
    )


#: rows with features a site without a map of its own in the run needs to fit one
MIN_NEW_SITE_ROWS = 20


def _sites(cohort: str | Path, method: str) -> np.ndarray:
    df = read_table(Path(cohort))
    if "site" not in df.columns:
        raise ValueError(
            f"{cohort}: the run harmonised its features per site ({method}); the cohort needs "
            f"a `site` column to map each patient's features (has {df.columns})"
        )
    return df["site"].cast(pl.Utf8).to_numpy().astype(str)


def _harmonise(feats: Any, site: np.ndarray, folder: Path, method: str) -> tuple[Any, list[str]]:
    """Map new patients' features as the run mapped its cohort (`FeatureMaps` of `folder`).

    Returns them and, per row, which map applied: "reference" (a reference site: unchanged),
    "run" (the run's map of that site) or "cohort" (a site new to the run: fitted on this
    cohort's own unlabelled features of that site, transductive like the run's external site).
    """
    path = folder / SITE_MAPS
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the run's harmonised features predate saved site maps; run "
            "`survfuse run` on the same run directory again to write them"
        )
    maps = FeatureMaps.load(path)
    known = set(maps.pooled.sites)
    reference = set(maps.reference_sites or ())
    maps = maps.with_new_sites(feats, site, min_rows=MIN_NEW_SITE_ROWS)
    how = ["reference" if s in reference else "run" if s in known else "cohort" for s in site]
    out = harmonise_features(feats, site, method, reference_sites=maps.reference_sites, maps=maps)
    return out, how


def predict_cohort(
    run_dir: str | Path,
    cell_id: str,
    cohort: str | Path,
    *,
    ct_index: str | Path | None = None,
    meds_root: str | Path | None = None,
    out: str | Path | None = None,
    date_format: str | None = None,
) -> tuple[pl.DataFrame, Path]:
    """Predict for the rows of `cohort` with cell `cell_id` of `run_dir`; write and return them.

    `ct_index` / `meds_root` point at the new patients' data (default: the run's sources);
    `date_format` declares a CSV cohort's date format (default: the run config's
    `data.date_format`, else ISO 8601 only).
    Output columns: subject_id, prediction_time, risk (higher = worse), `surv_<t>` = S(t) at the
    run's survival times, and `has_<modality>` for each modality the model uses. Risk and
    survival are NaN where every `has_<modality>` is False. A run that harmonised its features
    per site needs a `site` column: each patient's features are mapped with the run's map of
    that site (development sites, as reference, unchanged); a site the run did not see gets a
    map fitted on its own rows of this cohort (at least `MIN_NEW_SITE_ROWS`, features only),
    and the column `harmonise_map` says which applied ("reference", "run" or "cohort").
    """
    rd = RunDir(run_dir)
    raw = rd.read_config_yaml()
    cells = sorted(p.name for p in rd.cells.glob("*") if (p / "status.json").exists())
    look_up_option(cell_id, cells, kind="cell", where=f"the folders of {rd.cells}")
    st = rd.cell_status(cell_id) or {}
    if st.get("status") != "done":
        raise ValueError(f"cell {cell_id!r} did not finish ({st.get('status')}): {st.get('error')}")
    spec = CellSpec.model_validate(json.loads((rd.cell(cell_id) / "spec.json").read_text()))
    cfg = parse_config(raw, base=rd.root, source=str(rd.config))
    keys = load_keys(cohort, date_format=date_format or cfg.data.date_format)
    harmonised = [m for m in spec.modalities if cfg.harmonise.applies(m)]
    site = _sites(cohort, cfg.harmonise.method) if harmonised else None

    features: dict[str, Any] = {}
    for modality in spec.modalities:
        key = spec.ct_encoder if modality == "ct" else spec.ehr_encoder
        assert key is not None
        encoder = Encoder.load(rd.encoder_dir(modality, key))
        source: Any
        if modality == "ct":
            path = Path(ct_index) if ct_index is not None else cfg.data.ct_index
            if path is None:
                raise ValueError("the model uses CT: pass --ct-index")
            source = CTSource.from_index(path)
            if ct_index is None and cfg.data.ct_root is not None:
                source = CTSource(index=source.index, root=cfg.data.ct_root, index_path=path)
        else:
            root = Path(meds_root) if meds_root is not None else cfg.data.meds_root
            if root is None:
                raise ValueError("the model uses EHR: pass --meds-root")
            source = MEDSDataset(root)
        features[modality] = encoder.encode(keys, source)
        if modality in harmonised:
            assert site is not None
            features[modality], how = _harmonise(
                features[modality], site, rd.root / spec.features[modality], cfg.harmonise.method
            )

    model = FusionSurvivalModel.load(rd.cell(cell_id) / "model", device="cpu")
    risk = np.asarray(model.predict_risk(features), dtype=np.float64)
    times = np.asarray(spec.survival_times, dtype=np.float64)
    surv = np.asarray(model.predict_survival(features, times), dtype=np.float64)
    has = {m: np.asarray(f.present, dtype=bool) for m, f in features.items()}
    no_data = ~np.logical_or.reduce(list(has.values()))
    risk[no_data] = np.nan
    surv[no_data] = np.nan
    cols: dict[str, Any] = {
        "subject_id": keys["subject_id"],
        "prediction_time": keys["prediction_time"],
        "risk": risk,
    }
    for j, t in enumerate(times):
        cols[surv_column(float(t))] = surv[:, j]
    for modality, flags in has.items():
        cols[f"has_{modality}"] = flags
    if harmonised:
        cols["harmonise_map"] = how
    df = pl.DataFrame(cols)
    target = (
        Path(out)
        if out is not None
        else rd.root / "predictions" / f"{cell_id}__{Path(cohort).stem}.parquet"
    )
    write_parquet(target, df)
    return df, target
