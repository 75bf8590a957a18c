"""FeatureStore format 2: output written once (segments), format-1 folders, newer ones refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from survfuse.encoders.store import FeatureStore
from survfuse.encoders.store_segments import STORE_FORMAT, load_chunk
from survfuse.features import ModalityFeatures
from test_feature_store import ToyEncoder, cohort

ARRAYS = ("subject_id", "prediction_time", "pooled", "present", "tokens", "mask", "token_codes")


class FixedT(ToyEncoder):
    """The toy with 2 tokens per row in every call (a row's features do not depend on its call)."""

    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        f = super().encode(cohort, source)
        x = cohort.get_column("x").to_numpy().astype(np.float32)
        f.mask = np.stack([np.ones(len(f), bool), f.subject_id % 2 == 1], axis=1)
        f.tokens = np.where(f.mask[:, :, None], x[:, None, None], 0).repeat(2, axis=2)
        return f


def same(a: ModalityFeatures, b: ModalityFeatures) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), name


def test_fresh_run_writes_output_once_and_result_links_it(tmp_path: Path) -> None:
    df = cohort(n=23, seed=4).sort("subject_id")  # cohort order = chunk order
    enc = FixedT().fit(df[:8], None)
    direct = enc.encode(df, None)
    store = FeatureStore(tmp_path)
    out = store.encode(enc, df, None, chunk_size=5, progress=False)
    assert store.last_run is not None and store.last_run.encoded_chunks == 5
    same(out, direct)
    d = store.last_run.directory
    segments = list((d / "segments").iterdir())
    assert len(segments) == 1  # 5 calls, one segment
    result = next((d / "results").iterdir())
    for name in ("pooled", "tokens", "present"):
        seg, res = segments[0] / f"{name}.npy", result / f"{name}.npy"
        assert seg.stat().st_ino == res.stat().st_ino, name  # a hard link, not a copy
    assert json.loads((d / "store_format.json").read_text()) == {"store_format": STORE_FORMAT}
    # every chunk is a reference to its rows and reads back as the encoder's rows
    refs = sorted((d / "chunks").glob("*.json"))
    assert len(refs) == 5 and not [p for p in (d / "chunks").iterdir() if p.is_dir()]
    for ref in refs:
        part = load_chunk(ref.with_suffix(""))
        rows = np.searchsorted(direct.subject_id, part.subject_id)
        same(part, direct.select(rows))
    # another order of the same cohort reuses the chunks and copies the rows
    back = FeatureStore(tmp_path).encode(enc, df.reverse(), None, chunk_size=5, progress=False)
    same(back, direct.select(np.arange(len(df))[::-1]))


def _to_format_1(enc_dir: Path) -> None:
    """Rewrite a store folder as format 1 wrote it: chunk folders of .npy files, no segments."""
    for ref in (enc_dir / "chunks").glob("*.json"):
        folder = ref.with_suffix("")
        part = load_chunk(folder)
        part = ModalityFeatures(
            **{k: None if getattr(part, k) is None else np.array(getattr(part, k)) for k in ARRAYS},
            meta=part.meta,
        )
        part.save(folder)
        ref.unlink()
    shutil.rmtree(enc_dir / "segments")
    (enc_dir / "store_format.json").unlink()


def test_format_1_store_is_read_as_it_is(tmp_path: Path) -> None:
    df = cohort(n=23, seed=5)
    store = FeatureStore(tmp_path)
    ref = store.encode(ToyEncoder(), df, None, fit_cohort=df[:8], chunk_size=4, progress=False)
    assert store.last_run is not None
    enc_dir = store.last_run.directory
    ref = ref.select(np.arange(len(df)))  # in memory: the folder is rewritten below
    _to_format_1(enc_dir)
    shutil.rmtree(enc_dir / "results")
    enc = ToyEncoder()
    out = store.encode(enc, df, None, fit_cohort=df[:8], chunk_size=4, progress=False)
    assert enc.calls == 0 and store.last_run.cached_chunks == store.last_run.n_chunks == 6
    same(out, ref)
    # a format-1 result folder is a cache hit
    again = store.encode(ToyEncoder(), df, None, fit_cohort=df[:8], chunk_size=4, progress=False)
    assert store.last_run.result_cached
    same(again, ref)


