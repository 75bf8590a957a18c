"""`survfuse sweep-imbalance` on a tiny grid (2 settings, 1 fused strategy + OGM-GE variant), the
per-run imbalance table and report section, the sweep config and the gain table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from survfuse.cli import app
from survfuse.experiment.sweep import sweep_config
from survfuse.experiment.sweep_tables import BEST_FUSION, gain_table, pool_replicates
from survfuse.report.sweep import summary_markdown

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"


def test_sweep_config_reduces_the_study_and_adds_ogm_variants(tmp_path: Path) -> None:
    cfg = sweep_config(
        TINY,
        tmp_path,
        strategies=["late", "concat"],
        seeds=2,
        bootstrap=7,
        max_epochs=2,
        rebalance=True,
    )
    keys = [s.key for s in cfg.strategies]
    assert keys == ["unimodal_ct", "unimodal_ehr", "concat", "late", "concat_ogm", "late_ogm"]
    assert cfg.strategy("late_ogm").training == {"rebalance": "ogm_ge"}
    assert cfg.training_for(cfg.strategy("late_ogm")).rebalance == "ogm_ge"
    assert cfg.training_for(cfg.strategy("late")).rebalance == "none"
    assert cfg.seeds == [0, 1] and cfg.evaluation.bootstrap == 7
    assert cfg.evaluation.metrics == ["harrell_c"] and cfg.training.max_epochs == 2
    assert cfg.data.cohort == (tmp_path / "cohort.parquet").resolve()
    with pytest.raises(ValueError, match="did you mean 'late'"):
        sweep_config(TINY, tmp_path, strategies=["lat"])


def _metrics_row(model: str, split: str, est: float, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "task": "t",
        "split": split,
        "model": model,
        "strategy": model.split("[")[0],
        "metric": "harrell_c",
        "estimate": est,
        "unimodal": model.startswith("uni"),
        "is_reference": model == "uni_ehr[e]/cox",
        "reference": "uni_ehr[e]/cox",
        "delta": math.nan,
        "delta_lower": math.nan,
        "delta_upper": math.nan,
        "n_seeds": 1,
        "n_boot": 10,
        "ct_encoder": "c" if "[c" in model else None,
        "ehr_encoder": "e" if "e]" in model else None,
    }
    row.update(kw)
    return row


def test_gain_table_picks_best_fusion_on_validation_only() -> None:
    rows = []
    for split in ("validation", "internal_test", "external_test"):
        rows.append(_metrics_row("uni_ehr[e]/cox", split, 0.70))
        rows.append(_metrics_row("uni_ct[c]/cox", split, 0.60))
    # late is better on validation, concat better on test: the best fusion must be late
    rows.append(_metrics_row("late[c+e]/cox", "validation", 0.75, delta=0.05))
    rows.append(_metrics_row("concat[c+e]/cox", "validation", 0.72, delta=0.02))
    for split in ("internal_test", "external_test"):
        rows.append(
            _metrics_row(
                "late[c+e]/cox", split, 0.71, delta=0.01, delta_lower=-0.02, delta_upper=0.04
            )
        )
        rows.append(
            _metrics_row(
                "concat[c+e]/cox", split, 0.80, delta=0.1, delta_lower=0.05, delta_upper=0.15
            )
        )
    metrics = pl.DataFrame(rows)
    t = gain_table(
        metrics,
        None,
        setting={"imbalance": 0.25, "site_shift": 1.0},
        rebalanced={"concat"},
    )
    assert set(t["split"]) == {"internal_test", "external_test"}  # never validation
    best = t.filter(pl.col("model") == BEST_FUSION)
    late = t.filter(pl.col("model") == "late[c+e]/cox")
    assert best["gain"].to_list() == late["gain"].to_list() == [0.01, 0.01]
    assert best["validation_c"].to_list() == [0.75, 0.75]
    assert best["selected"].to_list() == ["late", "late"]
    assert t.filter(pl.col("strategy") == "concat")["rebalance"].all()
    assert (t["reference_estimate"] == 0.70).all() and (t["imbalance"] == 0.25).all()
    # measured balance: best CT-only minus best EHR-only model on the same split
    assert t["unimodal_gap"].to_list() == pytest.approx([0.60 - 0.70] * t.height)


def test_unimodal_gap_uses_each_modalitys_validation_choice() -> None:
    rows = []
    # two CT-only models: the token one wins on validation, the pooled one on test
    for split, ct, ct_tok, ehr in (
        ("validation", 0.60, 0.65, 0.70),
        ("internal_test", 0.62, 0.58, 0.66),
    ):
        rows += [
            _metrics_row("uni_ct[c]/cox", split, ct),
            _metrics_row("uni_ct_tok[c]/cox", split, ct_tok),
            _metrics_row("uni_ehr[e]/cox", split, ehr),
            _metrics_row("late[c+e]/cox", split, 0.7, delta=0.0, delta_lower=0.0, delta_upper=0.0),
        ]
    t = gain_table(pl.DataFrame(rows), None, setting={"imbalance": 0.5, "site_shift": 1.0})
    assert t["unimodal_gap"].to_list() == pytest.approx([0.58 - 0.66] * 2)


def test_gap_correlation_is_spearman_of_absolute_gap_and_best_fusion_gain() -> None:
    from scipy.stats import spearmanr

    from survfuse.experiment.sweep_tables import gap_correlation

    gaps = [-0.3, -0.1, 0.0, 0.05, 0.2, 0.4]
    gains = [0.0, 0.03, 0.06, 0.05, 0.01, -0.02]  # largest near balance
    rows = [
        _gain_row(i, 0.5, BEST_FUSION, g, 0.01, unimodal_gap=d)
        for i, (d, g) in enumerate(zip(gaps, gains, strict=True))
    ]
    rows.append(_gain_row(9, 0.5, "late", 1.0, 0.01, unimodal_gap=0.0))  # not the best fusion
    r = gap_correlation(pl.DataFrame(rows)).row(0, named=True)
    expected = spearmanr(np.abs(gaps), gains).statistic
    assert r["n"] == 6 and r["rho"] == pytest.approx(expected) and r["rho"] < -0.8


def _gain_row(sim_seed: int, imbalance: float, model: str, gain: float, half: float, **kw: object):
    row = {
        "imbalance": imbalance,
        "site_shift": 1.0,
        "sim_seed": sim_seed,
        "task": "pe",
        "split": "internal_test",
        "model": model,
        "strategy": model,
        "selected": model,
        "rebalance": False,
        "reference": "uni_ct",
        "estimate": 0.7 + gain,
        "reference_estimate": 0.7,
        "gain": gain,
        "gain_lower": gain - half,
        "gain_upper": gain + half,
        "validation_c": 0.7,
        "unimodal_gap": 0.0,
        "ct_share": float("nan") if sim_seed else 0.5,
        "imbalance_index": 0.2,
        "n_seeds": 2,
        "n_boot": 200,
    }
    row.update(kw)
    return row


def test_pool_replicates_is_a_dersimonian_laird_meta_analysis() -> None:
    from statsmodels.stats.meta_analysis import combine_effects

    z = 1.959963984540054
    # three cohorts that disagree by more than their intervals explain (tau^2 > 0), and two that
    # agree (tau^2 = 0: the fixed-effect answer)
    rows = [
        _gain_row(0, 0.5, "late", 0.04, z * 0.01),
        _gain_row(1, 0.5, "late", 0.02, z * 0.02),
        _gain_row(2, 0.5, "late", 0.10, z * 0.015),
        _gain_row(0, 0.5, BEST_FUSION, 0.04, 0.02, selected="late"),
        _gain_row(1, 0.5, BEST_FUSION, 0.03, 0.02, selected="concat"),
        _gain_row(2, 0.5, BEST_FUSION, 0.05, 0.02, selected="late"),
        _gain_row(0, 1.0, "late", -0.01, 0.03),  # one cohort: its own interval, untouched
    ]
    pooled = pool_replicates(pl.DataFrame(rows))
    late = pooled.filter((pl.col("model") == "late") & (pl.col("imbalance") == 0.5)).row(
        0, named=True
    )
    ref = combine_effects(
        np.array([0.04, 0.02, 0.10]), np.array([0.01, 0.02, 0.015]) ** 2, method_re="dl"
    )
    frame = ref.summary_frame().loc["random effect"]
    assert late["gain"] == pytest.approx(frame["eff"], rel=1e-9)
    assert late["gain_lower"] == pytest.approx(frame["ci_low"], rel=1e-6)
    assert late["gain_upper"] == pytest.approx(frame["ci_upp"], rel=1e-6)
    assert late["tau2"] == pytest.approx(ref.tau2, rel=1e-9) and late["tau2"] > 0
    assert late["n_replicates"] == 3
    assert late["ct_share"] == pytest.approx(0.5)  # NaN in two cohorts: mean of the others
    best = pooled.filter(pl.col("model") == BEST_FUSION).row(0, named=True)
    assert best["selected"] == "late x2, concat x1" and best["tau2"] == 0.0
    assert best["gain"] == pytest.approx(0.04)  # equal errors, no heterogeneity: the mean
    single = pooled.filter(pl.col("imbalance") == 1.0).row(0, named=True)
    one = rows[-1]
    assert [single[k] for k in ("gain", "gain_lower", "gain_upper")] == [
        one["gain"],
        one["gain_lower"],
        one["gain_upper"],
    ]
    assert "sim_seed" not in pooled.columns and pooled.height == 3
    # cohort intervals are read at the runs' level and the pooled one is at that level too:
    # three equal half-widths h without heterogeneity pool to h / sqrt(3) at any level
    for level in (0.95, 0.9):
        p = pool_replicates(pl.DataFrame(rows[3:6]), level=level).row(0, named=True)
        assert p["gain_upper"] - p["gain"] == pytest.approx(0.02 / math.sqrt(3), rel=1e-9)
    # the summary names where the best fusion peaks (needs two imbalances)
    assert "Best fusion peaks" not in summary_markdown(pooled)
    two = pool_replicates(pl.DataFrame([*rows, _gain_row(0, 1.0, BEST_FUSION, -0.01, 0.03)]))
    assert "Best fusion peaks at w=0.5" in summary_markdown(two)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    args = [
        "sweep-imbalance",
        "--out",
        str(out),
        "--imbalance",
        "0,1",
        "--n",
        "200",
        "--shape",
        "16,16,16",
        "--config",
        str(TINY),
        "--strategies",
        "late",
        "--max-epochs",
        "3",
        "--bootstrap",
        "20",
        "--rebalance",
        "--replicates",
        "2",
        "--no-progress",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Δ C vs best unimodal" in res.output
    return out


def test_sweep_writes_table_figure_and_summary(tiny_sweep: Path) -> None:
    t = pl.read_parquet(tiny_sweep / "sweep.parquet")
    assert (tiny_sweep / "sweep.png").stat().st_size > 1000
    assert (tiny_sweep / "sweep_gap.png").stat().st_size > 1000
    assert t["unimodal_gap"].is_finite().all()
    assert "Spearman correlation of |unimodal gap|" in (tiny_sweep / "sweep.md").read_text()
    assert (tiny_sweep / "sweep.csv").exists() and (tiny_sweep / "sweep.md").exists()
    assert sorted(set(t["imbalance"])) == [0.0, 1.0]
    assert set(t["split"]) == {"internal_test", "external_test"}
    assert set(t["strategy"]) == {"late", "late_ogm", BEST_FUSION}
    assert t.filter(pl.col("strategy") == "late_ogm")["rebalance"].all()
    assert t.height == 2 * 2 * 3  # settings x splits x (late, late_ogm, best fusion)
    # two simulated cohorts per setting; the pooled gain is their mean
    per = pl.read_parquet(tiny_sweep / "sweep_replicates.parquet")
    assert sorted(set(per["sim_seed"])) == [0, 1] and per.height == 2 * t.height
    assert (t["n_replicates"] == 2).all()
    key = ["imbalance", "split", "model"]
    span = per.group_by(key).agg(pl.col("gain").min().alias("lo"), pl.col("gain").max().alias("hi"))
    span = span.join(t, on=key)
    assert (span["gain"] >= span["lo"] - 1e-12).all() and (span["gain"] <= span["hi"] + 1e-12).all()
    # the gain is the runner's paired difference against the best unimodal model
    run = tiny_sweep / "runs" / "imb0_shift1_sim0"
    m = pl.read_parquet(run / "metrics.parquet").filter(
        (pl.col("metric") == "harrell_c") & (pl.col("split") == "external_test")
    )
    late = m.filter(pl.col("strategy") == "late")
    row = per.filter(
        (pl.col("sim_seed") == 0)
        & (pl.col("imbalance") == 0.0)
        & (pl.col("split") == "external_test")
        & (pl.col("strategy") == "late")
    )
    assert row["gain"][0] == pytest.approx(late["delta"][0])
    assert row["gain_lower"][0] == pytest.approx(late["delta_lower"][0])
    ref = m.filter(pl.col("is_reference"))
    assert ref["unimodal"][0] and row["reference_estimate"][0] == pytest.approx(ref["estimate"][0])
    assert 0.0 <= row["ct_share"][0] <= 1.0 or math.isnan(row["ct_share"][0])


def test_every_sweep_run_has_an_imbalance_table_and_report_section(tiny_sweep: Path) -> None:
    from survfuse.report.html import build_report

    run = tiny_sweep / "runs" / "imb1_shift1_sim0"
    imb = pl.read_parquet(run / "imbalance.parquet")
    assert set(imb["split"]) == {"validation", "internal_test", "external_test"}
    assert set(imb["strategy"]) == {"late", "late_ogm"}
    for (_, _, _), part in imb.group_by("task", "split", "model"):
        get = {(q, m): e for q, m, e in part.select("quantity", "modality", "estimate").rows()}
        assert get[("shapley", "ct")] + get[("shapley", "ehr")] == pytest.approx(
            get[("harrell_c", "full")] - 0.5, abs=1e-12
        )
    # C with both modalities is the same number as the metrics table's seed-averaged C; on the
    # validation split the table scores late fusion out of fold (its combination is fitted
    # there), while the analysis masks modalities in the saved model, fitted on all of it
    m = pl.read_parquet(run / "metrics.parquet").filter(pl.col("metric") == "harrell_c")
    for r in imb.filter(
        (pl.col("quantity") == "harrell_c")
        & (pl.col("modality") == "full")
        & (pl.col("split") != "validation")
    ).iter_rows(named=True):
        ref = m.filter((pl.col("model") == r["model"]) & (pl.col("split") == r["split"]))
        assert r["estimate"] == pytest.approx(ref["estimate"][0], abs=1e-6)
        assert r["lower"] == pytest.approx(ref["lower"][0], abs=1e-6)  # same resamples
    # rendering never computes an analysis: without the table the section is absent ...
    (run / "imbalance.parquet").unlink()
    html_path, md_path = build_report(run)
    assert not (run / "imbalance.parquet").exists()
    assert "Modality contributions" not in html_path.read_text()
    # ... and `survfuse report` (a run made before this analysis existed) computes it first
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    again = pl.read_parquet(run / "imbalance.parquet")
    assert again.equals(imb)
    assert "Modality contributions" in html_path.read_text()
    assert "Shapley CT" in md_path.read_text()


def test_sweep_cli_errors() -> None:
    res = CliRunner().invoke(app, ["sweep-imbalance", "--out", "x", "--imbalance", "0,1.5"])
    assert res.exit_code == 2 and "imbalance must lie in [0, 1]" in res.output
    res = CliRunner().invoke(app, ["sweep-imbalance", "--out", "x", "--shape", "8,8"])
    assert res.exit_code == 2 and "three sizes" in res.output
    with pytest.raises(ValueError, match="unknown strategy"):
        sweep_config(TINY, Path("x"), strategies=["nope"])


def test_sweep_ct_cells_hold_volume_and_cell_radiomics(tiny_sweep: Path) -> None:
    import json

    from survfuse.data.ct_index import select_studies
    from survfuse.data.imaging import load_ct
    from survfuse.encoders.base import CTSource
    from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder, radiomics_features
    from survfuse.features import ModalityFeatures

    run = tiny_sweep / "runs" / "imb1_shift1_sim0"
    index = json.loads((run / "features" / "index.json").read_text())
    assert list(index["ct"]) == ["ct_cells"]
    feats = ModalityFeatures.load(run / index["ct"]["ct_cells"])
    data = tiny_sweep / "data" / "imb1_shift1_sim0"
    cohort = pl.read_parquet(data / "cohort.parquet")
    enc = CTRadiomicsEncoder(grid=(2, 2, 2), n_bins=16)
    f = enc.n_features
    assert feats.pooled.shape == (cohort.height, 9 * f) and feats.present.all()
    # an independent read of one subject's index CT (never a later study)
    src = CTSource.from_index(data / "ct_index.parquet")
    row = 5
    study = select_studies(cohort[row : row + 1], src.index)
    vol = load_ct(study["path"][0], enc.preprocessing())
    cells, valid, volume = radiomics_features(
        vol.array, grid=(2, 2, 2), hu_window=enc.hu_window, n_bins=16, spacing=tuple(vol.spacing)
    )
    i = int(np.flatnonzero(np.asarray(feats.subject_id) == cohort["subject_id"][row])[0])
    np.testing.assert_allclose(feats.pooled[i, :f], volume, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        feats.pooled[i, f:], np.where(valid[:, None], cells, 0).ravel(), rtol=1e-5, atol=1e-6
    )
    assert feats.tokens is not None and feats.tokens.shape[1:] == (8, f + 3)


def test_report_lists_the_modalities_branch_stopping_dropped(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from survfuse.report.imbalance_section import dropped_table

    def cell(cid: str, strategy: str, seed: int, history: list[dict]) -> dict:
        (tmp_path / cid).mkdir()
        pl.DataFrame(history, infer_schema_length=None).write_parquet(
            tmp_path / cid / "history.parquet"
        )
        return {
            "cell_id": cid,
            "status": "done",
            "modalities": ["ct", "ehr"],
            "task": "pe",
            "strategy": strategy,
            "seed": seed,
            "ct_encoder": "ct_radiomics",
            "ehr_encoder": "ehr_onehot",
        }

    cells = [
        cell("a", "late", 0, [{"epoch": 0}, {"epoch": 1, "dropped_ehr": True}, {"epoch": 2}]),
        cell("b", "late", 1, [{"epoch": 0}, {"epoch": 1}]),
        cell("c", "late", 2, [{"epoch": 0}, {"epoch": 4, "dropped_ehr": True}]),
        cell("d", "concat", 0, [{"epoch": 0}]),
    ]
    ctx = SimpleNamespace(rd=SimpleNamespace(cell=lambda cid: tmp_path / cid), cells=cells)
    t = dropped_table(ctx)  # type: ignore[arg-type]
    assert t.rows() == [
        ("pe", "late (ct_radiomics + ehr_onehot)", "EHR", "2 of 3 (0, 2)", "1, 4"),
    ]
