"""`FeatureStore`: encode a cohort once, cached on disk, chunked, atomic and resumable.

Layout under `root`::

    fitted/<encoder>-<fitkey>/                 fitted encoder state (fit on the fit cohort)
    <encoder>-<fp>/fingerprint.json            what the fingerprint `fp` was made of
    <encoder>-<fp>/chunks/<chunkkey>/          one saved ModalityFeatures per chunk
    <encoder>-<fp>/results/<cohortkey>/        assembled features in one cohort's row order
                                               (+ manifest.parquet: why rows are not present)

`fp` hashes the encoder (name + config + fitted state + survfuse version) and the source's input
files (path, size, mtime). Chunks hold the cohort's unique keys sorted by (subject_id,
prediction_time), so the same predictions in another order reuse the chunks. A chunk is written
to a temp folder and renamed into place, so a crash (even `kill -9`) leaves only whole chunks;
a rerun skips them and encodes the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

import survfuse
from survfuse.encoders.base import Encoder, cohort_keys, hash_files, hash_keys, hash_parts
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


def _chunk_part(feats: ModalityFeatures, a: int, b: int, offset: int) -> ModalityFeatures:
    """Return rows [a, b) of a multi-chunk encode (rows start at `offset`), as if encoded alone.

    token_codes are cut to the chunk's widest token, the manifest to the chunk's subjects.
    Arrays are views of `feats` (row slices of C-contiguous arrays are saved without a copy).
    """
    lo, hi = a - offset, b - offset
    names = ("subject_id", "prediction_time", "pooled", "present", "tokens", "mask", "token_codes")
    views = {k: getattr(feats, k)[lo:hi] for k in names if getattr(feats, k) is not None}
    part = replace(feats, meta=dict(feats.meta), **views)
    if part.token_codes is not None and part.token_codes.shape[2] > 1:
        width = max(int((part.token_codes >= 0).sum(axis=2).max(initial=0)), 1)
        part.token_codes = np.ascontiguousarray(part.token_codes[:, :, :width])
    if part.meta.get("manifest"):
        sids = set(part.subject_id.tolist())
        part.meta["manifest"] = [m for m in part.meta["manifest"] if m.get("subject_id") in sids]
    return part


def _is_range(a: NDArray[np.int64], start: int) -> bool:
    """Whether `a` is start, start + 1, ..., start + len(a) - 1."""
    return (
        a.size > 0
        and int(a[0]) == start
        and int(a[-1]) == start + a.size - 1
        and (a.size < 2 or bool(np.all(np.diff(a) == 1)))
    )


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
        self._write_fingerprint(enc_dir, encoder, fp, inputs)
        self._remove_stale(chunk_root)

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

        todo = [i for i, d in enumerate(chunk_dirs) if not (d / "meta.json").exists()]
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

            for group in _chunk_groups(job.todo, chunks, batch_rows, source_group):
                a, b = chunks[group[0]][0], chunks[group[-1]][1]
                rows = cohort[first[a:b].tolist()]
                feats = encoder.encode(rows, job.source)
                self._check_chunk(feats, rows, encoder.name)
                for i in group:
                    part = feats if len(group) == 1 else _chunk_part(feats, *chunks[i], a)
                    part.meta.setdefault("encoder", encoder.name)
                    part.save(job.chunk_dirs[i])
                    bar.advance(task, chunks[i][1] - chunks[i][0])

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

    @staticmethod
    def _assemble(
        result_dir: Path,
        chunk_dirs: list[Path],
        chunks: list[tuple[int, int]],
        inverse: NDArray[np.int64],
        sid: NDArray[np.int64],
        pt: NDArray[np.datetime64],
        fp: str,
        name: str,
    ) -> None:
        """Scatter chunk rows into memory-mapped arrays in cohort order, then rename into place."""
        n = len(sid)
        parts = [ModalityFeatures.load(d, mmap=True) for d in chunk_dirs]
        if not parts:
            raise ValueError(f"{name}: the cohort is empty; nothing to encode")
        head = parts[0]
        t_max = max(p.num_tokens for p in parts)
        k_max = max((p.token_codes.shape[2] for p in parts if p.token_codes is not None), default=0)
        result_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = result_dir.parent / f".{result_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            shapes: dict[str, tuple[tuple[int, ...], Any, Any]] = {
                "subject_id": ((n,), np.int64, 0),
                "prediction_time": ((n,), np.int64, 0),
                "pooled": ((n, head.pooled_dim), np.float32, 0),
                "present": ((n,), np.bool_, False),
            }
            if head.mask is not None:
                shapes["mask"] = ((n, t_max), np.bool_, False)
            if head.tokens is not None:
                shapes["tokens"] = ((n, t_max, head.token_dim), np.float32, 0)
            if head.token_codes is not None:
                shapes["token_codes"] = ((n, t_max, k_max), np.int32, -1)
            out = {}
            for key, (shape, dtype, fill) in shapes.items():
                arr = np.lib.format.open_memmap(tmp / f"{key}.npy", "w+", dtype, shape)
                if fill:  # a new file reads as zeros: filling it with 0 would write it twice
                    arr[...] = fill
                out[key] = arr
            out["subject_id"][:] = sid
            out["prediction_time"][:] = pt.astype(np.int64)
            order = np.argsort(inverse, kind="stable")
            starts = np.searchsorted(inverse[order], [a for a, _ in chunks] + [chunks[-1][1]])
            manifest: list[dict[str, Any]] = []
            for c, part in enumerate(parts):
                a = chunks[c][0]
                rows: Any = order[starts[c] : starts[c + 1]]
                src: Any = inverse[rows] - a
                if _is_range(rows, int(rows[0]) if rows.size else 0) and _is_range(src, 0):
                    # cohort rows in chunk order (the usual case): plain slices, no gathers
                    rows, src = slice(int(rows[0]), int(rows[-1]) + 1), slice(None)
                out["pooled"][rows] = part.pooled[src]
                out["present"][rows] = part.present[src]
                t = part.num_tokens
                if part.mask is not None:
                    out["mask"][rows, :t] = part.mask[src]
                if part.tokens is not None:
                    out["tokens"][rows, :t] = part.tokens[src]
                if part.token_codes is not None:
                    k = part.token_codes.shape[2]
                    out["token_codes"][rows, :t, :k] = part.token_codes[src]
                manifest.extend(part.meta.get("manifest", []))
            # no msync (memmap.flush): like the chunks' np.save, the data is in the page cache,
            # which survives a killed process; the rename below is what makes the result whole
            meta = {k: v for k, v in head.meta.items() if k != "manifest"}
            meta.update(fingerprint=fp, encoder=name, manifest=manifest)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            if manifest:  # why rows are not present (e.g. the CT data layer's load failures)
                man = pl.DataFrame(manifest)
                if "prediction_time" in man.columns:
                    man = man.with_columns(
                        pl.col("prediction_time").cast(pl.Utf8).str.to_datetime(time_unit="us")
                    )
                man.write_parquet(tmp / "manifest.parquet")
            del out
            try:
                os.replace(tmp, result_dir)
            except OSError:  # a concurrent run assembled the same result first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
