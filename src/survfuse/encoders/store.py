"""`FeatureStore`: encode a cohort once, cached on disk, chunked, atomic and resumable.

Layout under `root`::

    fitted/<encoder>-<fitkey>/                 fitted encoder state (fit on the fit cohort)
    <encoder>-<fp>/fingerprint.json            what the fingerprint `fp` was made of
    <encoder>-<fp>/store_format.json           the folder's store format (2; see below)
    <encoder>-<fp>/segments/<id>/              encoder output, written once (store_segments)
    <encoder>-<fp>/chunks/<chunkkey>/          one chunk: ref.json, rows of a segment (format 2),
                                               or a saved ModalityFeatures (format 1, Ray)
    <encoder>-<fp>/results/<cohortkey>/        assembled features in one cohort's row order
                                               (+ manifest.parquet: why rows are not present)

`fp` hashes the encoder (name + config + fitted state + survfuse version) and the source's input
files (path, size, mtime). Chunks hold the cohort's unique keys sorted by (subject_id,
prediction_time), so the same predictions in another order reuse the chunks. A chunk is written
to a temp folder and renamed into place, so a crash (even `kill -9`) leaves only whole chunks;
a rerun skips them and encodes the rest.

Each encode call's output is written once, appended to a segment (`store_segments`); a chunk
is a reference to its rows there. When one run encoded the whole cohort in cohort order, the
result's files are hard links to the segment's (no second copy); otherwise (cached chunks
reused in another order, a resumed run) the chunk rows are copied into the result.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

import survfuse
from survfuse.encoders.base import Encoder, cohort_keys, hash_files, hash_keys, hash_parts
from survfuse.encoders.ehr_vocab import OUTPUT_LENDER
from survfuse.encoders.store_copy import copy_rows, is_range
from survfuse.encoders.store_segments import (
    ChunkRef,
    SegmentWriter,
    check_store_format,
    chunk_done,
    link_result,
    read_ref,
    segment_rows,
    write_chunk_refs,
)
from survfuse.features import ModalityFeatures
from survfuse.progress import progress_bar

__all__ = ["ChunkJob", "FeatureStore", "StoreRun"]

_STALE_TMP_S = 6 * 3600  # temp folders older than this are leftovers of a killed run


@dataclass
class StoreRun:
    """What the last `FeatureStore.encode` did (for logs and tests)."""

    fingerprint: str
    directory: Path
    n_chunks: int
    encoded_chunks: int
    cached_chunks: int
    result_cached: bool
    fitted: str  # "fit", "cached" or "not-learning" / "pre-fitted"


@dataclass(frozen=True)
class ChunkJob:
    """The chunks an `encode` call still has to encode.

    Chunk i (each i of `todo`) is rows `first[a:b]` of `cohort`, (a, b) = `chunks[i]`, saved to
    `chunk_dirs[i]`.
    """

    encoder: Encoder
    cohort: pl.DataFrame
    source: Any
    first: NDArray[np.int64]
    chunks: list[tuple[int, int]]
    chunk_dirs: list[Path]
    todo: list[int]
    progress: bool
    source_group: tuple[int, ...] = ()  # per chunk: the source shard it reads (see encode)

    @property
    def n_rows(self) -> int:
        """Rows of the chunks to encode."""
        return sum(self.chunks[i][1] - self.chunks[i][0] for i in self.todo)


def _source_files_hash(source: Any) -> str:
    files = getattr(source, "input_files", None)
    if files is None:
        return "no-input-files"
    return hash_files(files())


def _source_groups(source: Any, sid: NDArray[np.int64]) -> NDArray[np.int64]:
    """Return, per cohort row, the source shard its subject's events live in.

    0 for every row when the source has no `subject_shards`; subjects in several shards, or in
    none, come after the others.

    Why: an encoder call re-reads every shard its subjects live in; chunks ordered by shard
    let one call read one shard, as a direct encode of the whole cohort does.
    """
    table = getattr(source, "subject_shards", None)
    if table is None:
        return np.zeros(len(sid), np.int64)
    frame = table()
    ids = frame["subject_id"].to_numpy().astype(np.int64)
    shard = frame["shard"].to_numpy().astype(np.int64)
    uniq, first, count = np.unique(ids, return_index=True, return_counts=True)
    own = np.where(count == 1, shard[first], shard.max(initial=0) + 1)
    pos = np.minimum(np.searchsorted(uniq, sid), max(len(uniq) - 1, 0))
    found = uniq[pos] == sid if len(uniq) else np.zeros(len(sid), bool)
    return np.where(found, own[pos] if len(uniq) else 0, shard.max(initial=0) + 2)


def _unique_sorted(
    sid: NDArray[np.int64], pt: NDArray[np.int64], group: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Return (first row of each unique key, inverse: row -> unique position).

    The unique keys (group, subject_id, prediction_time) come in sorted order. `group` must be a
    function of the subject.
    """
    order = np.lexsort((pt, sid, group))
    s, t = sid[order], pt[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1])
    first = order[new]
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return first, inverse


