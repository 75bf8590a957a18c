"""Recalibration on a labelled sample of a new site (`survival.recalibration`,
`experiment.recalibrate.recalibrate_run`): a deliberately miscalibrated model is restored to
slope 1 / intercept 0 on patients outside the sample, the fitted slope equals lifelines' Cox
coefficient, and the run's own results are untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
from lifelines import CoxPHFitter

from ct_only_study import ct_only_config
from survfuse.experiment.recalibrate import recalibrate_run
from survfuse.experiment.rundir import RunDir
from survfuse.experiment.runner import run_experiment
from survfuse.metrics.calibration_ci import CalibrationIntercept, CalibrationSlope
from survfuse.survival.recalibration import Recalibration, fit_recalibration

H = 365.0


def _site(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponential outcomes with true log-hazard lp (baseline rate 1/1000 per day), censored
    uniformly up to 3 years: time, event, lp."""
    rng = np.random.default_rng(seed)
    lp = rng.normal(size=n)
    t_event = rng.exponential(1000.0 / np.exp(lp))
    cens = rng.uniform(200.0, 1095.0, n)
    return np.minimum(t_event, cens), t_event <= cens, lp


def _miscalibrated(lp: np.ndarray) -> np.ndarray:
    # predicted S(365) of a model too extreme (2 lp) and too pessimistic (x e^1.5)
    true_h = H / 1000.0
    return np.exp(-true_h * np.exp(1.5 + 2.0 * lp))


