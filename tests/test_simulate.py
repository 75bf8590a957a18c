"""Tests of the multi-site CT + EHR cohort simulator (survfuse.data.simulate)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl

from survfuse.data.cohort import load_cohort
from survfuse.data.imaging import load_ct, load_ct_index, select_studies
from survfuse.data.meds import MEDSDataset
from survfuse.data.simulate import simulate
from survfuse.data.simulate_ehr import DEATH_CODE, MACE_CODES


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_arguments_give_byte_identical_files(tmp_path):
    kw = dict(n=40, shape=(16, 16, 10), seed=3, progress=False)
    a = _digests(simulate(tmp_path / "a", **kw))
    b = _digests(simulate(tmp_path / "b", **kw))
    assert a == b
    assert any(k.startswith("ct/") for k in a) and any(k.startswith("meds/data/") for k in a)
    c = _digests(simulate(tmp_path / "c", **{**kw, "seed": 4}))
    assert c["cohort.parquet"] != a["cohort.parquet"]


def test_formats_pass_the_data_layer_validators(sim_small):
    cohort = load_cohort(sim_small / "cohort.parquet")
    assert set(cohort.tasks) >= {"pe_mortality", "mace"}
    assert len(cohort) == 300 and cohort.sites == ["A", "B", "C"]
    meds = MEDSDataset(sim_small / "meds")
    summary = meds.validate(deep=True)
    assert summary["strict_meds"] and summary["n_subjects"] == 300
    index = load_ct_index(sim_small / "ct_index.parquet")
    chosen = select_studies(cohort.df, index)
    assert chosen["path"].null_count() == 0
    vol = load_ct(chosen["path"][0])
    assert vol.array.shape == (32, 32, 20)
    meta = json.loads((sim_small / "dataset.json").read_text())
    assert meta["parameters"]["n"] == 300 and meta["parameters"]["shape"] == [32, 32, 20]


def test_no_outcome_event_at_or_before_prediction_time(sim_small):
    cohort = pl.read_parquet(sim_small / "cohort.parquet")
    events = pl.read_parquet(sim_small / "meds" / "data" / "*.parquet").join(
        cohort.select("subject_id", "prediction_time"), on="subject_id"
    )
    outcome = events.filter(pl.col("code").is_in([DEATH_CODE, *MACE_CODES]))
    assert outcome.height > 0
    assert outcome.filter(pl.col("time") <= pl.col("prediction_time")).height == 0
