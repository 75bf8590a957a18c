"""`recalibrate_run`: refit each cell's baseline hazard (and optionally its slope) on a new site.

The refit uses a labelled sample of the new site, as a separate step whose output never enters
the run's test metrics.

For every finished cell and every task the sample has outcomes for, the cell's predicted
S(h) at the calibration horizon h (`evaluation.calibration_horizon`) for the sample's rows is
taken from the cell's `predictions.parquet` (rows of the run) or computed with the cell's saved
model and encoders (`predict_cohort`, new patients), and `survival.recalibration` is fitted on
the sample's outcomes. Written under `RUN/recalibrated/<cohort stem>/` (or `out`):

- `recalibration.parquet` / `.csv`: per cell: task, model, seed, method, horizon, sample size and
  events, the calibration slope and intercept of the original predictions on the sample, and
  the fitted slope and intercept (log H0'(h));
- `cells/<cell_id>/recalibration.json`: the fitted recalibration (baseline hazard included),
  to apply to later predictions (`Recalibration.from_dict(...).survival(...)`);
- `cells/<cell_id>/predictions.parquet`: the sample's recalibrated risk and `surv_<t>`;
- `manifest.json`: run, sample file, method, and what the numbers are (in-sample for the
  sample; the run's `metrics.parquet` is not touched).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from survfuse.data.cohort import outcome_columns, read_table
from survfuse.data.dates import parse_dates
from survfuse.experiment.cell import surv_column
from survfuse.experiment.config_load import parse_config
from survfuse.experiment.grid import CellSpec
from survfuse.experiment.predict import predict_cohort
from survfuse.experiment.rundir import RunDir, write_json, write_parquet
from survfuse.metrics.calibration_ci import CalibrationIntercept, CalibrationSlope
from survfuse.survival.recalibration import fit_recalibration

__all__ = ["recalibrate_run"]

_KEYS = ["subject_id", "prediction_time"]


def _read_sample(path: Path, tasks: list[str]) -> tuple[pl.DataFrame, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"recalibration sample {path} not found")
    df = read_table(path)  # CSV / TSV text stays text: dates are ISO 8601 only (data.dates)
    for col in _KEYS:
        if col not in df.columns:
            raise ValueError(f"{path}: missing column {col!r} (has {df.columns})")
    if df.schema["prediction_time"] == pl.String:
        times = parse_dates(df["prediction_time"], source=str(path), column="prediction_time")
        df = df.with_columns(times.alias("prediction_time"))
    have = [t for t in tasks if all(c in df.columns for c in outcome_columns(t))]
    if not have:
        wanted = ", ".join("/".join(outcome_columns(t)) for t in tasks)
        raise ValueError(f"{path}: no outcome columns of the run's tasks (expected {wanted})")
    df = df.with_columns(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    )
    if df.select(_KEYS).is_duplicated().any():
        row = df.filter(df.select(_KEYS).is_duplicated()).row(0, named=True)
        raise ValueError(f"{path}: subject {row['subject_id']} appears twice at one time")
    return df, have


def _sample_predictions(
    rd: RunDir, spec: CellSpec, sample: pl.DataFrame, cohort: Path, harmonised: bool
) -> pl.DataFrame:
    """Return the cell's predictions for the sample's rows, in the sample's order."""
    preds = pl.read_parquet(rd.cell(spec.cell_id) / "predictions.parquet").with_columns(
        pl.col("prediction_time").cast(pl.Datetime("us"))
    )
    got = sample.select(_KEYS).join(preds, on=_KEYS, how="left", maintain_order="left")
    if got["risk"].null_count() == 0:
        return got
    if harmonised:
        # Why refuse: the run's features were harmonised per site; new patients' features would
        # need their site's adjustment, which predict_cohort does not apply.
        missing = got.filter(pl.col("risk").is_null()).row(0, named=True)
        raise ValueError(
            f"{cohort}: subject {missing['subject_id']} is not in the run, and the run harmonised "
            "its features per site; recalibrate on rows of the run (its cohort) instead"
        )
    with tempfile.TemporaryDirectory() as tmp:
        df, _ = predict_cohort(rd.root, spec.cell_id, cohort, out=Path(tmp) / "p.parquet")
    return sample.select(_KEYS).join(df, on=_KEYS, how="left", maintain_order="left")


