"""The report's survival statistics and sections against independent references: risk groups
(lifelines' Cox and log-rank), the cohort table (lifelines' reverse Kaplan-Meier), the KM null
model's IBS (scikit-survival), calibration bins (lifelines' KM interval), the calibration flags,
the forest plot's splits and Holm p, and the loss the training loop logs apart from extras."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from sksurv.metrics import brier_score as sk_brier
from sksurv.util import Surv

from survfuse.experiment.scoring import GroupData, null_model_scores
from survfuse.report import figures, tables
from survfuse.report.calibration_figure import CalibrationSeries, calibration_points
from survfuse.report.cohort_section import cohort_table
from survfuse.report.risk_groups import development_cuts, risk_groups
from survfuse.training.callbacks import Callback
from survfuse.training.loop import fit_loop
from survfuse.training.options import TrainingOptions


def _cohort(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(shift, 1.0, n)
    t_ev = rng.exponential(400 * np.exp(-risk))
    t_c = rng.uniform(50, 1500, n)
    return np.minimum(t_ev, t_c).round(), t_ev <= t_c, risk


def test_risk_groups_cut_on_development_data_and_match_lifelines() -> None:
    _, _, dev_risk = _cohort(600, 0)
    time, event, risk = _cohort(400, 1, shift=0.8)  # a test cohort at higher risk
    rg = risk_groups("m", time, event, risk, dev_risk)
    np.testing.assert_allclose(rg.cuts, np.quantile(dev_risk, [1 / 3, 2 / 3]))
    np.testing.assert_array_equal(rg.group, np.digitize(risk, rg.cuts, right=True))
    # cut on development data, the shifted test cohort is not split into equal thirds
    assert rg.n(2) > rg.n(0) + 50
    ref = multivariate_logrank_test(time, rg.group, event)
    assert rg.logrank_p == pytest.approx(ref.p_value, rel=1e-8)
    df = pd.DataFrame({"T": time, "E": event, "mid": rg.group == 1, "high": rg.group == 2}).astype(
        float
    )
    cph = CoxPHFitter().fit(df, "T", "E", fit_options={"precision": 1e-12, "max_steps": 200})
    for g, name in ((1, "mid"), (2, "high")):
        hr, lo, hi = rg.hazard_ratios[g]
        assert hr == pytest.approx(math.exp(cph.params_[name]), rel=1e-5)
        ci = cph.confidence_intervals_.loc[name]
        assert lo == pytest.approx(math.exp(ci.iloc[0]), rel=1e-4)
        assert hi == pytest.approx(math.exp(ci.iloc[1]), rel=1e-4)
    assert rg.hazard_ratios[0] == (1.0, 1.0, 1.0)
    assert rg.hazard_ratios[2][0] > rg.hazard_ratios[1][0] > 1.0


def test_risk_groups_without_events_in_a_group_give_nan_not_a_crash() -> None:
    time = np.arange(1.0, 31.0)
    event = np.r_[np.zeros(10, bool), np.ones(20, bool)]
    risk = np.r_[np.zeros(10), np.ones(10), 2 * np.ones(10)]
    rg = risk_groups("m", time, event, risk, np.array([0.0, 1.0, 2.0]))
    assert all(math.isnan(x) for x in rg.hazard_ratios[1])
    with pytest.raises(ValueError, match="development"):
        development_cuts(np.array([np.nan]))


def test_cohort_table_counts_follow_up_and_availability() -> None:
    time, event, _ = _cohort(300, 2)
    split = np.array(["train", "validation", "external_test"])[np.arange(300) % 3]
    site = np.where(split == "external_test", "C", np.where(np.arange(300) % 2, "A", "B"))
    cohort = pl.DataFrame(
        {
            "subject_id": np.arange(300),
            "prediction_time": np.zeros(300, dtype="datetime64[us]"),
            "site": site,
            "split": split,
            "pe_mortality_time": time,
            "pe_mortality_event": event,
        }
    )
    present = np.arange(300) % 5 != 0  # every fifth subject has no CT
    manifest = pl.DataFrame(
        {
            "subject_id": np.arange(300),
            "prediction_time": np.zeros(300, dtype="datetime64[us]"),
            "modality": ["ct"] * 300,
            "encoder": ["ct_radiomics"] * 300,
            "status": np.where(present, "present", "missing"),
        }
    )
    t = cohort_table(cohort, ["pe_mortality"], manifest)
    assert t["split"].to_list()[:3] == ["train", "train", "train"]  # A, B, all
    assert t["site"].to_list() == ["A", "B", "all", "A", "B", "all", "C"]
    row = t.filter(pl.col("split") == "external test").row(0, named=True)
    rows = split == "external_test"
    assert row["n"] == str(rows.sum())
    k = int(event[rows].sum())
    assert row["pe_mortality: events"] == f"{k} ({100 * k / rows.sum():.0f}%)"
    ref = KaplanMeierFitter().fit(time[rows], ~event[rows]).median_survival_time_
    assert row["pe_mortality: median follow-up (days)"] == f"{ref:.0f}"
    assert row["CT data"].startswith(f"{int(present[rows].sum())} (")


def test_km_null_ibs_matches_scikit_survival() -> None:
    time, event, _ = _cohort(500, 3)
    tr_t, tr_e, _ = _cohort(800, 4)
    grid = np.array([100.0, 200.0, 300.0, 400.0])
    g = GroupData(
        task="t", split="internal_test", time=time, event=event, subject_id=np.arange(500),
        train_time=tr_t, train_event=tr_e, times=grid, metrics=["harrell_c", "ibs"],
        horizons=[400.0], cal_horizon=400.0, cal_bins=10,
    )  # fmt: skip
    ibs = null_model_scores(g)[("ibs", 400.0)]
    km = KaplanMeierFitter().fit(tr_t, tr_e)
    s0 = km.survival_function_at_times(grid).to_numpy()
    _, bs = sk_brier(
        Surv.from_arrays(tr_e, tr_t), Surv.from_arrays(event, time), np.tile(s0, (500, 1)), grid
    )
    assert ibs == pytest.approx(np.trapezoid(bs, grid) / (grid[-1] - grid[0]), rel=1e-10)


def test_calibration_points_use_the_bin_kaplan_meier_and_its_interval() -> None:
    time, event, risk = _cohort(400, 5)
    surv_h = np.exp(-365 / 400 * np.exp(risk))
    x, y, lo, hi = calibration_points(CalibrationSeries("m", time, event, surv_h), 365.0, 4)
    first = np.argsort(1 - surv_h, kind="stable")[:100]
    km = KaplanMeierFitter(alpha=0.05).fit(time[first], event[first])
    s = float(km.survival_function_at_times(365.0).iloc[0])
    ci = km.confidence_interval_survival_function_
    k = ci.index.searchsorted(365.0, side="right") - 1
    assert x[0] == pytest.approx((1 - surv_h[first]).mean())
    assert y[0] == pytest.approx(1 - s)
    assert lo[0] == pytest.approx(1 - ci.iloc[k, 1], abs=1e-10)
    assert hi[0] == pytest.approx(1 - ci.iloc[k, 0], abs=1e-10)
    assert np.all(lo <= y) and np.all(y <= hi)


def _metrics_row(split: str, model: str, metric: str, est: float, **kw: object) -> dict:
    row = {
        "task": "pe", "split": split, "model": model, "strategy": model, "ct_encoder": "ct",
        "ehr_encoder": None, "head": "cox", "unimodal": model == "ref", "metric": metric,
        "horizon": 365.0, "estimate": est, "lower": est - 0.1, "upper": est + 0.1,
        "is_reference": model == "ref", "reference": "ref", "delta": None, "delta_lower": None,
        "delta_upper": None, "p_value": None, "p_holm": None, "family_size": None,
    }  # fmt: skip
    row.update(kw)
    return row


def test_calibration_flags_slope_and_ibs_worse_than_the_null_model() -> None:
    rows = []
    for split in ("validation", "internal_test", "external_test"):
        rows += [
            _metrics_row(split, "ref", "cal_slope", 1.0),
            _metrics_row(split, "ref", "ibs", 0.10),
            _metrics_row(split, "bad", "cal_slope", 0.5),
            _metrics_row(split, "bad", "ibs", 0.30),
        ]
    metrics = pl.DataFrame(rows)
    null = {("pe", s): 0.20 for s in ("validation", "internal_test", "external_test")}
    flags = tables.calibration_flags(metrics, 365.0, null)
    assert flags["split"].to_list() == ["internal test", "external test"]  # never validation
    assert flags["model"].to_list() == ["bad (ct)", "bad (ct)"]
    assert all("slope < 0.8" in m and "null model" in m for m in flags["meaning"])
    assert tables.calibration_flags(metrics, 365.0).height == 2  # the slope alone
    summary = tables.calibration_summary(metrics, 365.0, null)
    assert summary.height == 4 and set(summary["IBS of KM null"]) == {"0.200"}
    assert summary.filter(pl.col("model") == "ref (ct) *")["flag"].to_list() == ["", ""]


def test_forest_plot_shows_test_splits_only_with_holm_p() -> None:
    rows = []
    for split, p in (("validation", None), ("internal_test", 0.0123), ("external_test", 0.5)):
        rows.append(_metrics_row(split, "ref", "harrell_c", 0.7))
        rows.append(
            _metrics_row(
                split,
                "late",
                "harrell_c",
                0.72,
                delta=0.02,
                delta_lower=-0.01,
                delta_upper=0.05,
                p_value=0.01,
                p_holm=p,
                family_size=2,
            )
        )
    fig = figures.forest_plot(pl.DataFrame(rows))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "0.012" in texts and "0.500" in texts
    markers = [ln for ln in fig.axes[0].lines if ln.get_marker() == "o"]
    assert len(markers) == 2  # one series per test split, none for validation
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["internal test", "external test"]


class _ConstantExtra(Callback):
    def extra_loss(self, state, output, batch, time, event):  # type: ignore[no-untyped-def]
        return torch.tensor(1.5)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch * self.w

    def loss(self, out: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
        return ((out - time) ** 2).mean()

    def set_epoch(self, epoch: int) -> None:
        pass

    def training_stage(self) -> str:
        return "survival"


def test_fit_loop_logs_the_model_loss_apart_from_callback_extras() -> None:
    x = torch.linspace(0, 1, 8)
    state = fit_loop(
        _Tiny(),
        TrainingOptions(max_epochs=3, lr=0.01),
        batches=lambda: [(x, 2 * x, torch.ones(8, dtype=torch.bool))],
        callbacks=[_ConstantExtra()],
    )
    for rec in state.history:
        assert rec["train_loss"] - rec["fused_loss"] == pytest.approx(1.5)
    assert state.history[0]["fused_loss"] == pytest.approx(float(((2 * x) ** 2).mean()))


def test_forest_plot_without_any_comparison_is_an_empty_panel_not_an_error() -> None:
    only_ref = pl.DataFrame([_metrics_row("internal_test", "ref", "harrell_c", 0.7)])
    fig = figures.forest_plot(only_ref)
    assert fig.axes[0].get_title(loc="left") == "(no comparisons)"
    assert not [ln for ln in fig.axes[0].lines if ln.get_marker() == "o"]
