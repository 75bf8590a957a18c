"""The Ray executor on a real local Ray runtime (2 CPUs): the same study as the local executor.

References are independent of Ray: the local executor's run of the same config and seeds
(`metrics.parquet`, cell predictions), the local `FeatureStore`'s CT features and chunk files,
and `evaluate.score_group`'s resampled statistics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml

from survfuse.experiment.config import ConfigError, RayConfig
from survfuse.experiment.config_load import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"


def small_config(sim: Path, folder: Path, **extra: Any) -> Path:
    """examples/tiny.yaml cut down: two unimodal baselines + late fusion, 3 epochs, 300 resamples
    (three 128-resample blocks, so the bootstrap is fanned out over several Ray tasks)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["data"] = {
        "cohort": str(sim / "cohort.parquet"),
        "ct_index": str(sim / "ct_index.parquet"),
        "meds_root": str(sim / "meds"),
    }
    raw["strategies"] = [
        {"name": "unimodal", "modality": "ct"},
        {"name": "unimodal", "modality": "ehr"},
        {"name": "late"},
    ]
    raw["training"].update(max_epochs=3, patience=3)
    raw["evaluation"]["bootstrap"] = 300
    raw["ray"] = {"bootstrap_block": 128, "encode_actors": 2, "max_retries": 1}
    raw.update(extra)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ----------------------------------------------------------------------------- config (no Ray)
def test_ray_section_resources_and_errors(sim_small: Path, tmp_path: Path) -> None:
    r = RayConfig.model_validate(
        {"num_cpus": 2, "strategies": {"late": {"num_gpus": 0.5}, "concat": {"num_cpus": 4}}}
    )
    assert r.resources("late", threads=1) == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert r.resources("concat", threads=1) == {"num_cpus": 4.0, "num_gpus": 0.0}
    # No num_cpus anywhere: a cell asks for as many CPUs as it trains threads.
    assert RayConfig().resources("late", threads=3) == {"num_cpus": 3.0, "num_gpus": 0.0}
    cfg = load_config(small_config(sim_small, tmp_path, executor="ray"))
    assert cfg.executor == "ray" and cfg.ray.max_retries == 1
    raw = yaml.safe_load((tmp_path / "small.yaml").read_text())
    raw["ray"]["strategies"] = {"lat": {"num_cpus": 1}}
    with pytest.raises(ConfigError, match=r"ray.strategies.*did you mean 'late'"):
        parse_config(raw)
    raw["ray"] = {"max_retry": 1}
    with pytest.raises(
        ConfigError, match=r"ray.max_retry: unknown key.*did you mean 'max_retries'"
    ):
        parse_config(raw)


def test_get_executor_builds_ray_executor_with_config_options() -> None:
    from survfuse.experiment.executors import get_executor

    ex = get_executor("ray", workers=2, address="127.0.0.1:1", ray=RayConfig(max_retries=5))
    assert type(ex).__name__ == "RayExecutor" and ex.name == "ray"
    assert ex.options.max_retries == 5 and ex.address == "127.0.0.1:1"
    assert ex.ignored_options == ["workers"]  # a local-executor option does not break it
    assert not ex._owns_runtime  # nothing is started or joined before work arrives