def recalibrate_run(
    run_dir: Path,
    cohort: Path,
    out: Path | None = None,
    *,
    method: str = "baseline",
) -> Path:
    """Recalibrate every finished cell of `run_dir` on the labelled sample `cohort`.

    `cohort` is parquet or CSV: subject_id, prediction_time and each task's outcome columns.
    Returns the output folder (module docstring). `method`: "baseline" (slope fixed at 1) or
    "baseline+slope".
    """
    rd = RunDir(run_dir)
    cohort = Path(cohort)
    cfg = parse_config(rd.read_config_yaml(), base=rd.root, source=str(rd.config))
    sample, tasks = _read_sample(cohort, list(cfg.tasks))
    horizon = cfg.evaluation.cal_horizon
    target = Path(out) if out is not None else rd.root / "recalibrated" / cohort.stem
    harmonised = cfg.harmonise.method != "none"
    rows: list[dict[str, Any]] = []
    for folder in sorted(rd.cells.glob("*")) if rd.cells.is_dir() else []:
        st = rd.cell_status(folder.name) or {}
        if st.get("status") != "done":
            continue
        spec = CellSpec.model_validate(json.loads((folder / "spec.json").read_text()))
        if spec.task not in tasks:
            continue
        preds = _sample_predictions(rd, spec, sample, cohort, harmonised)
        tcol, ecol = outcome_columns(spec.task)
        t = sample[tcol].cast(pl.Float64).to_numpy()
        e = sample[ecol].cast(pl.Boolean).to_numpy()
        s_h = preds[surv_column(horizon)].to_numpy()
        fit = fit_recalibration(t, e, s_h, horizon, method=method)
        times = np.asarray(spec.survival_times, dtype=np.float64)
        surv = fit.survival(s_h, times)
        cols: dict[str, Any] = {
            **{k: preds[k] for k in _KEYS},
            "risk": fit.risk(s_h),
            **{surv_column(float(x)): surv[:, j] for j, x in enumerate(times)},
        }
        cell_out = target / "cells" / spec.cell_id
        write_parquet(cell_out / "predictions.parquet", pl.DataFrame(cols))
        write_json(cell_out / "recalibration.json", fit.to_dict())
        rows.append(
            {
                "cell_id": spec.cell_id,
                "task": spec.task,
                "model": spec.model,
                "seed": spec.seed,
                "method": fit.method,
                "horizon": horizon,
                "n_subjects": fit.n_subjects,
                "n_events": fit.n_events,
                "slope_before": CalibrationSlope(t, e, s_h, horizon).point(),
                "intercept_before": CalibrationIntercept(t, e, s_h, horizon).point(),
                "fitted_slope": fit.slope,
                "fitted_intercept": fit.intercept,
            }
        )
    if not rows:
        raise ValueError(f"{rd.root}: no finished cell for the tasks of {cohort} ({tasks})")
    table = pl.DataFrame(rows)
    write_parquet(target / "recalibration.parquet", table)
    table.write_csv(target / "recalibration.csv")
    write_json(
        target / "manifest.json",
        {
            "run": str(rd.root),
            "sample": str(cohort.resolve()),
            "sample_rows": sample.height,
            "tasks": tasks,
            "method": method,
            "horizon": horizon,
            "note": (
                "Recalibrated on a labelled sample of the new site. These predictions are "
                "fitted on that sample (in-sample); they are not external-test results, and "
                "the run's metrics.parquet is unchanged. Measure the effect on patients of "
                "the site that are not in the sample."
            ),
        },
    )
    return target
