"""benchmarks/bench_study_scale.py at tiny n: what its speed-ups rely on holds.

- the split views share the one copy of the embeddings and partition the rows;
- the `linear` strategy (fitted once per task, its risk standing for every seed) gives the same
  predictions for every seed;
- fits in two forked worker processes give bit-identical risks to fits in this process;
- the printed C is Harrell's C as scikit-survival computes it (an independent implementation),
  and the subset check trains on the subset's rows only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_study_scale.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_study_scale", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # forked workers pickle `_job` by module name
    spec.loader.exec_module(module)
    return module


TINY = ["--n", "300", "--ct-tokens", "2", "--ehr-tokens", "3", "--max-epochs", "3",
        "--patience", "2", "--device", "cpu"]  # fmt: skip


def _args(bench: ModuleType, *extra: str) -> object:
    return bench.parse_args([*TINY, *extra])


def test_split_views_share_memory_and_partition_rows(bench: ModuleType) -> None:
    args = _args(bench, "--check-subset", "100")
    data = bench.simulate(args)
    ct = data["features"]["ct"]
    seen = []
    for name, sl in data["splits"]["study"].items():
        view = bench.rows(ct, sl)
        assert np.shares_memory(view.tokens, ct.tokens) and np.shares_memory(view.pooled, ct.pooled)
        np.testing.assert_array_equal(view.tokens, ct.tokens[sl])
        seen.append(view.subject_id)
        assert len(view) > 0, name
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(300))
    sub, study = data["splits"]["subset"], data["splits"]["study"]
    assert sub["train"].stop - sub["train"].start == 70
    assert sub["val"].stop - sub["val"].start == 15
    assert sub["train"].start == study["train"].start and sub["val"].start == study["val"].start
    assert sub["test"] == study["test"]


def test_linear_risk_does_not_depend_on_the_seed(bench: ModuleType) -> None:
    args = _args(bench)
    data = bench.simulate(args)
    for label in ("linear", "linear_ct"):
        assert bench.is_exact(label)
        r0 = bench.fit_predict(data, "PE", label, 0, args, "study")["risk"]
        r1 = bench.fit_predict(data, "PE", label, 7, args, "study")["risk"]
        np.testing.assert_array_equal(r0, r1)
    assert not bench.is_exact("concat")


def test_study_in_workers_matches_in_process_and_sksurv(bench: ModuleType) -> None:
    from sksurv.metrics import concordance_index_censored

    argv = [*TINY, "--strategies", "linear_ehr,concat", "--tasks", "PE", "--seeds", "2",
            "--bootstrap", "50", "--check-subset", "120", "--check-patience", "2"]  # fmt: skip
    one = bench.main([*argv, "--workers", "1"])
    two = bench.main([*argv, "--workers", "2"])
    # linear once (seed 0), concat per seed, for the study and the subset
    assert sorted(one["fits"]) == sorted(two["fits"])
    assert len(one["fits"]) == 2 * (1 + 2)
    for job, fit in one["fits"].items():
        np.testing.assert_array_equal(fit["risk"], two["fits"][job]["risk"])
        assert fit["epochs"] <= 3
    args = _args(bench)
    data = bench.simulate(args)
    te = data["splits"]["study"]["test"]
    t, e, lp = (a[te] for a in data["outcomes"]["PE"])
    oracle = one["table"]["PE", "oracle (true log hazard)"]["ci"]
    ref = concordance_index_censored(e, t, lp)[0]
    assert oracle[0] == pytest.approx(ref, abs=1e-12)
    assert oracle[1] < oracle[0] < oracle[2]
    for label in ("linear_ehr", "concat"):
        row = one["table"]["PE", label]
        assert row["ci"] == two["table"]["PE", label]["ci"]
        assert 0.0 <= row["subset_c"] <= 1.0
        assert len(row["per_seed"]) == (1 if label == "linear_ehr" else 2)


def test_scale_defaults(bench: ModuleType) -> None:
    big = bench.parse_args(["--n", "20000"])
    assert (big.batch_size, big.patience, big.workers, big.threads) == (1024, 3, 2, 1)
    small = bench.parse_args(["--n", "3000"])
    assert (small.batch_size, small.patience) == (None, 10)
    assert bench.parse_args(["--n", "20000", "--patience", "7"]).patience == 7
    with pytest.raises(SystemExit, match="unknown strategies"):
        bench.parse_args(["--strategies", "concat,cross_atention"])


def test_to_batch_consecutive_rows_are_views_with_the_same_values() -> None:
    import torch

    from survfuse.features import ModalityFeatures
    from survfuse.fusion.batch import to_batch

    rng = np.random.default_rng(0)
    n = 50
    f = ModalityFeatures(
        np.arange(n), np.full(n, np.datetime64("2020-01-01", "us")),
        rng.standard_normal((n, 4)).astype(np.float32), np.ones(n, bool),
        tokens=rng.standard_normal((n, 3, 5)).astype(np.float32), mask=np.ones((n, 3), bool),
    )  # fmt: skip
    feats = {"ct": f}
    run = to_batch(feats, np.arange(10, 30), modalities=["ct"], with_tokens=True)["ct"]
    gathered = to_batch(feats, np.arange(10, 30)[::-1], modalities=["ct"], with_tokens=True)["ct"]
    for k in ("pooled", "tokens", "mask", "present"):
        assert torch.equal(run[k], gathered[k].flip(0))
    assert np.shares_memory(run["tokens"].numpy(), f.tokens)  # the run: no copy
    assert not np.shares_memory(gathered["tokens"].numpy(), f.tokens)  # any other order: a copy
    with pytest.raises(IndexError):  # past the end fails as fancy indexing does
        to_batch(feats, np.arange(40, 51), modalities=["ct"], with_tokens=True)
