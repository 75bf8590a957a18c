"""FeatureStore: caching, resume after a crash (exception and a real kill -9), fingerprints."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pytest

from survfuse.encoders.base import Encoder, cohort_keys, hash_files
from survfuse.encoders.store import FeatureStore
from survfuse.features import ModalityFeatures

ROOT = Path(__file__).resolve().parents[1]


class ToyEncoder(Encoder):
    """Learns the training mean of `x`; pooled = [x - mean, 2x]; T varies by chunk.

    Crash hooks are outside the config (so they do not change the fingerprint): `fail_after`
    raises from inside `encode`; env SURVFUSE_TEST_KILL_AFTER sends itself SIGKILL.
    """

    name = "toy"
    modality = "ehr"
    learns = True

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale=scale)
        self.mu = np.zeros(1)
        self.calls = 0
        self.fail_after: int | None = None

    def fit(self, cohort: pl.DataFrame, source: Any) -> ToyEncoder:
        self.mu = np.array([cohort.get_column("x").mean()])
        self.fitted = True
        return self

    def state(self) -> dict[str, Any]:
        return {"mu": self.mu}

    def set_state(self, state: Any) -> None:
        self.mu = np.asarray(state["mu"])

    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        kill_after = os.environ.get("SURVFUSE_TEST_KILL_AFTER")
        if kill_after is not None and self.calls >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash inside encode")
        self.calls += 1
        sid, pt = cohort_keys(cohort)
        x = cohort.get_column("x").to_numpy()
        n, t = len(sid), 1 + int(sid.max()) % 3
        tokens = np.repeat(x[:, None, None], t, axis=1).repeat(2, axis=2).astype(np.float32)
        return ModalityFeatures(
            sid,
            pt,
            pooled=np.stack([x - self.mu[0], 2 * x * self._config["scale"]], 1).astype(np.float32),
            present=x >= 0,
            tokens=tokens,
            mask=np.ones((n, t), bool),
            meta={"manifest": [{"subject_id": int(s), "reason": "negative"} for s in sid[x < 0]]},
        )


def cohort(n: int = 23, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    base = dt.datetime(2021, 1, 1)
    return pl.DataFrame(
        {
            "subject_id": rng.permutation(n) + 1,
            "prediction_time": [base + dt.timedelta(days=int(d)) for d in rng.integers(0, 50, n)],
            "x": np.round(rng.normal(size=n), 3),
        }
    )


def test_second_run_encodes_nothing_and_rows_follow_cohort(tmp_path: Path) -> None:
    df = cohort()
    store = FeatureStore(tmp_path)
    enc = ToyEncoder()
    f = store.encode(enc, df, None, fit_cohort=df[:10], chunk_size=5, progress=False)
    assert store.last_run is not None
    assert (store.last_run.encoded_chunks, store.last_run.n_chunks) == (5, 5)
    assert isinstance(f.pooled, np.memmap)
    np.testing.assert_array_equal(f.subject_id, df["subject_id"].to_numpy())
    mu = df[:10]["x"].mean()
    np.testing.assert_allclose(f.pooled[:, 0], df["x"].to_numpy() - mu, rtol=1e-6, atol=1e-6)
    # tokens padded to the largest T over chunks; padding masked out
    assert f.num_tokens == 3 and f.mask is not None
    assert f.tokens is not None and (f.mask.sum(1) >= 1).all() and (f.tokens[~f.mask] == 0).all()
    np.testing.assert_array_equal(f.present, df["x"].to_numpy() >= 0)

    enc2 = ToyEncoder()
    g = store.encode(enc2, df, None, fit_cohort=df[:10], chunk_size=5, progress=False)
    assert enc2.calls == 0 and store.last_run.encoded_chunks == 0
    assert store.last_run.fitted == "cached"
    np.testing.assert_array_equal(np.asarray(f.pooled), np.asarray(g.pooled))

    # the same predictions in another order reuse every chunk
    enc3 = ToyEncoder()
    h = store.encode(enc3, df.reverse(), None, fit_cohort=df[:10], chunk_size=5, progress=False)
    assert enc3.calls == 0 and not store.last_run.result_cached
    np.testing.assert_array_equal(np.asarray(h.pooled), np.asarray(f.pooled)[::-1])
    # failure reasons reported by the encoder are kept
    man = pl.read_parquet(next(store.last_run.directory.glob("results/*/manifest.parquet")))
    assert sorted(man["subject_id"]) == sorted(df.filter(pl.col("x") < 0)["subject_id"])


def test_crash_inside_encode_then_resume_gives_identical_features(tmp_path: Path) -> None:
    df = cohort(seed=1)
    ref = FeatureStore(tmp_path / "ref").encode(
        ToyEncoder(), df, None, fit_cohort=df[:8], chunk_size=4, progress=False
    )
    store = FeatureStore(tmp_path / "crash")
    enc = ToyEncoder()
    enc.fail_after = 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.encode(enc, df, None, fit_cohort=df[:8], chunk_size=4, progress=False)
    again = ToyEncoder()
    out = store.encode(again, df, None, fit_cohort=df[:8], chunk_size=4, progress=False)
    assert store.last_run is not None
    assert (store.last_run.cached_chunks, store.last_run.encoded_chunks) == (3, 3)
    assert again.calls == 3
    for name in ("pooled", "tokens", "mask", "present"):
        np.testing.assert_array_equal(
            np.asarray(getattr(out, name)), np.asarray(getattr(ref, name))
        )


_KILL_SCRIPT = """
import sys, polars as pl
sys.path.insert(0, {tests!r})
from test_feature_store import ToyEncoder, cohort
from survfuse.encoders.store import FeatureStore
df = cohort(seed=2)
FeatureStore({root!r}).encode(ToyEncoder(), df, None, fit_cohort=df[:8], chunk_size=4,
                              progress=False)