def test_newer_store_format_is_refused_with_a_re_encode_message(tmp_path: Path) -> None:
    df = cohort(n=10, seed=6)
    store = FeatureStore(tmp_path)
    store.encode(ToyEncoder(), df, None, fit_cohort=df, chunk_size=4, progress=False)
    assert store.last_run is not None
    enc_dir = store.last_run.directory
    (enc_dir / "store_format.json").write_text(json.dumps({"store_format": STORE_FORMAT + 1}))
    with pytest.raises(ValueError, match=r"store format 3.*Re-encode into a new store folder"):
        store.encode(ToyEncoder(), df, None, fit_cohort=df, chunk_size=4, progress=False)
    # a single chunk reference of a newer format is refused too
    (enc_dir / "store_format.json").write_text(json.dumps({"store_format": STORE_FORMAT}))
    shutil.rmtree(enc_dir / "results")
    chunk = next((enc_dir / "chunks").glob("*.json"))
    body = json.loads(chunk.read_text())
    chunk.write_text(json.dumps({**body, "store_format": STORE_FORMAT + 1}))
    with pytest.raises(ValueError, match="re-encode into a new store folder"):
        store.encode(ToyEncoder(), df, None, fit_cohort=df, chunk_size=4, progress=False)


@pytest.mark.parametrize("order", ["chunk order", "shuffled"])
def test_a_chunk_whose_rows_were_never_written_is_an_error_not_zeros(
    tmp_path: Path, order: str
) -> None:
    df = cohort(n=12, seed=7).sort("subject_id")
    if order == "shuffled":
        df = df.sample(fraction=1.0, shuffle=True, seed=1)
    store = FeatureStore(tmp_path)
    store.encode(FixedT(), df, None, fit_cohort=df, chunk_size=4, progress=False)
    assert store.last_run is not None
    enc_dir = store.last_run.directory
    shutil.rmtree(enc_dir / "results")
    (seg,) = (enc_dir / "segments").iterdir()
    with open(seg / "pooled.npy", "r+b") as f:  # as if the writer died in the last rows
        f.truncate((seg / "pooled.npy").stat().st_size - 4)
    with pytest.raises(ValueError, match="segment shorter than its chunk reference"):
        FeatureStore(tmp_path).encode(
            FixedT(), df, None, fit_cohort=df, chunk_size=4, progress=False
        )


class Lending(FixedT):
    """The toy with a wide pooled output allocated by `ehr_vocab.output_array` (as the EHR
    encoders): 1,000 float32 per row."""

    copy_out = False

    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        from survfuse.encoders.ehr_vocab import output_array

        f = super().encode(cohort, source)
        out = output_array((len(f), 1000), np.float32)
        out[:, :2] = f.pooled
        out[:, 2:] = f.pooled[:, :1] * np.arange(2, 1000, dtype=np.float32)
        f.pooled = np.array(out) if self.copy_out else out
        return f


def _reference(df: pl.DataFrame) -> ModalityFeatures:
    """The Lending toy's output, computed directly (no store, no lender)."""
    return Lending().fit(df[:8], None).encode(df, None)


