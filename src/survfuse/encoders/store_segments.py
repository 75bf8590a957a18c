"""The `FeatureStore`'s on-disk format 2: encoder output written once, in segments.

Format 1 saved every chunk as its own `ModalityFeatures` folder (one `.npy` per array) and then
copied the chunks' rows into the assembled result: the output was written twice. Format 2
writes each `encode` call's output once, appended to the `.npy` files of a *segment*::

    <encoder>-<fp>/store_format.json           {"store_format": 2}
    <encoder>-<fp>/segments/<id>/<array>.npy   rows of one or more encode calls, in chunk order
    <encoder>-<fp>/segments/<id>/meta-<r>.json the meta of the call whose rows start at row r
    <encoder>-<fp>/chunks/<chunkkey>.json      a chunk: rows [start, stop) of segment <id>

A segment's `.npy` files are created at the size of the rows the run is about to encode; a run
that ends early (a crash, or a call whose token shape differs and opens a
new segment) leaves rows that were never written, so nothing reads a segment but through chunk
references: a chunk is trusted only once its `<chunkkey>.json` exists, and that is written (to a
temp file renamed into place) after its rows are in the segment, so a crash leaves only whole
chunks. The rows are written by a background thread while the encoder computes the next call's
(at most one call's output waits to be written). The pooled output of an EHR encoder is computed
in anonymous memory the store lends it (`SegmentWriter.lender`: two buffers that take turns), and
written with `pwrite` in 64 kB pieces. When the chunks of one run cover a whole
segment, all of the cohort in cohort order, the assembled result's `.npy` files are hard links
to the segment's: the result is the bytes written once, and `ModalityFeatures.load` reads it as
any saved features.

Format 1 folders (chunks as `ModalityFeatures` folders, as `RayFeatureStore` still writes them)
are read as they are; a folder of a newer format than this code knows is refused.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from survfuse.features import ModalityFeatures

__all__ = [
    "STORE_FORMAT",
    "ChunkRef",
    "SegmentWriter",
    "check_store_format",
    "chunk_done",
    "link_result",
    "load_chunk",
    "read_ref",
    "segment_rows",
    "write_chunk_refs",
]

#: Version of the store's folder layout (1: no `store_format.json`, every chunk a folder of
#: `.npy` files; 2: segments, chunks as references into them).
STORE_FORMAT = 2
_FORMAT_FILE = "store_format.json"
_ARRAYS = ("subject_id", "prediction_time", "pooled", "present", "tokens", "mask", "token_codes")


def check_store_format(enc_dir: Path) -> None:
    """Refuse an encoder folder written by a newer store format; mark an unmarked one.

    Folders without `store_format.json` are format 1 (or new): format 2 reads their chunks
    and results unchanged.
    """
    f = enc_dir / _FORMAT_FILE
    if f.exists():
        found = int(json.loads(f.read_text()).get("store_format", 1))
        if found > STORE_FORMAT:
            raise ValueError(
                f"feature store folder {enc_dir} has store format {found}; this survfuse reads "
                f"formats 1 to {STORE_FORMAT}. Re-encode into a new store folder (or delete "
                "this one), or use the survfuse version that wrote it."
            )
        return
    tmp = enc_dir / f".{_FORMAT_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"store_format": STORE_FORMAT}))
    os.replace(tmp, f)


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape in the header, dtype, byte offset of the data) of a `.npy` file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered segment arrays are not written by survfuse")
        return shape, dtype, f.tell()


#: Bytes per `pwrite` (pieces end on multiples of it in the file). Why 64 kB: the page cache
#: takes folios of about the size of a write, and on this VM large ones are slow to fill (likely
#: memory the balloon gave back to the host). 756 MB filled in a reused buffer and written in
#: 64 kB pieces cost 0.45-0.49 CPU s, in one piece per 252 MB 1.24-2.10 s, filled in anonymous
#: memory and not written 0.31-0.33 s (`bench_ehr_encode.py --write-methods`; docs/benchmarks.md,
#: issue 25 session 7).
_PIECE = 1 << 16


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    """Write `view` at byte `pos` of `fd` in pieces that end on multiples of `_PIECE`."""
    done = 0
    while done < len(view):
        end = min(len(view), (pos + done) // _PIECE * _PIECE + _PIECE - pos)
        done += os.pwrite(fd, view[done:end], pos + done)


def _rows(path: Path, start: int, stop: int) -> NDArray[Any]:
    """Rows [start, stop) of a segment's `.npy` file, memory-mapped read-only."""
    shape, dtype, offset = _header(path)
    row = int(dtype.itemsize * np.prod(shape[1:], dtype=np.int64))
    need = offset + stop * row
    if os.path.getsize(path) < need:
        raise ValueError(f"{path}: segment shorter than its chunk reference (rows to {stop})")
    return np.memmap(
        path, dtype, "r", offset=offset + start * row, shape=(stop - start, *shape[1:])
    )