def _chunk_bounds(group: NDArray[np.int64], chunk_size: int) -> list[tuple[int, int]]:
    """Chunks of at most `chunk_size` consecutive keys that never span two source groups."""
    cuts = [0, *(np.flatnonzero(group[1:] != group[:-1]) + 1).tolist(), len(group)]
    chunks: list[tuple[int, int]] = []
    for lo, hi in pairwise(cuts):
        chunks.extend((a, min(a + chunk_size, hi)) for a in range(lo, hi, chunk_size))
    return chunks


def _chunk_groups(
    todo: list[int], chunks: list[tuple[int, int]], batch_rows: int, source_group: list[int]
) -> list[list[int]]:
    """Return runs of consecutive chunks of one source group to encode in one `encode` call.

    Each run has at most `batch_rows` rows (one chunk per call when the encoder sets no
    `store_batch_rows`).
    """
    groups: list[list[int]] = []
    for i in todo:
        g = groups[-1] if groups else None
        if (
            g is not None
            and g[-1] == i - 1
            and source_group[i] == source_group[g[0]]
            and chunks[i][1] - chunks[g[0]][0] <= batch_rows
        ):
            g.append(i)
        else:
            groups.append([i])
    return groups


def _chunk_ref(
    feats: ModalityFeatures, a: int, b: int, offset: int, alone: bool, at: tuple[str, int]
) -> ChunkRef:
    """Return the reference of rows [a, b) of an encode call (rows start at `offset`).

    As if the chunk was encoded alone: unless it is the call's only chunk (`alone`), its
    token_codes are cut to its widest token and the manifest to its subjects. `at`: (segment,
    row of the call's first row there).
    """
    lo, hi = a - offset, b - offset
    meta = dict(feats.meta)
    codes = feats.token_codes
    width = 0 if codes is None else int(codes.shape[2])
    if not alone and codes is not None and width > 1:
        width = max(int((codes[lo:hi] >= 0).sum(axis=2).max(initial=0)), 1)
    if not alone and meta.get("manifest"):
        sids = set(feats.subject_id[lo:hi].tolist())
        meta["manifest"] = [m for m in meta["manifest"] if m.get("subject_id") in sids]
    segment, start = at
    return ChunkRef(segment, start + lo, start + hi, width, meta)


