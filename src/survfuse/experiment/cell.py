"""Train and score one grid cell: a pure function of its spec and the run directory.

`run_cell(spec, run_dir)` reads the cohort (with splits) and the cell's feature folders from the
run directory, trains a `FusionSurvivalModel` on the training split (early stopping on the
validation split), predicts risk and survival for every row, and writes the cell folder
atomically. Any exception is recorded in the cell's `status.json` as a failed cell instead of
propagating, so one bad cell never stops a grid. Executors (local, Ray) all call this function.
"""

from __future__ import annotations

import time as _time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import survfuse
from survfuse.data.cohort import outcome_columns
from survfuse.experiment.config import TrainingConfig
from survfuse.experiment.grid import CellSpec
from survfuse.experiment.rundir import RunDir, atomic_dir, write_json
from survfuse.features import ModalityFeatures
from survfuse.fusion import FusionSurvivalModel
from survfuse.fusion.cross_fit import cross_fitted_validation

__all__ = ["CellResult", "record_failure", "run_cell", "surv_column"]


@dataclass(frozen=True)
class CellResult:
    """What happened to a cell: `status` is "done", "cached" (finished earlier) or "failed"."""

    cell_id: str
    status: str
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def surv_column(t: float) -> str:
    """Name of the predictions column holding S(t): `surv_365` or `surv_182.5`."""
    return f"surv_{t:g}"


def load_features(run_dir: RunDir, spec: CellSpec) -> dict[str, Any]:

    return {m: ModalityFeatures.load(run_dir.root / p, mmap=True) for m, p in spec.features.items()}


def _select(features: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    return {m: f.select(idx) for m, f in features.items()}


def build_model(spec: CellSpec) -> Any:

    training = TrainingConfig.model_validate(spec.training)
    return FusionSurvivalModel.from_options(
        spec.strategy_name,
        training.options(),
        head=spec.head,
        strategy_params=dict(spec.strategy_params),
        head_params=training.head_params,
        seed=spec.seed,
    )


def _train_and_predict(spec: CellSpec, run_dir: RunDir, out: Path) -> None:
    cohort = pl.read_parquet(run_dir.cohort)
    tcol, ecol = outcome_columns(spec.task)
    time = cohort[tcol].cast(pl.Float64).to_numpy()
    event = cohort[ecol].cast(pl.Boolean).to_numpy()
    split = cohort["split"].to_numpy()
    features = load_features(run_dir, spec)
    sid = cohort["subject_id"].cast(pl.Int64).to_numpy()
    for m, f in features.items():
        if len(f) != len(sid) or not np.array_equal(np.asarray(f.subject_id), sid):
            raise ValueError(f"{spec.features[m]}: feature rows do not follow the cohort's rows")
    train = np.flatnonzero(split == "train")
    val = np.flatnonzero(split == "validation")
    model = build_model(spec)
    validation = (_select(features, val), time[val], event[val]) if val.size else None
    model.fit(_select(features, train), time[train], event[train], validation=validation)

    everything = {m: f.select(np.arange(len(f))) for m, f in features.items()}
    risk = np.asarray(model.predict_risk(everything), dtype=np.float64)
    times = np.asarray(spec.survival_times, dtype=np.float64)
    surv = np.asarray(model.predict_survival(everything, times), dtype=np.float64)
    cross_fitted = cross_fitted_validation(model, times)
    if cross_fitted is not None and val.size:
        # late fusion fits its combination on validation: its validation rows are scored
        # out of fold, so choosing among strategies by validation C is not optimistic
        risk[val], surv[val] = cross_fitted
    if not np.all(np.isfinite(risk)):
        raise FloatingPointError(f"cell {spec.cell_id}: non-finite predicted risk")
    cols: dict[str, Any] = {
        "subject_id": cohort["subject_id"].cast(pl.Int64),
        "prediction_time": cohort["prediction_time"],
        "split": cohort["split"],
        "risk": risk,
    }
    for j, t in enumerate(times):
        cols[surv_column(float(t))] = surv[:, j]
    pl.DataFrame(cols).write_parquet(out / "predictions.parquet")
    model.save(out / "model")
    history = (  # every epoch's keys (a branch may be frozen or dropped late in training)
        pl.DataFrame(list(model.history_), infer_schema_length=None)
        if model.history_
        else pl.DataFrame({"epoch": []})
    )
    history.write_parquet(out / "history.parquet")


def run_cell(spec: CellSpec, run_dir: str | Path) -> CellResult:
    """Train, predict and save one cell (see the module docstring); never raises for cell errors.

    A cell already finished with the same spec digest is not recomputed ("cached").
    """
    rd = RunDir(run_dir)
    digest = spec.digest()
    if rd.is_done(spec.cell_id, digest):
        st = rd.cell_status(spec.cell_id) or {}
        return CellResult(spec.cell_id, "cached", float(st.get("seconds", 0.0)))
    started = _time.time()
    t0 = _time.perf_counter()

    def status(out: Path, state: str, error: str | None = None, tb: str | None = None) -> None:
        write_json(
            out / "status.json",
            {
                "cell_id": spec.cell_id,
                "status": state,
                "digest": digest,
                "seconds": round(_time.perf_counter() - t0, 3),
                "started": started,
                "finished": _time.time(),
                "survfuse_version": survfuse.__version__,
                "error": error,
                "traceback": tb,
            },
        )

    def fill(out: Path) -> None:
        write_json(out / "spec.json", spec.model_dump(mode="json"))
        _train_and_predict(spec, rd, out)  # the model runs torch with `training.threads`
        status(out, "done")

    try:
        atomic_dir(rd.cell(spec.cell_id), fill)
        return CellResult(spec.cell_id, "done", _time.perf_counter() - t0)
    except Exception as exc:  # a failed cell is recorded and the grid goes on
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        return record_failure(
            spec, run_dir, error, traceback.format_exc(), seconds=_time.perf_counter() - t0
        )


def record_failure(
    spec: CellSpec,
    run_dir: str | Path,
    error: str,
    tb: str | None = None,
    *,
    seconds: float = 0.0,
) -> CellResult:
    """Write a failed cell folder (spec.json + status.json with the error); rerunning retries it.

    Executors call this when a worker died before `run_cell` could record anything.
    """
    rd = RunDir(run_dir)

    def fill(out: Path) -> None:
        write_json(out / "spec.json", spec.model_dump(mode="json"))
        write_json(
            out / "status.json",
            {
                "cell_id": spec.cell_id,
                "status": "failed",
                "digest": spec.digest(),
                "seconds": round(seconds, 3),
                "finished": _time.time(),
                "survfuse_version": survfuse.__version__,
                "error": error,
                "traceback": tb,
            },
        )

    atomic_dir(rd.cell(spec.cell_id), fill)
    return CellResult(spec.cell_id, "failed", seconds, error)
