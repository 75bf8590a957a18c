"""Report tables and figures from a metrics table (synthetic predictions, no training)."""

from __future__ import annotations

import base64
import re

import numpy as np
import polars as pl
import pytest

from survfuse.experiment.config_load import parse_config
from survfuse.experiment.evaluate import GroupData, ModelPreds, assemble_table, score_group
from survfuse.experiment.grid import CellSpec
from survfuse.report import figures, tables

SPLITS = ("validation", "internal_test", "external_test")


def _spec(strategy: str, modalities: list[str]) -> CellSpec:
    return CellSpec(
        cell_id=f"t.{strategy}",
        task="pe_mortality",
        strategy=strategy,
        strategy_name="unimodal" if len(modalities) == 1 else "late",
        strategy_params={},
        modalities=modalities,
        ct_encoder="ct_radiomics" if "ct" in modalities else None,
        ehr_encoder="ehr_onehot" if "ehr" in modalities else None,
        head="cox",
        seed=0,
        training={},
        survival_times=[365.0],
        features={},
    )


@pytest.fixture(scope="module")
def metrics() -> pl.DataFrame:
    cfg = parse_config(
        {
            "data": {"cohort": "c.parquet", "ct_index": "i.parquet", "meds_root": "m"},
            "tasks": ["pe_mortality"],
            "encoders": {"ct": [{"name": "ct_radiomics"}], "ehr": [{"name": "ehr_onehot"}]},
            "strategies": [
                {"name": "unimodal", "modality": "ct"},
                {"name": "unimodal", "modality": "ehr"},
                {"name": "late"},
            ],
            "evaluation": {"metrics": ["harrell_c"], "horizons": [365], "bootstrap": 100},
        }
    )
    rng = np.random.default_rng(0)
    groups, scores = [], []
    for k, split in enumerate(SPLITS):
        n = 150
        x_ct, x_ehr = rng.normal(size=n), rng.normal(size=n)
        t_ev = rng.exponential(500 * np.exp(-(0.4 * x_ct + 0.8 * x_ehr)))
        t_c = rng.uniform(100, 1500, n)
        time, event = np.minimum(t_ev, t_c), t_ev <= t_c
        preds = {
            "unimodal_ct": (x_ct, ["ct"]),
            "unimodal_ehr": (x_ehr, ["ehr"]),
            "late": (0.4 * x_ct + 0.8 * x_ehr, ["ct", "ehr"]),
        }
        models = [
            ModelPreds(
                model=f"{name}/cox",
                spec=_spec(name, mods),
                seeds=[0],
                risk=risk[None, :],
                surv=np.exp(-np.exp(risk))[None, :, None],
            )
            for name, (risk, mods) in preds.items()
        ]
        g = GroupData(
            task="pe_mortality",
            split=split,
            time=time,
            event=event,
            subject_id=np.arange(n) + 1000 * k,
            train_time=time,
            train_event=event,
            times=np.array([365.0]),
            metrics=["harrell_c"],
            horizons=[365.0],
            cal_horizon=365.0,
            cal_bins=5,
            models=models,
            n_boot=100,
            seed=0,
        )
        groups.append(g)
        scores.append(score_group(g))
    return assemble_table(cfg, groups, scores)


def _parse(cell: str) -> tuple[float, float, float]:
    m = re.fullmatch(r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]", cell)
    assert m, cell
    return float(m[1]), float(m[2]), float(m[3])


def test_metrics_table_reference_and_comparisons(metrics: pl.DataFrame) -> None:
    assert metrics.height == 3 * 3  # models x splits (one metric)
    refs = metrics.filter(pl.col("is_reference"))
    # The best unimodal model on validation (EHR carries the stronger signal here).
    assert set(refs["model"].to_list()) == {"unimodal_ehr/cox"}
    late = metrics.filter(pl.col("strategy") == "late")
    assert (late["reference"] == "unimodal_ehr/cox").all()
    assert late["p_holm"].is_not_null().all() and (late["p_holm"] >= late["p_value"]).all()


