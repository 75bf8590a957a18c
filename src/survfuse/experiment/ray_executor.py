"""`RayExecutor`: the same study on a Ray cluster (`executor: ray`, `survfuse run --executor ray`).

- Runtime: with `ray_address` (or `--ray-address`) the executor joins that cluster; without, it
  starts a private local Ray runtime (`address="local"`, never someone else's). A runtime the
  caller already started (`ray.init(...)` before the run) is used as is and left running.
- Cells: each grid cell is a Ray task running the same pure `run_cell(spec, run_dir)` as the local
  executor, so cell folders and `metrics.parquet` are identical. A task requests the cell's
  resources (`ray.num_cpus` / `ray.num_gpus`, per strategy in `ray.strategies`; `num_cpus`
  defaults to the cell's `training.threads`). A worker that dies (killed, out of memory, node
  lost) is re-run up to `ray.max_retries` times by Ray, as is a task that fails with an `OSError`
  (shared storage hiccup; `run_cell` itself records model errors as failed cells and does not
  raise); after that the cell is recorded as failed (`record_failure`) and the grid goes on.
- Encoding: encoders of `ray.encode_modalities` (default: CT) encode through Ray Data
  (`survfuse.encoders.ray_encode`) into the same feature store; others encode on the driver.
- Bootstrap: each task x split's resamples are drawn on the driver from the same seeded stream
  as the local evaluation (`Resampler.weights`, 128 resamples a block) and scored in Ray tasks
  (as many per task x split as keep the cluster's CPUs busy, each of at least
  `ray.bootstrap_block` resamples), so the CIs and p-values equal the local ones.

The run directory, data, feature store and any checkpoints must be on storage every node sees at
the same path (see docs/ray.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from survfuse.encoders.ray_encode import RayFeatureStore
from survfuse.experiment.cell import CellResult, record_failure, run_cell
from survfuse.experiment.config import RayConfig
from survfuse.experiment.evaluate import group_seed, score_blocks
from survfuse.experiment.executors import Executor, register_executor
from survfuse.experiment.grid import CellSpec
from survfuse.metrics import Resampler

__all__ = ["RayExecutor", "score_block", "score_groups_on_ray"]

T = TypeVar("T")
R = TypeVar("R")

CellFn = Callable[[CellSpec, str], CellResult]


def _cell_task(cell_fn: CellFn, spec: CellSpec, run_dir: str) -> CellResult:
    return cell_fn(spec, run_dir)


def _apply(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


def _short(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


class RayExecutor(Executor):
    """Runs cells, encoders and bootstrap blocks as Ray tasks; see the module docstring.

    `address`: a cluster to join (None: start a local runtime unless one is running).
    `ray`: the config's `ray` section (a `RayConfig` or a dict). `cell_fn`: the function each
    cell task runs (default `run_cell`; a wrapper may add instrumentation).
    `num_cpus`: CPUs of a local runtime this executor starts (None: all of them).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        ray: RayConfig | dict[str, Any] | None = None,
        *,
        cell_fn: CellFn | None = None,
        num_cpus: int | None = None,
        **options: Any,
    ) -> None:
        self.address = address
        self.options = ray if isinstance(ray, RayConfig) else RayConfig.model_validate(ray or {})
        self.cell_fn: CellFn = cell_fn or run_cell
        self.num_cpus = num_cpus
        # Why accept and ignore options: settings of other executors (e.g. `workers`).
        self.ignored_options = sorted(options)
        self._owns_runtime = False

    # ------------------------------------------------------------------ runtime
    def ensure_runtime(self) -> None:
        """Join `address`, or start a local runtime, unless Ray is already initialised here."""
        import ray

        if ray.is_initialized():
            return
        common: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=self.num_cpus, **common)
        self._owns_runtime = True

    def close(self) -> None:
        import ray

        if self._owns_runtime and ray.is_initialized():
            ray.shutdown()
        self._owns_runtime = False
        self.closed = True

    # ------------------------------------------------------------------ cells
    def finished(
        self, specs: Sequence[CellSpec], run_dir: Path
    ) -> Iterator[tuple[CellSpec, CellResult]]:
        import ray

        if not specs:
            return
        self.ensure_runtime()
        remote = ray.remote(_cell_task)
        fn_ref = ray.put(self.cell_fn)
        pending: dict[Any, CellSpec] = {}
        for spec in specs:
            res = self.options.resources(spec.strategy, int(spec.training.get("threads") or 1))
            ref = remote.options(
                num_cpus=res["num_cpus"],
                num_gpus=res["num_gpus"],
                max_retries=self.options.max_retries,
                retry_exceptions=[OSError],
                name=f"survfuse-cell:{spec.cell_id}",
            ).remote(fn_ref, spec, str(run_dir))
            pending[ref] = spec
        waiting = list(pending)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                spec = pending[ref]
                try:
                    result: CellResult = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # an exception escaped the cell
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    result = record_failure(spec, run_dir, f"cell task raised: {_short(cause)}")
                except ray.exceptions.RayError as exc:  # worker or node lost every attempt
                    attempts = self.options.max_retries + 1
                    error = f"worker lost on all {attempts} attempts: {_short(exc)}"
                    result = record_failure(spec, run_dir, error)
                yield spec, result

    # ------------------------------------------------------------------ generic fan-out
    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[fn(x) for x in items]`, one Ray task per item (results in item order)."""
        import ray

        self.ensure_runtime()
        remote: Any = ray.remote(_apply)
        fn_ref = ray.put(fn)
        return list(ray.get([remote.remote(fn_ref, x) for x in items]))

    # ------------------------------------------------------------------ encoding
    def encoding_store(self, store: Any, encoder: Any) -> Any:
        """Return the feature store that encodes `encoder`'s chunks.

        Encoders of `ray.encode_modalities`: a `RayFeatureStore` on the same folder (chunks
        encoded through Ray Data); the others: `store` (on the driver).
        """
        if getattr(encoder, "modality", None) not in self.options.encode_modalities:
            return store

        self.ensure_runtime()
        o = self.options
        return RayFeatureStore(
            store.root,
            actors=o.encode_actors,
            num_cpus=o.encode_num_cpus,
            num_gpus=o.encode_num_gpus,
        )

    # ------------------------------------------------------------------ bootstrap
    def score_groups(self, groups: Sequence[Any]) -> list[dict[str, Any]]:
        """`evaluate.score_group` of every group, bootstrap blocks fanned out as Ray tasks."""
        self.ensure_runtime()
        return score_groups_on_ray(groups, block=self.options.bootstrap_block)


def score_block(
    g: Any, blocks: Sequence[NDArray[np.float64]], *, points: bool = False
) -> dict[str, Any]:
    """Compute seed-averaged statistics of every model of group `g` on weight blocks (+ points).

    `evaluate.score_blocks`, the steps of `evaluate.score_group` with the scorers built once
    per call. Returns {"boot": {model: {key: [sum b] array}}, "cal": {model: per-seed
    calibration-model parameters or None}, "point": {model: {key: value}} or None}.
    """
    return score_blocks(g, blocks, points=points)


def score_groups_on_ray(
    groups: Sequence[Any], *, block: int = 256, cpus: int | None = None
) -> list[dict[str, Any]]:
    """Score groups like `evaluate.score_blocks`, resample blocks in parallel Ray tasks.

    The caller adds `evaluate.finish_group`.

    The weights come from `Resampler.weights(n_boot, group_seed(...))` on the driver, the same
    stream as the local evaluation (blocks of 128 resamples), so every resample and every
    statistic equals the local one. Each group is cut into just enough tasks to keep `cpus`
    (default: the cluster's CPUs) busy, each of at least `block` resamples: every task builds
    the scorers once, so fewer, larger tasks waste less.
    """
    import ray

    if not groups:
        return []
    n_cpus = cpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_group = max(1, math.ceil(n_cpus / len(groups)))
    remote: Any = ray.remote(score_block)
    jobs = []
    for g in groups:
        g_ref = ray.put(g)
        blocks: list[NDArray[np.float64]] = []
        if g.n_boot > 0:
            res = Resampler.build(g.time.shape[0], g.subject_id)
            blocks = list(res.weights(g.n_boot, group_seed(g.seed, g.task, g.split)))
        most = max(1, math.ceil(g.n_boot / max(1, block)))
        n_tasks = max(1, min(per_group, most, len(blocks)))
        cuts = np.linspace(0, len(blocks), n_tasks + 1).round().astype(int)
        refs = [
            remote.remote(g_ref, blocks[cuts[i] : cuts[i + 1]], points=(i == 0))
            for i in range(n_tasks)
        ]
        jobs.append(refs)
    out = []
    for refs in jobs:
        pieces = ray.get(refs)
        boot = {
            model: {k: np.concatenate([p["boot"][model][k] for p in pieces]) for k in keys}
            for model, keys in pieces[0]["boot"].items()
        }
        cal = {
            model: None
            if per is None
            else [np.concatenate([p["cal"][model][s] for p in pieces]) for s in range(len(per))]
            for model, per in pieces[0]["cal"].items()
        }
        out.append({"point": pieces[0]["point"], "boot": boot, "cal": cal})
    return out


register_executor("ray", RayExecutor)