"""


def test_kill_9_mid_way_then_resume(tmp_path: Path) -> None:
    df = cohort(seed=2)
    root = tmp_path / "store"
    env = {**os.environ, "SURVFUSE_TEST_KILL_AFTER": "2"}
    script = _KILL_SCRIPT.format(tests=str(ROOT / "tests"), root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    store = FeatureStore(root)
    enc = ToyEncoder()
    out = store.encode(enc, df, None, fit_cohort=df[:8], chunk_size=4, progress=False)
    assert store.last_run is not None
    # killed at the start of the 3rd encode call: the 1st call's rows were written (a call
    # waits for the one before it), the 2nd's write may have been cut off in the background
    assert store.last_run.cached_chunks in (1, 2)
    assert enc.calls == 6 - store.last_run.cached_chunks
    assert store.last_run.fitted == "cached"  # the fit survived the kill too
    ref = FeatureStore(tmp_path / "ref").encode(
        ToyEncoder(), df, None, fit_cohort=df[:8], chunk_size=4, progress=False
    )
    np.testing.assert_array_equal(np.asarray(out.pooled), np.asarray(ref.pooled))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_fingerprint_changes_with_config_state_and_inputs(tmp_path: Path) -> None:
    df = cohort()
    a, b = ToyEncoder().fit(df[:5], None), ToyEncoder().fit(df[:5], None)
    assert a.fingerprint() == b.fingerprint()
    assert ToyEncoder(scale=2.0).fit(df[:5], None).fingerprint() != a.fingerprint()
    assert ToyEncoder().fit(df[:6], None).fingerprint() != a.fingerprint()  # fitted state
    assert ToyEncoder().fingerprint() != a.fingerprint()  # unfitted

    f = tmp_path / "input.bin"
    f.write_bytes(b"abc")
    h1 = hash_files([f])
    f.write_bytes(b"abcd")
    assert hash_files([f]) != h1

    class Source:
        def input_files(self) -> list[Path]:
            return [f]

    store = FeatureStore(tmp_path / "s")
    store.encode(ToyEncoder(), df, Source(), fit_cohort=df[:5], chunk_size=50, progress=False)
    assert store.last_run is not None
    d1 = store.last_run.directory
    os.utime(f, ns=(0, 123_000_000_000))  # touching an input invalidates the cache
    enc = ToyEncoder()
    store.encode(enc, df, Source(), fit_cohort=df[:5], chunk_size=50, progress=False)
    assert store.last_run.directory != d1 and enc.calls == 1


def test_unfitted_learning_encoder_and_bad_chunks_are_refused(tmp_path: Path) -> None:
    df = cohort()
    with pytest.raises(RuntimeError, match="call fit"):
        FeatureStore(tmp_path).encode(ToyEncoder(), df, None, progress=False)

    class Shuffled(ToyEncoder):
        def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
            return super().encode(cohort.reverse(), source)

    with pytest.raises(ValueError, match="out of order"):
        FeatureStore(tmp_path).encode(Shuffled(), df, None, fit_cohort=df, progress=False)


def test_encoder_save_load_roundtrip(tmp_path: Path) -> None:
    df = cohort()
    enc = ToyEncoder(scale=3.0).fit(df, None)
    enc.save(tmp_path / "enc")
    back = ToyEncoder.load(tmp_path / "enc")
    assert isinstance(back, ToyEncoder) and back.fitted
    assert back.fingerprint() == enc.fingerprint()
    np.testing.assert_array_equal(back.mu, enc.mu)


def test_chunks_follow_source_shards_so_each_encode_call_reads_one_shard(tmp_path: Path) -> None:
    df = cohort(n=40, seed=3)
    sids = df["subject_id"].to_numpy()
    shard_of = {int(s): int(s) % 3 for s in sids}  # subjects interleave across 3 shards
    shard_of[int(sids[0])] = -1  # marker: this subject's events span two shards

    class ShardedSource:
        def subject_shards(self) -> pl.DataFrame:
            rows = [(s, g) for s, g in shard_of.items() if g >= 0]
            rows += [(int(sids[0]), 0), (int(sids[0]), 2)]
            return pl.DataFrame(rows, schema=["subject_id", "shard"], orient="row")

    class Batched(ToyEncoder):
        store_batch_rows = 1000
        seen: ClassVar[list[set[int]]] = []

        def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
            Batched.seen.append(set(cohort["subject_id"].to_list()))
            return super().encode(cohort, source)

    out = FeatureStore(tmp_path / "a").encode(
        Batched(), df, ShardedSource(), fit_cohort=df[:8], chunk_size=4, progress=False
    )
    ref = FeatureStore(tmp_path / "b").encode(
        ToyEncoder(), df, None, fit_cohort=df[:8], chunk_size=4, progress=False
    )
    # one call per shard plus one for the subject in two shards, each call within one shard
    assert len(Batched.seen) == 4
    for subjects in Batched.seen:
        assert len({shard_of[s] for s in subjects}) == 1
    np.testing.assert_array_equal(out.subject_id, sids)
    np.testing.assert_array_equal(np.asarray(out.pooled), np.asarray(ref.pooled))
    np.testing.assert_array_equal(np.asarray(out.present), np.asarray(ref.present))
    # the toy's token count depends on its chunk; the first token is real in both
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], np.asarray(ref.tokens)[:, 0])
