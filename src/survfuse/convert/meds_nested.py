"""Nested MEDS (one row per patient) -> current flat MEDS, streamed batch by batch with pyarrow.

Input layouts, detected per shard from its parquet schema:

- ``nested-0.1``: MEDS 0.1 (`meds` 0.1.x `patient_schema`, used by femr and
  som-shahlab/tte-pretraining): `patient_id` int64, `static_measurements` list<measurement>,
  `events` list<struct<time timestamp[us], measurements list<struct<code, text_value,
  numeric_value float32, datetime_value, metadata>>>>;
- ``nested-0.2``: MEDS 0.2 (`patient_id`, `events` list<struct<time, code, numeric_value, ...>>,
  static events with a null time);
- ``flat``: already one row per measurement (`subject_id` or MEDS 0.3's `patient_id`, `time`,
  `code`, `numeric_value`), rewritten in the current schema.

Output: shards with exactly `subject_id` int64, `time` timestamp[us] (null = static), `code`
string, `numeric_value` float32 (MEDS 0.4), one output shard per input shard, rows in the input's
patient order (static rows first within a patient). `text_value`, `datetime_value` and
`metadata` are not carried (survfuse does not read them). NaN values become null (counted).

Memory: each input row group is read in batches of patients sized from the parquet metadata to
about `batch_rows` measurements, so peak memory is bounded by one batch, not by the shard or the
dataset. Codes are read as dictionaries (no string hashing) and written as dictionary pages.

While streaming, death events (codes in `death_codes`; a code ending in `/` matches every code
with that prefix) and each subject's last timed event are collected for outcome derivation.
A null or unparsable event time, a time outside [1800, 2200), a null code or a null patient id is
a `ConversionError` naming the shard, the patient row and the column.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

from survfuse.convert.tables import ConversionError, try_parse_datetime
from survfuse.convert.writer import BackgroundWriter

__all__ = [
    "DEFAULT_DEATH_CODES",
    "FLAT_SCHEMA",
    "FlattenResult",
    "detect_layout",
    "flatten_meds",
    "meds_shards",
]

#: Death codes: current MEDS (`meds.death_code`), MEDS 0.1 (`meds` 0.1 `death_code`,
#: SNOMED "Death"), and the OMOP death concept tte-pretraining's labeler uses
#: (src/labeling/generate_tte_labels.py `get_death_concepts`).
DEFAULT_DEATH_CODES = ("MEDS_DEATH", "SNOMED/419620001", "Condition Type/OMOP4822053")

FLAT_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.timestamp("us")),
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
    ]
)
_MIN_US = int((datetime(1800, 1, 1) - datetime(1970, 1, 1)).total_seconds() * 1_000_000)
_MAX_US = int((datetime(2200, 1, 1) - datetime(1970, 1, 1)).total_seconds() * 1_000_000)
_NONE = np.iinfo(np.int64).min


@dataclass(frozen=True)
class _Layout:
    path: Path
    kind: str  # nested-0.1 | nested-0.2 | flat
    id_column: str
    columns: tuple[str, ...]  # the parquet leaf paths read (unused fields are never decoded)
    code_path: str  # leaf path of the measurement code (read as a dictionary)
    has_static: bool
    has_numeric: bool


@dataclass
class FlattenResult:
    """What `flatten_meds` read and wrote, plus the per-subject facts outcomes need."""

    shards: list[dict[str, Any]]
    deaths: pl.DataFrame  # subject_id Int64, time Datetime(us): every timed death event
    last_event: pl.DataFrame  # subject_id Int64, last_time Datetime(us): last timed event
    codes: list[str]
    counts: dict[str, int] = field(default_factory=dict)


def meds_shards(root: str | Path) -> list[Path]:
    """List the parquet shards of a MEDS root: `data/**/*.parquet`, else `**/*.parquet`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MEDS folder not found: {root}")
    base = root / "data" if (root / "data").is_dir() else root
    files = sorted(p for p in base.rglob("*.parquet") if p.is_file())
    if not files:
        raise ConversionError(f"MEDS folder {root}: no parquet shards under {base}")
    return files