@pytest.fixture
def lent(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records the writer's buffers (fresh ones) and the arrays each segment write gets."""
    from survfuse.encoders import store_segments

    seen: dict[str, Any] = {"written": [], "fresh": 0}
    write, take = store_segments._Segment.write, store_segments._Buffers.take

    def spy_write(self: Any, arrays: dict[str, Any], start: int) -> None:
        seen["written"].append({k: a.__array_interface__["data"][0] for k, a in arrays.items()})
        write(self, arrays, start)

    def spy_take(self: Any, nbytes: int) -> Any:
        buf, fresh = take(self, nbytes)
        seen["fresh"] += fresh
        seen.setdefault("buffers", set()).add(id(buf))
        return buf, fresh

    monkeypatch.setattr(store_segments._Segment, "write", spy_write)
    monkeypatch.setattr(store_segments._Buffers, "take", spy_take)
    return seen


@pytest.mark.parametrize("copy_out", [False, True])
def test_pooled_output_is_computed_in_two_reused_buffers_and_written_once(
    tmp_path: Path, copy_out: bool, lent: dict[str, Any]
) -> None:
    df = cohort(n=700, seed=8).sort("subject_id")
    enc = Lending().fit(df[:8], None)
    enc.copy_out = copy_out
    ref = _reference(df)
    store = FeatureStore(tmp_path)
    for order in (df, df.reverse()):  # linked result, then rows copied from the chunks
        out = store.encode(enc, order, None, chunk_size=100, progress=False)
        rows = np.searchsorted(ref.subject_id, order["subject_id"].to_numpy())
        same(out, ref.select(rows))
    assert store.last_run is not None
    assert len(list((store.last_run.directory / "segments").iterdir())) == 1
    # 7 calls, each call's arrays written once (the second encode reused the chunks)
    assert len(lent["written"]) == 7 and all("pooled" in w for w in lent["written"])
    if copy_out:  # the encoder copied out of the lent buffer: free again at once
        assert lent["fresh"] == 1
    else:  # the encoder fills one buffer while the writer writes the other (a second buffer
        # only when the writer is still busy as the next call starts): never more than two
        assert 1 <= lent["fresh"] <= 2
        assert len({w["pooled"] for w in lent["written"]}) == lent["fresh"]


def test_pwrite_pieces_end_on_piece_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from survfuse.encoders import store_segments

    calls: list[tuple[int, int]] = []
    pwrite = os.pwrite

    def spy(fd: int, data: Any, pos: int) -> int:
        calls.append((pos, len(data)))
        return pwrite(fd, data, pos)

    monkeypatch.setattr(store_segments.os, "pwrite", spy)
    rng = np.random.default_rng(0)
    piece = store_segments._PIECE
    data = rng.integers(0, 256, 3 * piece + 123, dtype=np.uint8)
    f = tmp_path / "f.bin"
    f.write_bytes(b"\0" * (5 * piece))
    fd = os.open(f, os.O_RDWR)
    try:
        store_segments._pwrite_all(fd, data.data, 1000)
    finally:
        os.close(fd)
    raw = f.read_bytes()
    assert raw[1000 : 1000 + data.size] == data.tobytes()
    assert raw[:1000] == b"\0" * 1000 and set(raw[1000 + data.size :]) == {0}
    assert calls[0] == (1000, piece - 1000)
    assert all(pos % piece == 0 and n <= piece for pos, n in calls[1:])
    assert sum(n for _, n in calls) == data.size


class FailsAfterLending(Lending):
    """Lending, but call `fail_at` raises after filling its lent output."""

    fail_at = 3

    def encode(self, cohort: pl.DataFrame, source: Any) -> ModalityFeatures:
        f = super().encode(cohort, source)
        if self.calls > self.fail_at:
            raise RuntimeError("simulated crash after the output was filled")
        return f


def test_crash_after_filling_lent_memory_then_resume_gives_the_same_bytes(
    tmp_path: Path, lent: dict[str, Any]
) -> None:
    df = cohort(n=700, seed=10).sort("subject_id")
    ref = _reference(df)
    enc = FailsAfterLending().fit(df[:8], None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        FeatureStore(tmp_path).encode(enc, df, None, chunk_size=100, progress=False)
    assert len(lent["written"]) == 3  # the calls before the crash
    enc.fail_at = 10**9
    store = FeatureStore(tmp_path)
    out = store.encode(enc, df, None, chunk_size=100, progress=False)
    assert store.last_run is not None and store.last_run.cached_chunks == 3
    same(out, ref)
