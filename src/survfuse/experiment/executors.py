"""Executors: where grid cells (and other independent jobs) run.

An executor runs `run_cell(spec, run_dir)` for a list of cell specs and reports each
`CellResult` as it arrives; every executor writes the same cell folders, so results do not depend
on where cells ran. `LocalExecutor` runs in this process, one cell after another. A distributed
executor (Ray, issue 12) subclasses `Executor`, runs the same pure `run_cell` as remote tasks and
registers itself with `register_executor("ray", ...)` (looked up lazily in
`survfuse.experiment.ray_executor`).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from survfuse.experiment.cell import CellResult, run_cell
from survfuse.experiment.grid import CellSpec
from survfuse.registry import look_up_option

__all__ = ["Executor", "LocalExecutor", "get_executor", "register_executor", "run_cell"]

T = TypeVar("T")
R = TypeVar("R")

_EXECUTORS: dict[str, Callable[..., Executor]] = {}
# Executors living in optional modules, imported on first use.
_LAZY = {"ray": "survfuse.experiment.ray_executor"}


class Executor(abc.ABC):
    """Runs grid cells; subclasses implement `run` (and may override `map` and `encode`)."""

    name: str = ""

    @abc.abstractmethod
    def run(
        self,
        specs: Sequence[CellSpec],
        run_dir: Path,
        *,
        on_result: Callable[[CellResult], None] | None = None,
    ) -> list[CellResult]:
        """Run `run_cell(spec, run_dir)` for each spec; call `on_result` as each one finishes."""

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
        """Encode one modality through the feature store (a cluster may fan this out)."""
        return store.encode(encoder, cohort, source, fit_cohort=fit_cohort, progress=progress)

    def close(self) -> None:
        """Release resources (nothing for the local executor)."""
        self.closed = True

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Runs every cell in this process, in order."""

    name = "local"

    def __init__(self, **options: Any) -> None:
        # Why accept and ignore options: CLI flags meant for other executors (e.g. an address)
        # must not break a local run.
        self.ignored_options = sorted(options)

    def run(
        self,
        specs: Sequence[CellSpec],
        run_dir: Path,
        *,
        on_result: Callable[[CellResult], None] | None = None,
    ) -> list[CellResult]:
        results = []
        for spec in specs:
            result = run_cell(spec, run_dir)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results


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