class FeatureStore:
    """Disk cache of encoder outputs; see the module docstring for the layout.

    An encoder with a `store_batch_rows` attribute (the EHR encoders: each `encode` call
    re-reads the MEDS shards its subjects live in) encodes runs of consecutive chunks in one
    call of up to that many rows; each chunk is still saved on its own, atomically.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.last_run: StoreRun | None = None
        self._refs: dict[Path, ChunkRef] = {}  # chunk refs written by this store object

    # ------------------------------------------------------------------ fitting
    def _fit(
        self, encoder: Encoder, fit_cohort: pl.DataFrame | None, source: Any, inputs: str
    ) -> str:
        if not encoder.learns:
            return "not-learning"
        if fit_cohort is None:
            encoder.check_fitted()
            return "pre-fitted"
        sid, pt = cohort_keys(fit_cohort)
        fit_key = hash_parts(
            "fit",
            encoder.name,
            json.dumps(encoder.config(), sort_keys=True, default=str),
            hash_keys(sid, pt),
            inputs,
            survfuse.__version__,
        )
        d = self.root / "fitted" / f"{encoder.name}-{fit_key[:16]}"
        if (d / "encoder.json").exists():
            with np.load(d / "state.npz") as z:
                encoder.set_state({k: z[k] for k in z.files})
            encoder.fitted = True
            return "cached"
        encoder.fit(fit_cohort, source)
        tmp = d.parent / f".{d.name}.tmp-{uuid.uuid4().hex[:8]}"
        encoder.save(tmp)
        try:
            os.replace(tmp, d)
        except OSError:  # another process saved the same fit first
            shutil.rmtree(tmp, ignore_errors=True)
        return "fit"

    # ------------------------------------------------------------------ public API
    def directory(self, encoder: Encoder, source: Any) -> Path:
        """Return the cache folder of a (fitted) encoder on a source."""
        fp = hash_parts(encoder.fingerprint(), _source_files_hash(source))
        return self.root / f"{encoder.name}-{fp[:16]}"

    def encode(
        self,
        encoder: Encoder,
        cohort: pl.DataFrame,
        source: Any,
        *,
        fit_cohort: pl.DataFrame | None = None,
        chunk_size: int = 256,
        progress: bool = True,
    ) -> ModalityFeatures:
        """Encode `cohort` (fitting on `fit_cohort` first when the encoder learns).

        Returns memory-mapped features with rows in `cohort`'s order. Cached chunks are not
        re-encoded; an interrupted run resumes from the chunks already written.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        inputs = _source_files_hash(source)
        fitted = self._fit(encoder, fit_cohort, source, inputs)
        fp = hash_parts(encoder.fingerprint(), inputs)
        enc_dir = self.root / f"{encoder.name}-{fp[:16]}"
        chunk_root = enc_dir / "chunks"
        chunk_root.mkdir(parents=True, exist_ok=True)
        check_store_format(enc_dir)
        self._write_fingerprint(enc_dir, encoder, fp, inputs)
        self._remove_stale(chunk_root)

        self._refs = {}
        sid, pt = cohort_keys(cohort)
        pt_i = pt.astype(np.int64)
        group = _source_groups(source, sid)
        first, inverse = _unique_sorted(sid, pt_i, group)
        chunks = _chunk_bounds(group[first], chunk_size)
        chunk_dirs = [
            chunk_root / hash_keys(sid[first[a:b]], pt[first[a:b]])[:20] for a, b in chunks
        ]

        result_dir = enc_dir / "results" / hash_keys(sid, pt)[:20]
        if (result_dir / "meta.json").exists():
            self.last_run = StoreRun(fp, enc_dir, len(chunks), 0, len(chunks), True, fitted)
            return ModalityFeatures.load(result_dir, mmap=True)

        todo = [i for i, d in enumerate(chunk_dirs) if not chunk_done(d)]
        if todo:
            job = ChunkJob(encoder, cohort, source, first, chunks, chunk_dirs, todo, progress)
            job = replace(job, source_group=tuple(int(group[first[a]]) for a, _ in chunks))
            self._encode_chunks(job)
        self.last_run = StoreRun(
            fp, enc_dir, len(chunks), len(todo), len(chunks) - len(todo), False, fitted
        )
        self._assemble(result_dir, chunk_dirs, chunks, inverse, sid, pt, fp, encoder.name)
        return ModalityFeatures.load(result_dir, mmap=True)

    # ------------------------------------------------------------------ internals
    def _write_fingerprint(self, enc_dir: Path, encoder: Encoder, fp: str, inputs: str) -> None:
        f = enc_dir / "fingerprint.json"
        if f.exists():
            return
        info = {
            "fingerprint": fp,
            "encoder": encoder.name,
            "config": encoder.config(),
            "encoder_fingerprint": encoder.fingerprint(),
            "inputs": inputs,
            "survfuse_version": survfuse.__version__,
        }
        tmp = enc_dir / f".fingerprint.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        os.replace(tmp, f)

    @staticmethod
    def _remove_stale(folder: Path) -> None:
        # Why: a kill -9 during a chunk write leaves a temp folder; never touch young ones
        # (another process may be writing them right now).
        now = time.time()
        for p in folder.glob(".*.tmp-*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                continue

    def _encode_chunks(self, job: ChunkJob) -> None:
        encoder, cohort, first, chunks = job.encoder, job.cohort, job.first, job.chunks
        title = f"[bold]{encoder.name}[/bold] encoding"
        with progress_bar(title, enabled=job.progress) as bar:
            task = bar.add_task("encode", total=job.n_rows)
            batch_rows = int(getattr(encoder, "store_batch_rows", 0))
            source_group = list(job.source_group) or [0] * len(chunks)

            writer = SegmentWriter(job.chunk_dirs[0].parent.parent / "segments", job.n_rows)
            try:
                for group in _chunk_groups(job.todo, chunks, batch_rows, source_group):
                    a, b = chunks[group[0]][0], chunks[group[-1]][1]
                    rows = cohort[first[a:b].tolist()]
                    # an EHR encoder's pooled output is computed in memory the writer lends
                    lending = OUTPUT_LENDER.set(writer.lender(b - a))
                    try:
                        feats = encoder.encode(rows, job.source)
                    finally:
                        OUTPUT_LENDER.reset(lending)
                    self._check_chunk(feats, rows, encoder.name)
                    feats.meta.setdefault("encoder", encoder.name)
                    # the output's only write; each chunk is trusted once its rows are written
                    writer.append(feats, partial(self._save_refs, feats, group, job, a))
                    del feats, rows  # the writer holds the output until it is written
                    bar.advance(task, b - a)
            except BaseException:
                writer.close(check=False)
                raise
            writer.close()

    def _save_refs(
        self, feats: ModalityFeatures, group: list[int], job: ChunkJob, a: int, seg: str, at: int
    ) -> None:
        refs = [_chunk_ref(feats, *job.chunks[i], a, len(group) == 1, (seg, at)) for i in group]
        write_chunk_refs([job.chunk_dirs[i] for i in group], refs)
        self._refs.update(zip([job.chunk_dirs[i] for i in group], refs, strict=True))

    @staticmethod
    def _check_chunk(feats: ModalityFeatures, rows: pl.DataFrame, name: str) -> None:
        sid, pt = cohort_keys(rows)
        if len(feats) != len(sid):
            raise ValueError(f"encoder {name!r} returned {len(feats)} rows for {len(sid)}")
        bad = np.flatnonzero((feats.subject_id != sid) | (feats.prediction_time != pt))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"encoder {name!r} returned rows out of order: row {i} is subject "
                f"{int(feats.subject_id[i])}, expected {int(sid[i])}"
            )

    def _linkable(
        self, chunk_dirs: list[Path], inverse: NDArray[np.int64], n: int
    ) -> tuple[Path, list[ChunkRef]] | None:
        """Return the segment that is the result, with the chunk refs, or None (copy the rows).

        A segment is the result when the chunks are consecutive rows of one segment that holds exactly the
        cohort's rows, in cohort order, with each chunk as wide as the segment's token_codes.
        """
        if not is_range(inverse, 0):
            return None
        refs = [self._refs.get(d) or read_ref(d) for d in chunk_dirs]
        if not refs or any(r is None for r in refs):
            return None
        whole = [r for r in refs if r is not None]
        seg = chunk_dirs[0].parent.parent / "segments" / whole[0].segment
        if any(r.segment != whole[0].segment for r in whole) or whole[0].start != 0:
            return None
        if any(x.stop != y.start for x, y in pairwise(whole)) or whole[-1].stop != n:
            return None
        rows, width = segment_rows(seg)
        if rows != n or (width and max(r.codes_width for r in whole) != width):
            return None
        return seg, whole

    def _assemble(
        self,
        result_dir: Path,
        chunk_dirs: list[Path],
        chunks: list[tuple[int, int]],
        inverse: NDArray[np.int64],
        sid: NDArray[np.int64],
        pt: NDArray[np.datetime64],
        fp: str,
        name: str,
    ) -> None:
        """Link (or copy) chunk rows into arrays in cohort order, then rename into place."""
        if not chunk_dirs:
            raise ValueError(f"{name}: the cohort is empty; nothing to encode")
        result_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = result_dir.parent / f".{result_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            linkable = self._linkable(chunk_dirs, inverse, len(sid))
            if linkable is not None and link_result(linkable[0], tmp):
                metas = [r.meta for r in linkable[1]]
            else:
                metas = copy_rows(tmp, chunk_dirs, chunks, inverse, sid, pt)
            manifest: list[dict[str, Any]] = []
            for m in metas:
                manifest.extend(m.get("manifest", []))
            meta = {k: v for k, v in metas[0].items() if k != "manifest"}
            meta.update(fingerprint=fp, encoder=name, manifest=manifest)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            if manifest:  # why rows are not present (e.g. the CT data layer's load failures)
                man = pl.DataFrame(manifest)
                if "prediction_time" in man.columns:
                    man = man.with_columns(
                        pl.col("prediction_time").cast(pl.Utf8).str.to_datetime(time_unit="us")
                    )
                man.write_parquet(tmp / "manifest.parquet")
            try:
                os.replace(tmp, result_dir)
            except OSError:  # a concurrent run assembled the same result first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
