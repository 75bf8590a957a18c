"""FeatureStore format 2: output written once (segments), format-1 folders, newer ones refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from survfuse.encoders.store import FeatureStore
from survfuse.encoders.store_segments import STORE_FORMAT, _header, load_chunk
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
    encoders): 1,000 float32 per row (4,000 bytes: rows straddle the file's pages)."""

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
def direct_io(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Direct writes from one page on; records each direct write (bytes, file offset, address)."""
    from survfuse.encoders import store_segments

    probe = store_segments._open_direct(Path(__file__))
    if probe is None:
        pytest.skip("no direct I/O on this platform")
    os.close(probe)
    monkeypatch.setattr(store_segments, "_DIRECT_MIN", store_segments._ALIGN)
    write, take = store_segments._Segment._write_direct, store_segments._Buffers.take
    seen: dict[str, Any] = {"writes": [], "fresh": 0, "unspied": write}

    def spy_write(self: Any, name: str, dfd: int, view: memoryview, pos: int) -> None:
        addr = np.frombuffer(view, np.uint8).__array_interface__["data"][0]
        seen["writes"].append((name, len(view), pos, addr))
        write(self, name, dfd, view, pos)
        assert self.direct_fds[name] is not None, "direct write refused (EINVAL)"

    def spy_take(self: Any, nbytes: int) -> Any:
        buf, fresh = take(self, nbytes)
        seen["fresh"] += fresh
        return buf, fresh

    monkeypatch.setattr(store_segments._Segment, "_write_direct", spy_write)
    monkeypatch.setattr(store_segments._Buffers, "take", spy_take)
    return seen


@pytest.mark.parametrize("copy_out", [False, True])
def test_pooled_output_is_written_with_direct_io_from_lent_memory(
    tmp_path: Path, copy_out: bool, direct_io: dict[str, Any]
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
    (seg,) = (store.last_run.directory / "segments").iterdir()
    assert _header(seg / "pooled.npy")[2] == 4096  # the data starts page-aligned
    writes = direct_io["writes"]
    if copy_out:  # the encoder's own array: not lined up with the file, written buffered;
        # the lent buffer it copied from is free again at once: one buffer for all calls
        assert writes == [] and direct_io["fresh"] == 1
        return
    # 7 calls of 100 rows (400,000 bytes: calls start inside a page): every call's whole
    # pages went direct, aligned in memory and file; the encoder's memory was two buffers
    # taking turns
    assert [w[0] for w in writes] == ["pooled"] * 7
    assert all(pos % 4096 == 0 and addr % 4096 == 0 for _, _, pos, addr in writes)
    whole = sum(n for _, n, _, _ in writes)
    assert 700 * 4000 - 7 * 2 * 4096 <= whole <= 700 * 4000
    assert direct_io["fresh"] == 2


def test_without_direct_io_or_when_it_is_refused_the_bytes_are_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct_io: dict[str, Any]
) -> None:
    from survfuse.encoders import store_segments

    df = cohort(n=300, seed=9).sort("subject_id")
    ref = _reference(df)
    enc = Lending().fit(df[:8], None)
    refused: set[int] = set()
    open_direct, pwrite = store_segments._open_direct, os.pwrite

    def flaky_open(path: Path) -> int | None:
        fd = open_direct(path)
        if fd is not None:
            refused.add(fd)
        return fd

    def pwrite_refusing_direct(fd: int, data: Any, pos: int) -> int:
        if fd in refused:  # as a device whose direct I/O needs a larger alignment
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, pos)

    monkeypatch.setattr(store_segments, "_open_direct", flaky_open)
    monkeypatch.setattr(store_segments.os, "pwrite", pwrite_refusing_direct)
    # the fixture's spy asserts that no direct write is refused; here they are
    monkeypatch.setattr(store_segments._Segment, "_write_direct", direct_io["unspied"])
    out = FeatureStore(tmp_path / "refused").encode(enc, df, None, chunk_size=64, progress=False)
    same(out, ref)
    assert refused  # it was tried, refused, and the rows went through the page cache

    monkeypatch.setattr(store_segments, "_open_direct", lambda path: None)
    out = FeatureStore(tmp_path / "none").encode(enc, df, None, chunk_size=64, progress=False)
    same(out, ref)