@dataclass(frozen=True)
class ChunkRef:
    """A format-2 chunk: rows [start, stop) of segment `segment`, as saved in its `.json`."""

    segment: str
    start: int
    stop: int
    codes_width: int  # K of this chunk's token_codes (cut to its widest token); 0 without codes
    meta: dict[str, Any] = field(default_factory=dict)


def _ref_file(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.json")


def chunk_done(folder: Path) -> bool:
    """Whether chunk `folder` is whole (format 1: `folder/meta.json`; 2: `folder.json`)."""
    return _ref_file(folder).exists() or (folder / "meta.json").exists()


def read_ref(folder: Path) -> ChunkRef | None:
    """Return the chunk reference of `folder`, or None for a format-1 chunk (features folder)."""
    f = _ref_file(folder)
    if not f.exists():
        return None
    d = json.loads(f.read_text())
    if int(d.get("store_format", 0)) > STORE_FORMAT:
        raise ValueError(
            f"chunk {folder} has store format {d['store_format']}; this survfuse reads formats "
            f"1 to {STORE_FORMAT}: re-encode into a new store folder"
        )
    if "meta_file" in d:  # the call's meta, saved once beside its rows
        meta = dict(
            _call_meta(str(folder.parent.parent / "segments" / d["segment"] / d["meta_file"]))
        )
        if d["manifest"] is not None:
            meta["manifest"] = d["manifest"]
    else:
        meta = d["meta"]
    return ChunkRef(d["segment"], int(d["start"]), int(d["stop"]), int(d["codes_width"]), meta)


@functools.lru_cache(maxsize=16)
def _call_meta(path: str) -> dict[str, Any]:
    # Why cached: the chunks of one call share it (written once, never rewritten)
    out: dict[str, Any] = json.loads(Path(path).read_text())
    return out


def write_chunk_refs(chunk_dirs: list[Path], refs: list[ChunkRef]) -> None:
    """Save the references of one encode call's chunks (only after their rows are written).

    The call's meta (without the per-chunk manifest) is saved once, in its segment, as
    `meta-<first row>.json`; each reference is written atomically (a temp file renamed).
    """
    seg = chunk_dirs[0].parent.parent / "segments" / refs[0].segment
    name = f"meta-{refs[0].start}.json"
    shared = {k: v for k, v in refs[0].meta.items() if k != "manifest"}
    (seg / name).write_text(json.dumps(shared, sort_keys=True, separators=(",", ":"), default=str))
    for folder, ref in zip(chunk_dirs, refs, strict=True):
        body = {
            "store_format": STORE_FORMAT,
            "segment": ref.segment,
            "start": ref.start,
            "stop": ref.stop,
            "codes_width": ref.codes_width,
            "meta_file": name,
            "manifest": ref.meta.get("manifest"),
        }
        f = _ref_file(folder)
        tmp = f.with_name(f".{f.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str))
        os.replace(tmp, f)


def load_chunk(folder: Path) -> ModalityFeatures:
    """Load a chunk of either format, memory-mapped (a format-2 chunk: its segment rows)."""
    ref = read_ref(folder)
    if ref is None:
        return ModalityFeatures.load(folder, mmap=True)
    seg = folder.parent.parent / "segments" / ref.segment
    arrays: dict[str, Any] = {}
    for name in _ARRAYS:
        f = seg / f"{name}.npy"
        arrays[name] = _rows(f, ref.start, ref.stop) if f.exists() else None
    arrays["prediction_time"] = np.asarray(arrays["prediction_time"]).view("datetime64[us]")
    if arrays["token_codes"] is not None and ref.codes_width < arrays["token_codes"].shape[2]:
        arrays["token_codes"] = arrays["token_codes"][:, :, : ref.codes_width]
    return ModalityFeatures(meta=dict(ref.meta), **arrays)


class _Segment:
    """One segment being written: `.npy` files of `capacity` rows, written with `pwrite`.

    Files are added per array (`add`), allocated at full size (`posix_fallocate`, where the file
    system has it).

    Why not a memory map of the file (as session 6 wrote the pooled output): 756 MB filled
    through one cost 1.13-1.81 CPU s, against 0.45-0.49 s filled in reused anonymous memory and
    written in 64 kB `pwrite`s (`_PIECE`); with `MADV_RANDOM` on the map 0.50-0.55 s. Direct I/O
    (`O_DIRECT`) wrote for 0.27-0.32 s, but the first read of the result then came from the disk:
    0.89-1.79 CPU s against 0.64-0.67 from the page cache.
    """

    def __init__(self, root: Path, capacity: int) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.folder = root / self.id
        self.folder.mkdir(parents=True)
        self.capacity, self.rows = capacity, 0
        self.layout: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, trailing)
        self.fds: dict[str, tuple[int, int, int]] = {}  # name -> (fd, data offset, row bytes)

    def add(self, name: str, dtype: np.dtype[Any], trailing: tuple[int, ...]) -> None:
        """Create the file of array `name`."""
        shape = (self.capacity, *trailing)
        row = dtype.itemsize * int(np.prod(trailing, dtype=np.int64))
        fd = os.open(self.folder / f"{name}.npy", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(os.dup(fd), "wb") as fh:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(fh, {**header, "shape": shape})
            offset = fh.tell()
        size = offset + row * self.capacity
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:  # not supported here: the file grows as it is written
            pass
        os.ftruncate(fd, size)
        self.fds[name] = (fd, offset, row)
        self.layout[name] = (dtype.str, trailing)

    def fits(self, layout: dict[str, tuple[str, tuple[int, ...]]], n: int) -> bool:
        """Whether a call with these arrays (name -> (dtype, trailing shape)) can follow."""
        if self.rows + n > self.capacity:
            return False
        return self.layout == layout

    def write(self, arrays: dict[str, NDArray[Any]], start: int) -> None:
        """Write `arrays` as rows [start, start + len) (`pwrite` releases the GIL)."""
        for name, a in arrays.items():
            fd, offset, row = self.fds[name]
            view = np.ascontiguousarray(a).reshape(-1).view(np.uint8).data
            _pwrite_all(fd, view, offset + start * row)

    def close(self) -> None:
        # no fsync: as for np.save, the pages are in the page cache, which a killed process
        # leaves behind; a chunk is trusted from its reference, written after its rows
        for fd, _, _ in self.fds.values():
            os.close(fd)
        self.fds = {}
        if self.rows == 0:  # nothing was written to it: no chunk refers to it
            shutil.rmtree(self.folder, ignore_errors=True)


class _Buffers:
    """Anonymous memory the writer lends an encoder's output (two buffers, reused).

    Why reused: on this VM, first-touching memory costs more than re-zeroing memory already
    touched; a run's calls take turns with two buffers (the encoder fills one while the writer
    writes the other), where a direct encode touches all of its output once.
    """

    def __init__(self) -> None:
        self.free: list[mmap.mmap] = []
        self._lock = threading.Lock()  # given back by the writer thread

    def take(self, nbytes: int) -> tuple[mmap.mmap, bool]:
        """Return a buffer of at least `nbytes` and whether it is fresh (reads as zeros)."""
        with self._lock:
            for i, buf in enumerate(self.free):
                if len(buf) >= nbytes:
                    return self.free.pop(i), False
            if len(self.free) >= 2:  # too small to be of use: let it go
                self.free.pop(0)
        size = max(nbytes, 1)
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        return (mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)), True

    def give(self, buf: mmap.mmap) -> None:
        """Return a buffer nothing reads or writes any more."""
        with self._lock:
            self.free.append(buf)


def _arrays(feats: ModalityFeatures) -> dict[str, NDArray[Any]]:
    out: dict[str, NDArray[Any]] = {}
    for name in _ARRAYS:
        a = getattr(feats, name)
        if a is None:
            continue
        if name == "prediction_time":
            a = np.ascontiguousarray(a.astype("datetime64[us]", copy=False)).view(np.int64)
        out[name] = a
    return out


class SegmentWriter:
    """Append encode calls' outputs to segments of `root` (`segments/` of an encoder folder).

    `total_rows`: rows the run will append in all (the first segment's files are that long). A
    call whose arrays have another trailing shape (e.g. another token count) opens a new
    segment. Writes run on one background thread, at most one call behind the caller.
    `lender(n)` lends the next call's pooled output memory of the writer's (reused from call to
    call): an encoder that allocates it with `ehr_vocab.output_array` computes it there.
    """

    def __init__(self, root: Path, total_rows: int) -> None:
        self.root, self.remaining = root, int(total_rows)
        self.current: _Segment | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="survfuse-store")
        self._pending: Future[None] | None = None
        self._buffers = _Buffers()
        self._lent: tuple[NDArray[Any], mmap.mmap] | None = None  # (view, its buffer)

    def lender(self, n: int) -> Callable[[tuple[int, ...], Any, Any], NDArray[Any] | None]:
        """Return an `ehr_vocab.OUTPUT_LENDER` for a call of `n` rows.

        It lends once: the first zero-filled 2-d float32 array of `n` rows (the pooled output).
        """
        self._release_lent()

        def lend(shape: tuple[int, ...], dtype: Any, fill: Any) -> NDArray[Any] | None:
            dt = np.dtype(dtype)
            if self._lent is not None or fill != 0 or dt != np.float32 or len(shape) != 2:
                return None
            if shape[0] != n or n == 0 or shape[1] == 0:
                return None
            count = int(np.prod(shape, dtype=np.int64))
            buf, fresh = self._buffers.take(count * dt.itemsize)
            view = np.frombuffer(buf, dt, count).reshape(shape)
            if not fresh:
                view[...] = 0  # memory already touched: cheaper to zero than new pages
            self._lent = (view, buf)
            return view

        return lend

    def append(self, feats: ModalityFeatures, then: Callable[[str, int], None]) -> None:
        """Write `feats`' rows once, then call `then(segment id, first row there)`.

        Returns once the previous call's rows are written (raising what that write raised);
        this call's are written in the background. The lent buffer (if any of `feats` lies in
        it) is lent again only after this write.
        """
        self._drain()
        lent, self._lent = self._lent, None
        arrays, n = _arrays(feats), len(feats)
        layout = {k: (a.dtype.str, a.shape[1:]) for k, a in arrays.items()}
        seg = self.current
        if seg is None or not seg.fits(layout, n):
            self._close_segment()
            seg = self.current = _Segment(self.root, max(self.remaining, n))
        for k, a in arrays.items():
            if k not in seg.layout:
                seg.add(k, a.dtype, a.shape[1:])
        start = seg.rows
        seg.rows += n
        self.remaining -= n
        buf = None
        if lent is not None:
            if any(np.may_share_memory(a, lent[0]) for a in arrays.values()):
                buf = lent[1]  # read by this write: lent again after it
            else:
                self._buffers.give(lent[1])
        self._pending = self._pool.submit(self._write, seg, arrays, start, then, buf)

    def _write(
        self,
        seg: _Segment,
        arrays: dict[str, NDArray[Any]],
        start: int,
        then: Callable[[str, int], None],
        buf: mmap.mmap | None,
    ) -> None:
        seg.write(arrays, start)
        then(seg.id, start)
        if buf is not None:
            self._buffers.give(buf)

    def _release_lent(self) -> None:
        """Take back a lent buffer whose call never reached `append` (e.g. it raised)."""
        lent, self._lent = self._lent, None
        if lent is not None:
            self._buffers.give(lent[1])

    def _drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _close_segment(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def close(self, *, check: bool = True) -> None:
        """Wait for the last write (raise its error when `check`) and close the files."""
        try:
            if check:
                self._drain()
            elif self._pending is not None:
                self._pending.exception()  # wait; the caller is raising its own error
        finally:
            self._pool.shutdown(wait=True)
            self._close_segment()
            self._lent, self._buffers = None, _Buffers()


def link_result(segment: Path, tmp: Path) -> bool:
    """Hard-link a whole segment's `.npy` files into the result folder `tmp`.

    False (and nothing linked) where the file system has no hard links: the caller copies.
    """
    try:
        for f in segment.glob("*.npy"):
            os.link(f, tmp / f.name)
    except OSError:
        for f in tmp.glob("*.npy"):
            f.unlink()
        return False
    return True


def segment_rows(segment: Path) -> tuple[int, int]:
    """(rows its header announces, K of its token_codes or 0) of a segment folder.

    Rows are -1 when a file is not the size its header says (e.g. cut short).
    """
    rows, width = -1, 0
    for f in sorted(segment.glob("*.npy")):
        shape, dtype, offset = _header(f)
        size = offset + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if os.path.getsize(f) != size or (rows >= 0 and shape[0] != rows):
            return -1, 0
        rows = int(shape[0])
        if f.name == "token_codes.npy":
            width = int(shape[2])
    return rows, width