def _slope_intercept(t: np.ndarray, e: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    return CalibrationSlope(t, e, s, H).point(), CalibrationIntercept(t, e, s, H).point()


def test_recalibration_restores_slope_and_intercept_on_new_patients() -> None:
    t1, e1, lp1 = _site(3000, 1)  # the labelled sample of the new site
    t2, e2, lp2 = _site(3000, 2)  # other patients of that site
    before = _slope_intercept(t2, e2, _miscalibrated(lp2))
    assert before[0] == pytest.approx(0.5, abs=0.06) and before[1] < -1.0

    fit = fit_recalibration(t1, e1, _miscalibrated(lp1), H, method="baseline+slope")
    s2 = fit.survival(_miscalibrated(lp2), [H])[:, 0]
    slope, intercept = _slope_intercept(t2, e2, s2)
    assert slope == pytest.approx(1.0, abs=0.08)
    assert intercept == pytest.approx(0.0, abs=0.08)

    # baseline only: calibration-in-the-large is fixed, the spread (slope 0.5) is kept
    base = fit_recalibration(t1, e1, _miscalibrated(lp1), H, method="baseline")
    s2b = base.survival(_miscalibrated(lp2), [H])[:, 0]
    slope_b, intercept_b = _slope_intercept(t2, e2, s2b)
    assert slope_b == pytest.approx(before[0], abs=1e-9)
    assert abs(intercept_b) < 0.15 < abs(before[1])


def test_in_sample_calibration_is_exact_and_slope_matches_lifelines() -> None:
    t, e, lp = _site(800, 3)
    s = _miscalibrated(lp)
    fit = fit_recalibration(t, e, s, H, method="baseline+slope")
    slope, intercept = _slope_intercept(t, e, fit.survival(s, [H])[:, 0])
    assert slope == pytest.approx(1.0, abs=1e-6) and intercept == pytest.approx(0.0, abs=1e-9)
    cll = np.maximum(np.log(H / 1000.0) + 1.5 + 2.0 * lp, np.log(-np.log(1 - 1e-10)))
    cll = np.minimum(cll, np.log(-np.log(1e-10)))  # the clipping of S to [1e-10, 1 - 1e-10]
    ref = CoxPHFitter().fit(pd.DataFrame({"T": t, "E": e, "cll": cll}), "T", "E")
    assert fit.slope == pytest.approx(float(ref.params_["cll"]), rel=1e-5)
    again = Recalibration.from_dict(json.loads(json.dumps(fit.to_dict())))
    np.testing.assert_array_equal(again.survival(s, [100.0, H]), fit.survival(s, [100.0, H]))


def test_sample_without_events_or_short_follow_up_is_an_error() -> None:
    t, e, lp = _site(100, 4)
    with pytest.raises(ValueError, match="at least one event"):
        fit_recalibration(t, np.zeros_like(e), _miscalibrated(lp), H)
    with pytest.raises(ValueError, match="outside the sample's follow-up"):
        fit_recalibration(np.minimum(t, 100.0), e, _miscalibrated(lp), H)


@pytest.fixture(scope="module")
def small_run(sim_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = ct_only_config(
        sim_small,
        {"name": "linear", "modality": "ct"},
        evaluation={"metrics": ["harrell_c"], "horizons": [180, 365], "bootstrap": 0},
    )
    out = tmp_path_factory.mktemp("recal") / "run"
    run_experiment(cfg, out, progress=False)
    return out


def test_recalibrate_run_writes_a_separate_folder(small_run: Path, tmp_path: Path) -> None:
    rd = RunDir(small_run)
    cohort = pl.read_parquet(rd.cohort)
    sample = cohort.filter(pl.col("site") == "C")
    path = tmp_path / "site_c_sample.parquet"
    sample.write_parquet(path)
    metrics_before = hashlib.sha256(rd.metrics.read_bytes()).hexdigest()

    out = recalibrate_run(small_run, path)
    assert out == rd.root / "recalibrated" / "site_c_sample"
    table = pl.read_parquet(out / "recalibration.parquet")
    assert table["cell_id"].to_list() == ["pe_mortality.linear_ct.ct_radiomics.none.cox.s0"]
    row = table.row(0, named=True)
    assert row["n_subjects"] == sample.height
    assert row["n_events"] == int(sample["pe_mortality_event"].sum())
    preds = pl.read_parquet(out / "cells" / row["cell_id"] / "predictions.parquet")
    t = sample["pe_mortality_time"].to_numpy()
    e = sample["pe_mortality_event"].to_numpy()
    # in-sample the baseline refit makes the intercept 0 (the slope is the model's own)
    assert CalibrationIntercept(t, e, preds["surv_365"].to_numpy(), H).point() == pytest.approx(
        0.0, abs=1e-9
    )
    assert row["slope_before"] == pytest.approx(
        CalibrationSlope(t, e, preds["surv_365"].to_numpy(), H).point(), rel=1e-9
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert "not external-test results" in manifest["note"]
    assert hashlib.sha256(rd.metrics.read_bytes()).hexdigest() == metrics_before


def test_recalibrate_run_names_the_missing_outcome_column(small_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "no_outcome.parquet"
    pl.read_parquet(RunDir(small_run).cohort).select("subject_id", "prediction_time").write_parquet(
        path
    )
    with pytest.raises(
        ValueError, match=r"no_outcome\.parquet: no outcome columns.*pe_mortality_time"
    ):
        recalibrate_run(small_run, path)


def test_a_csv_sample_takes_iso_dates_only(small_run: Path, tmp_path: Path) -> None:
    """A CSV sample's text dates are read as the cohort's are: ISO 8601 gives the same fit as
    the parquet sample, a day/month date is refused naming the file, column and row."""
    rd = RunDir(small_run)
    sample = pl.read_parquet(rd.cohort).filter(pl.col("site") == "C")
    iso = sample.with_columns(pl.col("prediction_time").dt.strftime("%Y-%m-%dT%H:%M:%S"))
    iso.write_csv(tmp_path / "iso.csv")
    sample.write_parquet(tmp_path / "iso.parquet")
    a = pl.read_parquet(recalibrate_run(small_run, tmp_path / "iso.csv") / "recalibration.parquet")
    b = pl.read_parquet(
        recalibrate_run(small_run, tmp_path / "iso.parquet") / "recalibration.parquet"
    )
    assert a.equals(b)
    dmy = sample.with_columns(pl.col("prediction_time").dt.strftime("%d/%m/%Y %H:%M"))
    dmy.write_csv(tmp_path / "dmy.csv")
    with pytest.raises(ValueError, match=r"dmy\.csv: column 'prediction_time'.*row 0"):
        recalibrate_run(small_run, tmp_path / "dmy.csv")