def test_c_index_table_has_every_model_and_split(metrics: pl.DataFrame) -> None:
    t = tables.c_index_table(metrics)
    assert t.columns == ["task", "model", "validation", "internal test", "external test"]
    assert t["model"].to_list() == [
        "unimodal_ct (ct_radiomics)",
        "unimodal_ehr (ehr_onehot) *",
        "late (ct_radiomics + ehr_onehot)",
    ]
    for row in t.iter_rows(named=True):
        for split in SPLITS:
            est, lo, hi = _parse(row[tables.SPLIT_LABELS[split]])
            ref = metrics.filter(
                (pl.col("split") == split) & (pl.col("strategy") == row["model"].split(" ")[0])
            ).row(0, named=True)
            assert est == pytest.approx(ref["estimate"], abs=5e-4)
            assert lo <= est <= hi


def test_comparison_table_and_renderers(metrics: pl.DataFrame) -> None:
    t = tables.comparison_table(metrics)
    assert t.height == 2 * 3  # non-reference models x splits
    assert "unimodal_ehr (ehr_onehot) *" not in t["model"].to_list()
    md = tables.to_markdown(t)
    assert md.count("\n") == t.height + 2
    html = tables.to_html(pl.DataFrame({"task": ["<b>"], "model": ["a & b"]}))
    assert "&lt;b&gt;" in html and "a &amp; b" in html


def test_forest_plot_png(metrics: pl.DataFrame) -> None:
    fig = figures.forest_plot(metrics)
    assert len(fig.axes) == 1
    png = base64.b64decode(figures.to_png_base64(fig))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_fmt_ci() -> None:
    assert tables.fmt_ci(0.71234, 0.68, 0.74) == "0.712 [0.680, 0.740]"
    assert tables.fmt_ci(float("nan"), 0.1, 0.2) == "–"
    assert tables.fmt_ci(0.5, float("nan"), 0.6) == "0.500"


def test_calibration_flag_fires_on_a_miscalibrated_model_only() -> None:
    # true hazard exp(lp) / 500: the calibrated model's S(365) = exp(-365/500 exp(lp)); the
    # other predicts exp(3 lp), risks far too extreme (calibration slope ~1/3)
    cfg = parse_config(
        {
            "data": {"cohort": "c.parquet", "ct_index": "i.parquet", "meds_root": "m"},
            "tasks": ["pe_mortality"],
            "encoders": {"ct": [{"name": "ct_radiomics"}], "ehr": [{"name": "ehr_onehot"}]},
            "strategies": [{"name": "unimodal", "modality": "ct"}, {"name": "late"}],
            "evaluation": {"metrics": ["calibration"], "horizons": [365], "bootstrap": 50},
        }
    )
    rng = np.random.default_rng(1)
    groups, scores = [], []
    for k, split in enumerate(["validation", "internal_test", "external_test"]):
        n = 600
        lp = rng.normal(size=n)
        t_ev = rng.exponential(500 * np.exp(-lp))
        t_c = rng.uniform(100, 1500, n)
        time, event = np.minimum(t_ev, t_c), t_ev <= t_c
        preds = {"unimodal_ct": (lp, ["ct"]), "late": (3 * lp, ["ct", "ehr"])}
        models = [
            ModelPreds(
                model=f"{name}/cox",
                spec=_spec(name, mods),
                seeds=[0],
                risk=risk[None, :],
                surv=np.exp(-365 / 500 * np.exp(risk))[None, :, None],
            )
            for name, (risk, mods) in preds.items()
        ]
        g = GroupData(
            task="pe_mortality", split=split, time=time, event=event,
            subject_id=np.arange(n) + 1000 * k, train_time=time, train_event=event,
            times=np.array([365.0]), metrics=["harrell_c", "calibration"], horizons=[365.0],
            cal_horizon=365.0, cal_bins=5, models=models, n_boot=50, seed=0,
        )  # fmt: skip
        groups.append(g)
        scores.append(score_group(g))
    flags = tables.calibration_flags(assemble_table(cfg, groups, scores), 365.0)
    assert flags.height == 2  # the miscalibrated model, on both test splits
    assert all(m.startswith("late") for m in flags["model"].to_list())
    assert all(m.startswith("risks too extreme") for m in flags["meaning"])