def _leaf(leaves: list[str], *parts: str) -> str | None:
    """Return the leaf path `a.<list>.b...` whatever the writer called list elements."""
    for elem in ("list.element", "list.item", "bag.array", "array"):
        path = f".{elem}.".join(parts)
        if path in leaves:
            return path
    return None


def detect_layout(path: str | Path) -> _Layout:
    """Which MEDS layout a shard has (from its parquet footer)."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
        leaves = [c.path for c in pq.ParquetFile(path).schema]
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ConversionError(f"MEDS shard {path} is not a readable parquet file: {exc}") from exc
    names = schema.names
    id_col = next((c for c in ("subject_id", "patient_id") if c in names), None)
    if id_col is None:
        raise ConversionError(
            f"MEDS shard {path}: no 'patient_id' or 'subject_id' column (columns: {names})"
        )
    if "events" not in names:
        for col in ("time", "code"):
            if col not in names:
                raise ConversionError(
                    f"MEDS shard {path}: neither nested ('events') nor flat (missing {col!r}); "
                    f"columns: {names}"
                )
        cols = [id_col, "time", "code"] + (["numeric_value"] if "numeric_value" in names else [])
        return _Layout(path, "flat", id_col, tuple(cols), "code", False, len(cols) == 4)
    ev = schema.field("events").type
    if not (pa.types.is_list(ev) or pa.types.is_large_list(ev)) or not pa.types.is_struct(
        ev.value_type
    ):
        raise ConversionError(f"MEDS shard {path}: column 'events' must be a list of structs")
    time = _leaf(leaves, "events", "time")
    if time is None:
        raise ConversionError(f"MEDS shard {path}: column 'events' has no 'time' field")
    fields = [f.name for f in ev.value_type]
    parts: tuple[str, ...]
    if "measurements" in fields:  # MEDS 0.1
        kind, parts = "nested-0.1", ("events", "measurements")
    elif "code" in fields:  # MEDS 0.2
        kind, parts = "nested-0.2", ("events",)
    else:
        raise ConversionError(
            f"MEDS shard {path}: events have neither 'measurements' (MEDS 0.1) nor 'code' "
            f"(MEDS 0.2); fields: {fields}"
        )
    code = _leaf(leaves, *parts, "code")
    if code is None:
        raise ConversionError(f"MEDS shard {path}: no measurement 'code' field")
    numeric = _leaf(leaves, *parts, "numeric_value")
    cols = [id_col, time, code] + ([numeric] if numeric else [])
    static = [_leaf(leaves, "static_measurements", f) for f in ("code", "numeric_value")]
    has_static = kind == "nested-0.1" and static[0] is not None
    if has_static:
        cols += [c for c in static if c]
    return _Layout(path, kind, id_col, tuple(cols), code, has_static, numeric is not None)


class _DeathMatcher:
    def __init__(self, codes: Iterable[str]) -> None:
        codes = [str(c) for c in codes]
        self.exact = pa.array([c for c in codes if not c.endswith("/")], pa.string())
        self.prefixes = [c for c in codes if c.endswith("/")]

    def mask(self, strings: pa.Array) -> NDArray[np.bool_]:
        if strings.type != pa.string():
            strings = strings.cast(pa.string())
        m = pc.is_in(strings, value_set=self.exact)
        for p in self.prefixes:
            m = pc.or_(m, pc.starts_with(strings, p))
        return np.asarray(m.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _list_parts(arr: pa.Array) -> tuple[NDArray[np.int64], pa.Array]:
    """(length of each list, nulls as 0; the flattened values)."""
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    return lengths.astype(np.int64), pc.list_flatten(arr)


class _Rows:
    """Maps a flattened item back to its patient row through nested list lengths."""

    def __init__(self, *lengths: NDArray[np.int64]) -> None:
        self.lengths = lengths  # outermost first

    def __call__(self, k: int) -> int:
        for lengths in reversed(self.lengths):
            k = int(np.searchsorted(np.cumsum(lengths), k, side="right"))
        return k


class _Ctx:
    """Where errors point: the shard, the batch's first row and its patient ids."""

    def __init__(self, path: Path, row0: int, pid: NDArray[np.int64]) -> None:
        self.path, self.row0, self.pid = path, row0, pid

    def fail(self, row: int, column: str, what: str) -> ConversionError:
        sid = self.pid[row] if row < self.pid.size else "?"
        return ConversionError(
            f"MEDS shard {self.path}: row {self.row0 + row + 1} (patient {sid}), "
            f"column {column!r}: {what}"
        )


