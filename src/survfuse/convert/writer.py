"""A parquet writer that runs in a background thread, so reading and writing overlap.

Arrow releases the GIL while it encodes and compresses, so one thread can decode the next input
batch while this one writes the previous one. The queue holds at most `depth` tables, which
bounds the memory in flight.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["MEDS_WRITE_OPTIONS", "BackgroundWriter"]

#: How flat MEDS shards are written: zstd level 1; dictionary pages for subject_id and code;
#: statistics for subject_id and time only (string min/max over codes costs a third of the
#: write time and nothing reads it); the arrow schema is not stored, so a dictionary-encoded
#: code column reads back as a plain string (the MEDS schema).
MEDS_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": ["subject_id", "code"],
    "write_statistics": ["subject_id", "time"],
    "store_schema": False,
}

_DONE = object()


class BackgroundWriter:
    """`put(table)` appends a table (one row group) to `path`; `close()` waits and re-raises.

    The first table fixes the file schema; later tables are cast to it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        depth: int = 2,
        empty_schema: pa.Schema | None = None,
        **options: Any,
    ) -> None:
        self.path = Path(path)
        self.empty_schema = empty_schema
        self.options = {**MEDS_WRITE_OPTIONS, **options}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name="survfuse-parquet", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            if self._error is not None:
                continue  # drain after a failure so put() never blocks
            try:
                if self._writer is None:
                    self._writer = pq.ParquetWriter(self.path, item.schema, **self.options)
                self._writer.write_table(item, row_group_size=max(1, item.num_rows))
            except BaseException as exc:  # re-raised in close()
                self._error = exc

    def put(self, table: pa.Table) -> None:
        """Queue `table` for writing (blocks while `depth` tables are waiting)."""
        if self._error is not None:
            raise self._error
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema:
            table = table.cast(self._schema)
        self.rows += table.num_rows
        self._queue.put(table)

    def close(self) -> None:
        """Flush, close the file and re-raise a write error.

        A file nothing was written to gets `empty_schema` and no rows (when given).
        """
        self._queue.put(_DONE)
        self._thread.join()
        if self._writer is not None:
            self._writer.close()
        elif self._error is None and self.empty_schema is not None:
            pq.write_table(self.empty_schema.empty_table(), self.path)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        self._queue.put(_DONE)  # a failure upstream: stop the thread, keep the first error
        self._thread.join()
        if self._writer is not None:
            self._writer.close()
