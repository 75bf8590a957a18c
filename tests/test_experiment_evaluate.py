"""Evaluation: seed-averaged metrics, paired bootstrap against the reference, Holm, calibration."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from survfuse.experiment.evaluate import (
    CalibrationScorer,
    GroupData,
    ModelPreds,
    score_group,
)
from survfuse.experiment.grid import CellSpec
from survfuse.metrics import (
    calibration_table,
    concordance_index,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    holm,
    integrated_brier_score,
    kaplan_meier,
)


def _data(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t_event = rng.exponential(400 * np.exp(-0.8 * x))
    t_cens = rng.uniform(50, 1500, size=n)
    time = np.minimum(t_event, t_cens)
    return time, t_event <= t_cens, x


def _spec(strategy: str, modalities: list[str]) -> CellSpec:
    return CellSpec(
        cell_id=f"t.{strategy}",
        task="default",
        strategy=strategy,
        strategy_name="late",
        strategy_params={},
        modalities=modalities,
        ct_encoder="ct" if "ct" in modalities else None,
        ehr_encoder="ehr" if "ehr" in modalities else None,
        head="cox",
        seed=0,
        training={},
        survival_times=[180.0, 365.0],
        features={},
    )


def _surv(risk: np.ndarray, times: np.ndarray) -> np.ndarray:
    # A proportional-hazards curve S(t) = exp(-t/500 * exp(risk)) for each row.
    return np.exp(-np.outer(np.exp(risk), times) / 500.0)


def _group(models: dict[str, list[np.ndarray]], n_boot: int = 200) -> GroupData:
    time, event, _ = _data()
    train_time, train_event, _ = _data(400, seed=1)
    times = np.array([180.0, 365.0])
    preds = []
    for name, risks in models.items():
        preds.append(
            ModelPreds(
                model=name,
                spec=_spec(name, ["ct"] if name.startswith("uni") else ["ct", "ehr"]),
                seeds=list(range(len(risks))),
                risk=np.stack(risks),
                surv=np.stack([_surv(r, times) for r in risks]),
            )
        )
    return GroupData(
        task="default",
        split="internal_test",
        time=time,
        event=event,
        subject_id=np.arange(time.shape[0]),
        train_time=train_time,
        train_event=train_event,
        times=times,
        metrics=["harrell_c", "uno_c", "td_auc", "ibs", "calibration"],
        horizons=[180.0, 365.0],
        cal_horizon=365.0,
        cal_bins=5,
        models=preds,
        n_boot=n_boot,
        seed=0,
    )


def test_point_estimates_are_seed_means_of_the_metrics() -> None:
    time, event, x = _data()
    rng = np.random.default_rng(3)
    seeds = [x + rng.normal(scale=s, size=x.shape) for s in (0.5, 1.0, 2.0)]
    g = _group({"fused": seeds}, n_boot=0)
    point = score_group(g)["point"]["fused"]
    kw = {"train_time": g.train_time, "train_event": g.train_event}
    harrell = np.mean([concordance_index(time, event, r).estimate for r in seeds])
    uno = np.mean([concordance_index_ipcw(time, event, r, tau=365.0, **kw).estimate for r in seeds])
    auc = np.mean([cumulative_dynamic_auc(time, event, r, [180.0], **kw).auc[0] for r in seeds])
    ibs = np.mean(
        [integrated_brier_score(time, event, _surv(r, g.times), g.times, **kw) for r in seeds]
    )
    assert point[("harrell_c", None)] == pytest.approx(harrell, abs=1e-12)
    assert point[("uno_c", None)] == pytest.approx(uno, abs=1e-12)
    assert point[("td_auc", 180.0)] == pytest.approx(auc, abs=1e-12)
    assert point[("ibs", 365.0)] == pytest.approx(ibs, abs=1e-10)


def test_paired_resamples_and_identical_models() -> None:
    _, _, x = _data()
    g = _group({"uni": [x * 0.5], "copy": [x * 0.5], "other": [-x]}, n_boot=150)
    boot = score_group(g)["boot"]
    # The same predictions on the same (paired) resamples give identical replicates.
    for key in boot["uni"]:
        np.testing.assert_array_equal(boot["uni"][key], boot["copy"][key])
    c = boot["uni"][("harrell_c", None)]
    assert np.isfinite(c).all() and c.std() > 0
    # Resamples depend only on the evaluation seed, task and split: rerunning is identical.
    again = score_group(g)["boot"]
    np.testing.assert_array_equal(again["other"][("uno_c", None)], boot["other"][("uno_c", None)])


def test_calibration_scorer_matches_calibration_table() -> None:
    time, event, x = _data()
    surv_h = _surv(x, np.array([365.0]))[:, 0]
    sc = CalibrationScorer(time, event, surv_h, 365.0, 5)
    table = calibration_table(time, event, surv_h, 365.0, n_groups=5)
    expected = float(
        np.sum(table["n"].to_numpy() * np.abs(table["predicted"] - table["observed"]).to_numpy())
        / table["n"].sum()
    )
    assert sc.point() == pytest.approx(expected, abs=1e-12)
    # The weighted (bootstrap) kernel with unit weights gives the same number.
    assert sc.boot(np.ones((2, time.shape[0])))[0] == pytest.approx(expected, abs=1e-12)
    # Integer weights equal repeating rows: compare with a Kaplan-Meier of the repeated rows of
    # each (fixed) risk group.
    w = np.random.default_rng(0).integers(0, 3, size=time.shape[0]).astype(float)
    idx = np.repeat(np.arange(time.shape[0]), w.astype(int))
    num = den = 0.0
    for grp in sc.groups:
        sel = np.repeat(grp, w[grp].astype(int))
        if sel.size == 0:
            continue
        observed = 1.0 - float(kaplan_meier(time[sel], event[sel])(365.0))
        num += sel.size * abs(float(np.mean(1.0 - surv_h[sel])) - observed)
        den += sel.size
    assert idx.size == den
    assert sc.boot(w[None, :])[0] == pytest.approx(num / den, abs=1e-12)


# R's stats::p.adjust(method = "holm") on fixed inputs, computed once by tests/reference/holm.R
# (the R call sits next to its numbers in holm_r.json); no test runs R unless marked slow.
HOLM_R = Path(__file__).resolve().parent / "reference" / "holm_r.json"


def _holm_cases(ref: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # JSON null = R's NA = NaN here
    return {
        c["name"]: (np.array(c["p"], dtype=np.float64), np.array(c["holm"], dtype=np.float64))
        for c in ref["cases"]
    }


def test_holm_matches_r_p_adjust() -> None:
    ref = json.loads(HOLM_R.read_text())
    cases = _holm_cases(ref)
    # The original inputs (NaN = no test: stays NaN, does not count in m) and the edge cases.
    assert {"with_na", "running_max", "ties", "capped_at_one", "one_among_na"} <= set(cases)
    np.testing.assert_array_equal(cases["with_na"][0][:4], [0.01, 0.04, 0.03, 0.2])
    for name, (p, expected) in cases.items():
        adj = holm(p)
        np.testing.assert_array_equal(np.isnan(adj), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(adj, expected, rtol=1e-12, atol=1e-12, err_msg=name)
    # NaN positions do not change the others: as if the NaN p-value were absent.
    p, expected = cases["with_na"]
    np.testing.assert_allclose(
        holm(p[np.isfinite(p)]), cases["without_na"][1], rtol=1e-12, atol=1e-12
    )


@pytest.mark.slow
def test_holm_reference_json_is_current(tmp_path: Path) -> None:
    """Rerun tests/reference/holm.R (needs R: apt-get install -y r-base-core) and compare."""
    rscript = shutil.which("Rscript")
    assert rscript, "Rscript not found: apt-get install -y r-base-core"
    out = tmp_path / "holm_r.json"
    root = HOLM_R.parents[2]
    subprocess.run(
        [rscript, str(HOLM_R.with_name("holm.R")), str(out)],
        cwd=root,
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh, stored = json.loads(out.read_text()), json.loads(HOLM_R.read_text())
    assert [c["call"] for c in fresh["cases"]] == [c["call"] for c in stored["cases"]]
    for (name, (p_new, adj_new)), (p_old, adj_old) in zip(
        _holm_cases(fresh).items(), _holm_cases(stored).values(), strict=True
    ):
        np.testing.assert_array_equal(p_new, p_old, err_msg=name)
        np.testing.assert_array_equal(adj_new, adj_old, err_msg=name)