def _first(mask: pa.Array) -> int:
    return int(np.argmax(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)))


def _times(
    arr: pa.Array, ctx: _Ctx, rows: _Rows, column: str, *, nullable: bool
) -> tuple[NDArray[np.int64], NDArray[np.bool_] | None]:
    """Return event times as int64 microseconds and a null mask (None: no nulls).

    Checks the type, nulls (unless `nullable`) and the range [1800, 2200).
    """
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pl.Series("t", arr.cast(pa.string()))
        parsed, bad, rule = try_parse_datetime(s)
        if bad is not None:
            raise ctx.fail(rows(bad), column, f"{s[bad]!r} {rule.split(';')[0]}")
        arr = parsed.to_arrow()
    elif pa.types.is_timestamp(t):
        if t.tz is not None:
            raise ctx.fail(0, column, f"has time zone {t.tz!r}; MEDS times are naive")
        if t.unit != "us":
            arr = pc.cast(arr, pa.timestamp("us"), safe=False)
    elif pa.types.is_date(t):
        arr = pc.cast(arr, pa.timestamp("us"))
    else:
        raise ctx.fail(0, column, f"must be timestamp[us], got {t}")
    ints = pc.cast(arr, pa.int64())
    nulls = None
    if ints.null_count:
        if not nullable:
            k = _first(ints.is_null())
            raise ctx.fail(rows(k), column, "time is null (MEDS 0.1 events need a time)")
        nulls = np.asarray(ints.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        ints = pc.fill_null(ints, 0)
    vals = ints.to_numpy(zero_copy_only=False)
    if vals.size and (vals.min() < _MIN_US or vals.max() >= _MAX_US):
        out = (vals < _MIN_US) | (vals >= _MAX_US)
        if nulls is not None:
            out &= ~nulls
        if out.any():
            k = int(np.argmax(out))
            shown = np.datetime64(int(vals[k]), "us")
            raise ctx.fail(rows(k), column, f"time {shown} is outside [1800-01-01, 2200-01-01)")
    return vals, nulls


def _numeric(arr: pa.Array | None, n: int) -> tuple[pa.Array, int]:
    """numeric_value as float32 with NaN -> null; returns (array, number of NaNs)."""
    if arr is None:
        return pa.nulls(n, pa.float32()), 0
    if arr.type != pa.float32():
        arr = pc.cast(arr, pa.float32(), safe=False)
    if arr.null_count == len(arr):
        return arr, 0
    nan = pc.is_nan(arr)
    n_nan = int(pc.sum(nan).as_py() or 0)
    if n_nan:
        arr = pc.if_else(nan, pa.scalar(None, pa.float32()), arr)
    return arr, n_nan


class _Flattener:
    """Flattens batches of one layout and accumulates deaths, last times, codes and counts."""

    def __init__(self, matcher: _DeathMatcher) -> None:
        self.matcher = matcher
        self.deaths: list[tuple[NDArray[np.int64], NDArray[np.int64]]] = []
        self.last: list[tuple[NDArray[np.int64], NDArray[np.int64]]] = []
        self.codes: set[str] = set()
        self._dicts: list[pa.Array] = []
        keys = ("patients", "events", "measurements", "static", "nan", "static_deaths")
        self.counts = dict.fromkeys(keys, 0)

    def _collect_codes(self, code: pa.Array) -> None:
        if pa.types.is_dictionary(code.type):
            d = code.dictionary
            if not any(d is o or d.equals(o) for o in self._dicts[-2:]):
                self.codes.update(d.to_pylist())
                self._dicts = [*self._dicts[-1:], d]
        else:
            self.codes.update(pc.unique(code).to_pylist())

    def _death_rows(self, code: pa.Array) -> NDArray[np.int64]:
        if pa.types.is_dictionary(code.type):
            dm = self.matcher.mask(code.dictionary)
            if not dm.any():
                return np.zeros(0, dtype=np.int64)
            return np.flatnonzero(dm[code.indices.to_numpy(zero_copy_only=False)])
        return np.flatnonzero(self.matcher.mask(code))

    def batch(self, b: pa.RecordBatch, lay: _Layout, row0: int) -> pa.Table:
        ids = b.column(lay.id_column)
        ctx = _Ctx(lay.path, row0, np.zeros(0, np.int64))
        if ids.null_count:
            raise ctx.fail(_first(ids.is_null()), lay.id_column, "patient id is null")
        pid = pc.cast(ids, pa.int64()).to_numpy(zero_copy_only=False)
        ctx.pid = pid
        if lay.kind == "flat":
            return self._flat(b, lay, ctx, pid)
        self.counts["patients"] += pid.size
        n_ev, ev = _list_parts(b.column("events"))
        t_ev, null_ev = _times(
            pc.struct_field(ev, "time"), ctx, _Rows(n_ev), "events.time",
            nullable=lay.kind != "nested-0.1",
        )  # fmt: skip
        self.counts["events"] += t_ev.size
        sid_ev = np.repeat(pid, n_ev)
        if lay.kind == "nested-0.1":
            n_m, m = _list_parts(pc.struct_field(ev, "measurements"))
            rows, ccol = _Rows(n_ev, n_m), "events.measurements.code"
            sid, t = np.repeat(sid_ev, n_m), np.repeat(t_ev, n_m)
            tnull = None if null_ev is None else np.repeat(null_ev, n_m)
        else:
            m, rows, ccol = ev, _Rows(n_ev), "events.code"
            sid, t, tnull = sid_ev, t_ev, null_ev
        has = n_ev > 0  # last timed event of each patient (a patient's events are contiguous)
        if has.any():
            timed = t_ev if null_ev is None else np.where(null_ev, _NONE, t_ev)
            self.last.append((pid[has], np.maximum.reduceat(timed, (np.cumsum(n_ev) - n_ev)[has])))
        table = self._table(m, sid, t, tnull, ctx, rows, ccol, lay.has_numeric)
        if lay.has_static:
            n_s, sm = _list_parts(b.column("static_measurements"))
            if n_s.sum():
                n = int(n_s.sum())
                self.counts["static"] += n
                static = self._table(
                    sm, np.repeat(pid, n_s), np.zeros(n, np.int64), np.ones(n, bool), ctx,
                    _Rows(n_s), "static_measurements.code", "numeric_value" in sm.type.names,
                )  # fmt: skip
                # each patient's static rows before its timed rows (MEDS: null times first)
                owner = np.repeat(np.arange(pid.size), n_ev)
                if lay.kind == "nested-0.1":
                    owner = np.repeat(owner, n_m)
                key = np.concatenate([np.repeat(np.arange(pid.size), n_s), owner])
                both = pa.concat_tables([static.cast(FLAT_SCHEMA), table.cast(FLAT_SCHEMA)])
                table = both.combine_chunks().take(pa.array(np.argsort(key, kind="stable")))
        return table

    def _flat(self, b: pa.RecordBatch, lay: _Layout, ctx: _Ctx, pid: NDArray[np.int64]) -> pa.Table:
        t, tnull = _times(b.column("time"), ctx, _Rows(), "time", nullable=True)
        timed = np.ones(t.size, bool) if tnull is None else ~tnull
        if timed.any():
            df = pl.DataFrame({"s": pid[timed], "t": t[timed]}).group_by("s").agg(pl.col("t").max())
            self.last.append((df["s"].to_numpy(), df["t"].to_numpy()))
        self.counts["events"] += int(timed.sum())
        return self._table(b, pid, t, tnull, ctx, _Rows(), "code", lay.has_numeric)

    def _table(
        self,
        src: Any,
        sid: NDArray[np.int64],
        t: NDArray[np.int64],
        tnull: NDArray[np.bool_] | None,
        ctx: _Ctx,
        rows: _Rows,
        ccol: str,
        has_numeric: bool,
    ) -> pa.Table:
        """Return the flat table of one batch; `src` holds the `code` (and `numeric_value`)."""
        get = (lambda f: src.column(f)) if isinstance(src, pa.RecordBatch) else (
            lambda f: pc.struct_field(src, f)
        )  # fmt: skip
        code = get("code")
        if code.null_count:
            raise ctx.fail(rows(_first(code.is_null())), ccol, "code is null")
        self.counts["measurements"] += sid.size
        self._collect_codes(code)
        death = self._death_rows(code)
        if death.size:
            timed = death if tnull is None else death[~tnull[death]]
            self.counts["static_deaths"] += death.size - timed.size
            self.deaths.append((sid[timed], t[timed]))
        values, n_nan = _numeric(get("numeric_value") if has_numeric else None, sid.size)
        self.counts["nan"] += n_nan
        if pa.types.is_dictionary(code.type):
            if code.type.value_type != pa.string():
                code = code.cast(pa.dictionary(code.type.index_type, pa.string()))
        elif code.type != pa.string():
            code = code.cast(pa.string())
        time = pa.array(t, pa.timestamp("us"), mask=tnull)
        return pa.table(
            [pa.array(sid, pa.int64()), time, code, values],
            names=["subject_id", "time", "code", "numeric_value"],
        )


def _batch_size(pf: pq.ParquetFile, rg: int, code_path: str, target_rows: int) -> int:
    """Patients per batch so that a batch holds about `target_rows` measurements."""
    meta = pf.metadata.row_group(rg)
    n_rows = max(1, meta.num_rows)
    n_values = next(
        (meta.column(j).num_values for j in range(meta.num_columns)
         if meta.column(j).path_in_schema == code_path),
        n_rows,
    )  # fmt: skip
    return max(1, min(n_rows, int(target_rows * n_rows / max(1, n_values))))


def flatten_meds(
    src: str | Path,
    out_data: str | Path,
    *,
    death_codes: Iterable[str] = DEFAULT_DEATH_CODES,
    batch_rows: int = 1_000_000,
) -> FlattenResult:
    """Convert every shard under the MEDS root `src` into flat shards under `out_data`.

    Returns the shards' counts, the death events, each subject's last timed event and the codes
    seen. `batch_rows` (measurements per batch) bounds memory. See the module docs.
    """
    out_data = Path(out_data)
    fl = _Flattener(_DeathMatcher(death_codes))
    files = meds_shards(src)
    base = Path(src) / "data" if (Path(src) / "data").is_dir() else Path(src)
    shards: list[dict[str, Any]] = []
    for path in files:
        lay = detect_layout(path)
        before = dict(fl.counts)
        target = out_data / path.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        pf = pq.ParquetFile(path, read_dictionary=[lay.code_path])
        row0 = 0
        with BackgroundWriter(target, empty_schema=FLAT_SCHEMA) as writer:
            for rg in range(pf.num_row_groups):
                size = _batch_size(pf, rg, lay.code_path, batch_rows)
                for b in pf.iter_batches(
                    batch_size=size, row_groups=[rg], columns=list(lay.columns), use_threads=False
                ):
                    writer.put(fl.batch(b, lay, row0))
                    row0 += b.num_rows
        shard = {"path": str(path), "layout": lay.kind, "rows_in": row0, "rows_out": writer.rows}
        shard.update({k: fl.counts[k] - before[k] for k in ("patients", "events", "measurements")})
        shards.append(shard)
    last = _frame(fl.last, "last_time").filter(pl.col("last_time").cast(pl.Int64) != _NONE)
    return FlattenResult(
        shards=shards,
        deaths=_frame(fl.deaths, "time").sort("subject_id", "time"),
        last_event=last.group_by("subject_id").agg(pl.col("last_time").max()).sort("subject_id"),
        codes=sorted(c for c in fl.codes if c is not None),
        counts=dict(fl.counts, shards=len(files), rows_written=sum(s["rows_out"] for s in shards)),
    )


def _frame(parts: list[tuple[NDArray[np.int64], NDArray[np.int64]]], tcol: str) -> pl.DataFrame:
    sid = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    t = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    return pl.DataFrame(
        {
            "subject_id": pl.Series(sid, dtype=pl.Int64),
            tcol: pl.Series(t, dtype=pl.Int64).cast(pl.Datetime("us")),
        }
    )
