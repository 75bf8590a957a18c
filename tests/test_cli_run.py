"""The commands on a small finished run: the terminal summary `run` prints, `predict` (patients
with no data flagged, NaN risk, warned about; declared CSV date formats)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from survfuse.cli import app

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"


@pytest.fixture(scope="module")
def small_run(sim_small: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`survfuse run` of the tiny config cut to two unimodal baselines and late fusion; the
    run folder and the command's stdout."""
    raw = yaml.safe_load(TINY.read_text())
    raw["data"] = {
        "cohort": str(sim_small / "cohort.parquet"),
        "ct_index": str(sim_small / "ct_index.parquet"),
        "meds_root": str(sim_small / "meds"),
    }
    raw["strategies"] = [s for s in raw["strategies"] if s["name"] in ("unimodal", "late")]
    raw["training"]["max_epochs"] = 2
    raw["evaluation"]["bootstrap"] = 10
    folder = tmp_path_factory.mktemp("small_run")
    config = folder / "small.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = folder / "run"
    res = CliRunner().invoke(
        app, ["run", str(config), "--out", str(out), "--no-progress", "--no-report"]
    )
    assert res.exit_code == 0, res.output[-3000:]
    return out, res.stdout


def test_run_prints_the_summary_within_100_columns(small_run: tuple[Path, str]) -> None:
    run, stdout = small_run
    assert max(len(line) for line in stdout.splitlines()) <= 100
    metrics = pl.read_parquet(run / "metrics.parquet")
    late = metrics.filter(
        (pl.col("metric") == "harrell_c") & (pl.col("strategy") == "late")
        & (pl.col("split") == "external_test")
    ).row(0, named=True)  # fmt: skip
    row = next(ln for ln in stdout.splitlines() if ln.startswith("late ["))
    assert f"{late['estimate']:.3f}" in row and f"{late['delta']:+.3f}" in row
    assert "* reference model of the task" in stdout and "Holm" in stdout


def _new_patients(run: Path, tmp_path: Path) -> tuple[pl.DataFrame, list[int]]:
    cohort = pl.read_parquet(run / "data" / "cohort.parquet")
    ext = cohort.filter(pl.col("split") == "external_test").select("subject_id", "prediction_time")
    ghosts = [987654321, 987654322]  # neither a CT study nor any EHR event
    extra = pl.DataFrame(
        {"subject_id": ghosts, "prediction_time": [ext["prediction_time"][0]] * 2},
        schema=ext.schema,
    )
    return pl.concat([ext.head(20), extra]), ghosts


def _late_cell(run: Path) -> str:
    return next(p.name for p in (run / "cells").iterdir() if ".late." in p.name)


def test_predict_flags_patients_without_data(small_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = small_run
    new, ghosts = _new_patients(run, tmp_path)
    new.write_parquet(tmp_path / "new.parquet")
    out = tmp_path / "pred.parquet"
    args = ["--cell", _late_cell(run), "--cohort", str(tmp_path / "new.parquet"), "--out", str(out)]
    res = CliRunner().invoke(app, ["predict", str(run), *args])
    assert res.exit_code == 0, res.output[-3000:]
    warning = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1
    assert "2 of 22 patients have no CT or EHR data" in warning[0]
    assert all(str(g) in warning[0] for g in ghosts)

    pred = pl.read_parquet(out)
    assert {"has_ct", "has_ehr", "risk"} <= set(pred.columns)
    none = pred.filter(pl.col("subject_id").is_in(ghosts))
    assert not none["has_ct"].any() and not none["has_ehr"].any()
    assert none["risk"].is_nan().all() and none["surv_365"].is_nan().all()
    known = pred.filter(~pl.col("subject_id").is_in(ghosts))
    some = known["has_ct"].to_numpy() | known["has_ehr"].to_numpy()
    assert some.all() and np.isfinite(known["risk"].to_numpy()).all()
    # the run's own predictions for these patients, made by the runner, agree
    ran = pl.read_parquet(run / "cells" / _late_cell(run) / "predictions.parquet")
    joined = known.join(ran, on=["subject_id", "prediction_time"], suffix="_run")
    assert joined.height == known.height
    np.testing.assert_allclose(joined["risk"], joined["risk_run"], rtol=1e-5, atol=1e-6)


def test_predict_without_missing_patients_does_not_warn(
    small_run: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = small_run
    new, ghosts = _new_patients(run, tmp_path)
    new.filter(~pl.col("subject_id").is_in(ghosts)).write_parquet(tmp_path / "known.parquet")
    args = ["--cell", _late_cell(run), "--cohort", str(tmp_path / "known.parquet")]
    res = CliRunner().invoke(app, ["predict", str(run), *args, "--out", str(tmp_path / "p.pq")])
    assert res.exit_code == 0, res.output[-3000:]
    assert "warning" not in res.stderr


def test_predict_csv_dates_need_iso_or_a_declared_format(
    small_run: tuple[Path, str], tmp_path: Path
) -> None:
    run, _ = small_run
    new, ghosts = _new_patients(run, tmp_path)
    known = new.filter(~pl.col("subject_id").is_in(ghosts)).head(5)
    csv = tmp_path / "new.csv"
    known.with_columns(pl.col("prediction_time").dt.strftime("%d/%m/%Y %H:%M:%S")).write_csv(csv)
    base = ["predict", str(run), "--cell", _late_cell(run), "--cohort", str(csv)]
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a.parquet")])
    assert bad.exit_code == 2
    err = bad.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert str(csv) in err and "'prediction_time'" in err and "row 0" in err
    ok = CliRunner().invoke(
        app, [*base, "--date-format", "%d/%m/%Y %H:%M:%S", "--out", str(tmp_path / "b.parquet")]
    )
    assert ok.exit_code == 0, ok.output[-3000:]
    got = pl.read_parquet(tmp_path / "b.parquet")
    assert got["prediction_time"].to_list() == known["prediction_time"].to_list()


def test_misspelt_cell_names_the_closest_cells(small_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = small_run
    cell = _late_cell(run)
    res = CliRunner().invoke(
        app, ["predict", str(run), "--cell", cell.replace("late", "lat"), "--cohort", "x.parquet"]
    )
    assert res.exit_code == 2
    assert f"did you mean {cell!r}?" in res.stderr
    assert str(run / "cells") in res.stderr


def test_recalibrate_writes_beside_the_run(small_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = small_run
    cohort = pl.read_parquet(run / "data" / "cohort.parquet")
    sample = cohort.filter(pl.col("split") == "external_test")
    sample.write_parquet(tmp_path / "site_sample.parquet")
    metrics_before = (run / "metrics.parquet").read_bytes()
    out = tmp_path / "recal"
    res = CliRunner().invoke(
        app, ["recalibrate", str(run), "--cohort", str(tmp_path / "site_sample.parquet"),
              "--out", str(out), "--method", "baseline+slope"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output[-3000:]
    assert res.stdout.strip() == f"recalibrated: {out}"
    table = pl.read_parquet(out / "recalibration.parquet")
    cells = sorted(p.name for p in (run / "cells").iterdir())
    assert sorted(table["cell_id"].to_list()) == cells
    assert (table["n_subjects"] == sample.height).all()
    assert set(table["method"].to_list()) == {"baseline+slope"}
    assert (run / "metrics.parquet").read_bytes() == metrics_before  # the run is not touched
    bad = CliRunner().invoke(app, ["recalibrate", str(run), "--cohort", "x", "--method", "slope"])
    assert bad.exit_code == 2 and "baseline+slope" in bad.output