# ----------------------------------------------------------------------------- Ray runtime
@pytest.fixture(scope="module")
def ray_runtime() -> Any:
    import sys

    import ray

    # The cell functions below are defined in this test module, which Ray workers cannot
    # import: ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # address="local": a private runtime, never another developer's cluster on this machine.
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=40
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(ray_runtime: Any, sim_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small config run by the local executor and by the Ray executor (separate stores)."""
    from survfuse.experiment.executors import LocalExecutor
    from survfuse.experiment.ray_executor import RayExecutor
    from survfuse.experiment.runner import run_experiment

    base = tmp_path_factory.mktemp("ray_runs")
    cfg = load_config(small_config(sim_small, base / "config"))
    local = run_experiment(cfg, base / "local", executor=LocalExecutor(), progress=False)
    with RayExecutor(ray=cfg.ray) as ex:
        remote = run_experiment(cfg, base / "ray", executor=ex, progress=False)
    return {"cfg": cfg, "local": local, "ray": remote}


@pytest.mark.ray
def test_metrics_identical_to_local_executor(runs: dict) -> None:
    local, remote = runs["local"], runs["ray"]
    assert not local.failed and not remote.failed
    assert [r.status for r in remote.results] == ["done"] * len(remote.specs)
    a = pl.read_parquet(local.run_dir / "metrics.parquet")
    b = pl.read_parquet(remote.run_dir / "metrics.parquet")
    assert a.height > 0 and a.equals(b)
    for spec in local.specs:
        pa = pl.read_parquet(local.run_dir / "cells" / spec.cell_id / "predictions.parquet")
        pb = pl.read_parquet(remote.run_dir / "cells" / spec.cell_id / "predictions.parquet")
        assert pa.equals(pb), spec.cell_id
    info = json.loads((remote.run_dir / "run.json").read_text())
    assert info["executor"] == "ray" and info["cells_failed"] == []


@pytest.mark.ray
def test_ray_data_ct_features_equal_local_store(runs: dict) -> None:
    from survfuse.encoders.base import CTSource
    from survfuse.encoders.store import FeatureStore
    from survfuse.experiment.config_load import encoder_from_choice
    from survfuse.features import ModalityFeatures

    local, remote, cfg = runs["local"], runs["ray"], runs["cfg"]
    index = json.loads((remote.run_dir / "features" / "index.json").read_text())
    folder = index["ct"]["ct_radiomics"]
    fa = ModalityFeatures.load(local.run_dir / folder, mmap=False)
    fb = ModalityFeatures.load(remote.run_dir / folder, mmap=False)
    assert np.array_equal(fa.subject_id, fb.subject_id)
    assert np.array_equal(fa.pooled, fb.pooled) and np.array_equal(fa.present, fb.present)
    assert fa.meta["fingerprint"] == fb.meta["fingerprint"]
    # Same chunks (named by their keys) with identical contents; a local run writes them as
    # references into segments (store format 2), a Ray actor as features folders (format 1).
    from survfuse.encoders.store_segments import load_chunk

    store_a, store_b = local.run_dir / "features" / "store", remote.run_dir / "features" / "store"
    chunks_a = sorted(
        p.parent.relative_to(store_a) / p.stem for p in store_a.glob("ct_radiomics-*/chunks/*.json")
    )
    chunks_b = sorted(p.relative_to(store_b) for p in store_b.glob("ct_radiomics-*/chunks/*"))
    assert chunks_a and chunks_a == chunks_b
    for rel in chunks_a:
        ca, cb = load_chunk(store_a / rel), load_chunk(store_b / rel)
        assert ca.meta == cb.meta, rel
        for name in ("subject_id", "prediction_time", "pooled", "present", "tokens", "mask"):
            a, b = getattr(ca, name), getattr(cb, name)
            assert (a is None and b is None) or np.array_equal(a, b), (rel, name)
    # A later local run on the Ray-written store finds everything cached.
    cohort = pl.read_parquet(remote.run_dir / "data" / "cohort.parquet")
    keys = cohort.select("subject_id", "prediction_time")
    train = cohort.filter(pl.col("split") == "train").select("subject_id", "prediction_time")
    store = FeatureStore(store_b)
    enc = encoder_from_choice(cfg.encoders.ct[0])
    again = store.encode(enc, keys, CTSource.from_index(cfg.data.ct_index), fit_cohort=train)
    assert store.last_run is not None and store.last_run.encoded_chunks == 0
    assert np.array_equal(np.asarray(again.pooled), fb.pooled)


@pytest.mark.ray
def test_bootstrap_blocks_equal_local_score_group(runs: dict) -> None:
    from survfuse.experiment.evaluate import build_groups, score_group
    from survfuse.experiment.ray_executor import score_groups_on_ray
    from survfuse.experiment.rundir import RunDir

    remote, cfg = runs["ray"], runs["cfg"]
    groups = build_groups(cfg, RunDir(remote.run_dir), remote.specs)
    assert groups and groups[0].n_boot == 300
    # 260 resamples: blocks of 128, 128 and 4, one per task (as if the cluster had 8 CPUs);
    # the second group is scored in a single task.
    groups = [dataclasses.replace(groups[-1], n_boot=260), groups[0]]
    fanned = score_groups_on_ray(groups, block=100, cpus=8)
    for g, got in zip(groups, fanned, strict=True):
        want = score_group(g)
        assert got["point"] == want["point"]
        for model, stats in want["boot"].items():
            for key, arr in stats.items():
                np.testing.assert_array_equal(got["boot"][model][key], arr, err_msg=str(key))


def _kill_first_attempt(spec: Any, run_dir: str) -> Any:
    """Cell function of the retry test: SIGKILLs its own worker on the first attempt only."""
    from survfuse.experiment.cell import run_cell

    marker = Path(run_dir) / f"attempt-{spec.cell_id}"
    with marker.open("a") as f:
        f.write(f"{os.getpid()}\n")
    if len(marker.read_text().split()) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return run_cell(spec, run_dir)


def _always_killed(spec: Any, run_dir: str) -> Any:
    marker = Path(run_dir) / f"attempt-{spec.cell_id}"
    with marker.open("a") as f:
        f.write(f"{os.getpid()}\n")
    os._exit(1)


def _fresh_cell(runs: dict, name: str) -> tuple[Any, Path]:
    remote = runs["ray"]
    spec = remote.specs[0]
    run_dir = remote.run_dir.parent / name
    shutil.copytree(remote.run_dir, run_dir, ignore=shutil.ignore_patterns("cells"))
    return spec, run_dir


@pytest.mark.ray
def test_killed_worker_is_retried_and_completes(runs: dict) -> None:
    from survfuse.experiment.ray_executor import RayExecutor

    spec, run_dir = _fresh_cell(runs, "retry")
    ex = RayExecutor(ray={"max_retries": 2}, cell_fn=_kill_first_attempt)
    [result] = ex.run([spec], run_dir)
    pids = (run_dir / f"attempt-{spec.cell_id}").read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # a second worker process ran the retry
    assert result.status == "done"
    got = pl.read_parquet(run_dir / "cells" / spec.cell_id / "predictions.parquet")
    want = pl.read_parquet(runs["local"].run_dir / "cells" / spec.cell_id / "predictions.parquet")
    assert got.equals(want)


@pytest.mark.ray
def test_worker_lost_on_every_attempt_is_a_failed_cell(runs: dict) -> None:
    from survfuse.experiment.ray_executor import RayExecutor

    spec, run_dir = _fresh_cell(runs, "lost")
    seen = []
    ex = RayExecutor(ray={"max_retries": 1}, cell_fn=_always_killed)
    [result] = ex.run([spec], run_dir, on_result=seen.append)
    assert seen == [result] and result.status == "failed"
    assert len((run_dir / f"attempt-{spec.cell_id}").read_text().split()) == 2  # 1 + 1 retry
    status = json.loads((run_dir / "cells" / spec.cell_id / "status.json").read_text())
    assert status["status"] == "failed" and "worker lost on all 2 attempts" in status["error"]
