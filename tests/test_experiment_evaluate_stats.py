"""Evaluation statistics: paired IJ p-values, the pre-specified Holm family, calibration rows
with valid intervals, and the per-model evaluation cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from survfuse.experiment import eval_runner, evaluate
from survfuse.experiment.config_load import parse_config
from survfuse.experiment.eval_cache import CACHE_DIR
from survfuse.experiment.eval_runner import score_groups
from survfuse.experiment.evaluate import (
    ComparisonFamily,
    GroupData,
    ModelPreds,
    assemble_table,
    score_group,
)
from survfuse.experiment.grid import CellSpec
from survfuse.experiment.rundir import RunDir
from survfuse.metrics import compare_concordance, concordance_index, z_test

SPLITS = ("validation", "internal_test", "external_test")
TIMES = np.array([180.0, 365.0])


def _spec(name: str, modalities: list[str]) -> CellSpec:
    return CellSpec(
        cell_id=f"t.{name}",
        task="pe_mortality",
        strategy=name,
        strategy_name="unimodal" if len(modalities) == 1 else "late",
        strategy_params={},
        modalities=modalities,
        ct_encoder="ct_radiomics" if "ct" in modalities else None,
        ehr_encoder="ehr_onehot" if "ehr" in modalities else None,
        head="cox",
        seed=0,
        training={},
        survival_times=list(TIMES),
        features={},
    )


def _cfg(metrics: list[str], n_boot: int) -> object:
    return parse_config(
        {
            "data": {"cohort": "c.parquet", "ct_index": "i.parquet", "meds_root": "m"},
            "tasks": ["pe_mortality"],
            "encoders": {"ct": [{"name": "ct_radiomics"}], "ehr": [{"name": "ehr_onehot"}]},
            "strategies": [{"name": "unimodal", "modality": "ct"}, {"name": "late"}],
            "evaluation": {
                "metrics": metrics,
                "horizons": [180, 365],
                "calibration_horizon": 365,
                "bootstrap": n_boot,
            },
        }
    )


def _groups(metrics: list[str], n_boot: int, n_seeds: int = 1, n: int = 300) -> list[GroupData]:
    rng = np.random.default_rng(0)
    out = []
    for k, split in enumerate(SPLITS):
        x_ct, x_ehr = rng.normal(size=n), rng.normal(size=n)
        lin = 0.5 * x_ct + 0.9 * x_ehr
        t_ev = rng.exponential(500 * np.exp(-lin))
        t_c = rng.uniform(100, 1500, n)
        time, event = np.minimum(t_ev, t_c), t_ev <= t_c
        preds = {
            "uni_ct": (0.5 * x_ct, ["ct"]),
            "uni_ehr": (0.9 * x_ehr, ["ehr"]),
            "late": (lin, ["ct", "ehr"]),
            "concat": (lin + rng.normal(scale=0.5, size=n), ["ct", "ehr"]),
            "noisy": (lin + rng.normal(scale=2.0, size=n), ["ct", "ehr"]),
        }
        models = []
        for name, (risk, mods) in preds.items():
            risks = np.stack([risk + rng.normal(scale=0.2, size=n) for _ in range(n_seeds)])
            surv = np.exp(-np.exp(risks)[:, :, None] * TIMES[None, None, :] / 500.0)
            models.append(ModelPreds(name, _spec(name, mods), list(range(n_seeds)), risks, surv))
        out.append(
            GroupData(
                task="pe_mortality",
                split=split,
                time=time,
                event=event,
                subject_id=np.arange(n) + 1000 * k,
                train_time=time,
                train_event=event,
                times=TIMES,
                metrics=metrics,
                horizons=[180.0, 365.0],
                cal_horizon=365.0,
                cal_bins=5,
                models=models,
                n_boot=n_boot,
                seed=0,
            )
        )
    return out


@pytest.fixture(scope="module")
def table() -> pl.DataFrame:
    groups = _groups(["harrell_c", "uno_c", "calibration"], n_boot=100)
    return assemble_table(
        _cfg(["harrell_c", "uno_c", "calibration"], 100), groups, [score_group(g) for g in groups]
    )


def test_family_is_fused_models_on_test_splits(table: pl.DataFrame) -> None:
    ref = table.filter(pl.col("is_reference"))["model"].unique().to_list()
    assert ref == ["uni_ehr"]
    fam = table.filter(pl.col("in_family"))
    # 3 fused models x internal + external test, Harrell's C only, all tasks in one family
    assert fam.height == 6 and set(fam["split"]) == {"internal_test", "external_test"}
    assert set(fam["metric"]) == {"harrell_c"} and not fam["unimodal"].any()
    assert (fam["family_size"] == 6).all() and (fam["p_holm"] >= fam["p_value"]).all()
    val = table.filter((pl.col("split") == "validation") & pl.col("p_value").is_not_nan())
    assert val.height > 0 and val["p_holm"].is_nan().all() and (val["family_size"] == 0).all()
    # compared outside the family: p but no Holm (the unimodal CT model, Uno's C)
    out = table.filter(~pl.col("in_family") & pl.col("p_value").is_not_nan())
    assert out["p_holm"].is_nan().all()
    assert set(out["p_test"]) == {"ij_z"}
    with pytest.raises(ValueError, match="validation"):
        ComparisonFamily(splits=("validation", "internal_test"))


def test_p_value_is_the_ij_contrast_test() -> None:
    groups = _groups(["harrell_c"], n_boot=50)
    g = groups[2]
    tab = assemble_table(_cfg(["harrell_c"], 50), groups, [score_group(x) for x in groups])
    by = {m.model: m.risk[0] for m in g.models}
    for row in tab.filter((pl.col("split") == "external_test") & ~pl.col("is_reference")).iter_rows(
        named=True
    ):
        want = compare_concordance(
            g.time, g.event, by[row["model"]], by["uni_ehr"], cluster=g.subject_id
        )
        assert row["p_test"] == "ij_z"
        assert row["p_value"] == pytest.approx(want.p_value, rel=1e-9, abs=1e-300)
        assert row["delta"] == pytest.approx(want.difference, abs=1e-12)


def test_seed_averaged_ij_influence() -> None:
    groups = _groups(["harrell_c"], n_boot=20, n_seeds=3)
    g = groups[1]
    sc = score_group(g)
    m, ref = g.models[3], g.models[1]  # concat vs uni_ehr
    u = [
        np.mean([concordance_index(g.time, g.event, x.risk[s]).influence for s in range(3)], 0)
        for x in (m, ref)
    ]
    np.testing.assert_allclose(sc["infl"][m.model][("harrell_c", None)], u[0], atol=1e-14)
    d = sc["point"][m.model][("harrell_c", None)] - sc["point"][ref.model][("harrell_c", None)]
    tab = assemble_table(_cfg(["harrell_c"], 20), groups, [score_group(x) for x in groups])
    row = tab.filter((pl.col("split") == "internal_test") & (pl.col("model") == m.model)).row(
        0, named=True
    )
    assert row["p_value"] == pytest.approx(z_test(d, float((u[0] - u[1]) @ (u[0] - u[1])))[2])


def test_calibration_rows_and_intervals(table: pl.DataFrame) -> None:
    cal = table.filter(pl.col("metric").is_in(["cal_slope", "cal_intercept", "ici", "e50"]))
    assert cal.height == 4 * 5 * 3 and (cal["horizon"] == 365.0).all()
    assert set(cal.filter(pl.col("metric") == "ici")["ci_method"]) == {
        "percentile_calibration_test"
    }
    assert set(cal.filter(pl.col("metric") == "cal_slope")["ci_method"]) == {"percentile"}
    # no interval excludes its own estimate; no comparison of calibration statistics
    assert ((cal["lower"] <= cal["estimate"]) & (cal["estimate"] <= cal["upper"])).all()
    assert cal["delta"].is_nan().all()
    # the simulated predictions are the true model (up to seed noise): slope near 1
    slope = cal.filter((pl.col("metric") == "cal_slope") & (pl.col("model") == "late"))
    assert ((slope["lower"] < 1.0) & (1.0 < slope["upper"])).all()


def test_cache_second_evaluation_reads_every_statistic(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    rd = RunDir(tmp_path)  # type: ignore[arg-type]
    groups = _groups(["harrell_c", "calibration"], n_boot=60)
    first = score_groups(groups, rd, progress=False)
    files = sorted((rd.root / CACHE_DIR).glob("*.npz"))
    assert len(files) == 3 * 5

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("scored again")

    monkeypatch.setattr(evaluate, "score_group", boom)
    again = score_groups(groups, rd, progress=False)
    for a, b in zip(first, again, strict=True):
        assert a["point"].keys() == b["point"].keys()
        for model in a["boot"]:
            for key, arr in a["boot"][model].items():
                np.testing.assert_array_equal(arr, b["boot"][model][key])
                ua, ub = a["infl"][model][key], b["infl"][model][key]
                assert (ua is None) == (ub is None)
                if ua is not None:
                    np.testing.assert_array_equal(ua, ub)
        assert a["p_cal"] == b["p_cal"]
    # a changed model is scored again, alone; its stale entry is removed
    monkeypatch.setattr(evaluate, "score_group", score_group)
    g = groups[0]
    m = dataclasses.replace(g.models[2], risk=g.models[2].risk + 0.01)
    groups[0] = dataclasses.replace(g, models=[*g.models[:2], m, *g.models[3:]])
    calls: list[list[str]] = []

    def counting(x: GroupData, on_block: object = None) -> dict:
        calls.append([mm.model for mm in x.models])
        return score_group(x, on_block)  # type: ignore[arg-type]

    monkeypatch.setattr(eval_runner, "score_group", counting)
    score_groups(groups, rd, progress=False)
    assert calls == [["late"]]
    assert len(list((rd.root / CACHE_DIR).glob("*.npz"))) == 3 * 5


def test_the_comparison_family_is_configurable_and_never_holds_validation() -> None:
    from pydantic import ValidationError

    from survfuse.experiment.config import EvaluationConfig
    from survfuse.experiment.evaluate import ComparisonFamily

    ev = EvaluationConfig.model_validate(
        {
            "family": {
                "metrics": ["harrell_c", "uno_c"],
                "splits": ["external_test"],
                "models": "all",
            }
        }
    )
    fam = ComparisonFamily(
        metrics=tuple(ev.family.metrics), splits=tuple(ev.family.splits), models=ev.family.models
    )
    assert fam.contains("uno_c", "external_test", unimodal=True)
    assert not fam.contains("harrell_c", "internal_test", unimodal=False)
    with pytest.raises(ValidationError):
        EvaluationConfig.model_validate({"family": {"splits": ["validation"]}})
    with pytest.raises(ValidationError, match="did you mean 'harrell_c'"):
        EvaluationConfig.model_validate({"family": {"metrics": ["harell_c"]}})
