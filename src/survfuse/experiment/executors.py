"""Executors: where grid cells (and other independent jobs) run.

An executor runs `run_cell(spec, run_dir)` for a list of cell specs and reports each
`CellResult` as it arrives; every executor writes the same cell folders, so results do not depend
on where cells ran. `LocalExecutor` runs in this process, one cell after another. A distributed
executor (Ray) subclasses `Executor`, runs the same pure `run_cell` as remote tasks
(yielding each result from `finished`; `run` puts them in order) and registers itself with
`register_executor("ray", ...)` (looked up lazily in `survfuse.experiment.ray_executor`).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from survfuse.experiment.cell import CellResult, record_failure, run_cell
from survfuse.experiment.grid import CellSpec
from survfuse.registry import look_up_option

__all__ = ["Executor", "LocalExecutor", "get_executor", "register_executor", "run_cell"]

T = TypeVar("T")
R = TypeVar("R")

_EXECUTORS: dict[str, Callable[..., Executor]] = {}
# Executors living in optional modules, imported on first use.
_LAZY = {"ray": "survfuse.experiment.ray_executor"}


class Executor(abc.ABC):
    """Runs grid cells; subclasses implement `finished` (and may override `map` and `encode`)."""

    name: str = ""

    def run(
        self,
        specs: Sequence[CellSpec],
        run_dir: Path,
        *,
        on_result: Callable[[CellResult], None] | None = None,
    ) -> list[CellResult]:
        """Run `run_cell(spec, run_dir)` for each spec; call `on_result` as each one finishes.

        Returns the results in the order of `specs`.
        """
        by_id: dict[str, CellResult] = {}
        for spec, result in self.finished(specs, run_dir):
            by_id[spec.cell_id] = result
            if on_result is not None:
                on_result(result)
        return [by_id[s.cell_id] for s in specs]

    @abc.abstractmethod
    def finished(
        self, specs: Sequence[CellSpec], run_dir: Path
    ) -> Iterator[tuple[CellSpec, CellResult]]:
        """Run the cells; yield (spec, result) as each one finishes, in any order."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Apply a picklable top-level `fn` to independent items (e.g. bootstrap blocks)."""
        return [fn(x) for x in items]

    def encode(
        self,
        store: Any,
        encoder: Any,
        cohort: Any,
        source: Any,
        *,
        fit_cohort: Any = None,
        progress: bool = True,
    ) -> Any:
        """Encode one modality through the feature store.

        The chunks are encoded by the store `encoding_store` picks (a cluster may fan them out),
        into the same folders.
        """
        encoding = self.encoding_store(store, encoder)
        feats = encoding.encode(encoder, cohort, source, fit_cohort=fit_cohort, progress=progress)
        if encoding is not store:
            store.last_run = encoding.last_run
        return feats

    def encoding_store(self, store: Any, encoder: Any) -> Any:
        """Return the feature store that encodes `encoder`'s chunks: `store` itself here."""
        return store

    def close(self) -> None:
        """Release resources (nothing for the local executor)."""
        self.closed = True

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Runs the cells on this machine: in this process, or in `workers` spawned processes.

    Results do not depend on `workers`: each cell trains with its configured torch thread
    count (`training.threads`) whichever process runs it.
    """

    name = "local"

    def __init__(self, workers: int = 1, **options: Any) -> None:
        # Why accept and ignore options: settings meant for other executors (e.g. a Ray
        # address) must not break a local run.
        self.workers = max(1, int(workers))
        self.ignored_options = sorted(options)

    def finished(
        self, specs: Sequence[CellSpec], run_dir: Path
    ) -> Iterator[tuple[CellSpec, CellResult]]:
        if self.workers == 1 or len(specs) <= 1:
            for spec in specs:
                yield spec, run_cell(spec, run_dir)
        else:
            yield from self._run_pool(specs, run_dir)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`fn` over items, in `workers` spawned processes when there are several."""
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx) as pool:
            return list(pool.map(fn, items))

    def _run_pool(
        self, specs: Sequence[CellSpec], run_dir: Path
    ) -> Iterator[tuple[CellSpec, CellResult]]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: torch and numba state must not be copied into the workers.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx) as pool:
            futures = {pool.submit(run_cell, spec, run_dir): spec for spec in specs}
            for fut in as_completed(futures):
                spec = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:  # a worker died (e.g. out of memory): record, go on
                    error = f"worker died: {type(exc).__name__}: {' '.join(str(exc).split())}"
                    result = record_failure(spec, run_dir, error)
                yield spec, result


def register_executor(name: str, factory: Callable[..., Executor]) -> None:
    """Make `executor: <name>` available in configs and on the command line."""
    _EXECUTORS[name] = factory


register_executor("local", LocalExecutor)


def get_executor(name: str, **options: Any) -> Executor:
    """Build the executor `name` ("local" or a registered one) with its options."""
    if name not in _EXECUTORS and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ImportError as exc:
            raise ValueError(f"executor {name!r} is not available here: {exc}") from None
    look_up_option(name, sorted(_EXECUTORS) or ["local"], kind="executor")
    return _EXECUTORS[name](**options)
