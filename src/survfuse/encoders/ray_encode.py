"""Encode a cohort through Ray Data, into the same `FeatureStore` folders as a local run.

`RayFeatureStore` is a `FeatureStore` whose chunk loop runs on a Ray cluster: the chunks still to
encode become the rows of a Ray Dataset, and `map_batches` sends them (one chunk per call) to an
autoscaling pool of actors (`ActorPoolStrategy(min_size=1, max_size=actors)`). Each actor rebuilds
the fitted encoder once, from its registry name, config and fitted state (so a CT foundation
model loads its checkpoint once per actor, on the GPU when `num_gpus` > 0), encodes its chunks and
writes each one atomically into the store. Fitting, fingerprints, chunk keys and assembly are the
store's own code, so a later local run finds every chunk (and the assembled result) cached, and a
Ray run reuses chunks a local run wrote. The store folder must be on storage every node sees.

Requires `ray[data]` (the `ray` extra); Ray is imported only when encoding.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from numpy.typing import NDArray

from survfuse.encoders.base import Encoder
from survfuse.encoders.store import ChunkJob, FeatureStore
from survfuse.features import ModalityFeatures
from survfuse.registry import ENCODERS, all_registries

__all__ = ["RayFeatureStore", "encoder_blueprint", "ray_encode"]


def encoder_blueprint(encoder: Encoder) -> dict[str, Any]:
    """Return what an actor needs to rebuild `encoder`: name, config, fitted state, fingerprint."""
    return {
        "name": encoder.name,
        "config": encoder.config(),
        "fitted": bool(encoder.fitted),
        "state": encoder.state() if encoder.fitted else {},
        "fingerprint": encoder.fingerprint(),
    }


def rebuild_encoder(blueprint: dict[str, Any]) -> Encoder:
    """Rebuild the encoder of `encoder_blueprint`.

    Refuses one whose fingerprint differs (built by other code).
    """
    all_registries()  # imports every encoder module, so every name is registered

    enc: Encoder = ENCODERS.get(blueprint["name"])(**blueprint["config"])
    if blueprint["fitted"] and enc.learns:
        enc.set_state(blueprint["state"])
        enc.fitted = True
    if enc.fingerprint() != blueprint["fingerprint"]:
        # Why: a worker with another survfuse version (or encoder code) would write chunks that
        # do not match the store folder's fingerprint.
        raise RuntimeError(
            f"encoder {blueprint['name']!r} rebuilt on a Ray worker has another fingerprint "
            "than on the driver: install the same survfuse version on every node"
        )
    return enc


class _ChunkEncoder:
    """Ray Data actor: builds the encoder once, then encodes and saves one chunk per call."""

    def __init__(
        self,
        blueprint: dict[str, Any],
        cohort: pl.DataFrame,
        source: Any,
        first: NDArray[np.int64],
        threads: int,
    ) -> None:
        import torch

        # Why: Ray gives the actor `num_cpus` cores; torch would otherwise use every core.
        torch.set_num_threads(max(1, threads))
        self.encoder = rebuild_encoder(blueprint)
        self.cohort, self.source, self.first = cohort, source, first

    def __call__(self, batch: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        seconds = []
        for a, b, folder in zip(batch["start"], batch["stop"], batch["dir"], strict=True):
            t0 = time.perf_counter()
            rows = self.cohort[self.first[int(a) : int(b)].tolist()]
            feats = self.encoder.encode(rows, self.source)
            FeatureStore._check_chunk(feats, rows, self.encoder.name)
            feats.meta.setdefault("encoder", self.encoder.name)
            feats.save(Path(str(folder)))
            seconds.append(time.perf_counter() - t0)
        return {
            "chunk": np.asarray(batch["chunk"], dtype=np.int64),
            "rows": np.asarray(batch["stop"], dtype=np.int64) - np.asarray(batch["start"]),
            "seconds": np.asarray(seconds, dtype=np.float64),
            "pid": np.full(len(seconds), os.getpid(), dtype=np.int64),
        }


class RayFeatureStore(FeatureStore):
    """A `FeatureStore` that encodes its missing chunks with a Ray Data actor pool.

    `actors`: most actors at once (the pool starts with one and grows while chunks wait);
    `num_cpus` / `num_gpus`: what each actor requests. `last_workers` holds the process ids of
    the actors that encoded chunks in the last call.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        actors: int = 2,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> None:
        super().__init__(root)
        if actors < 1:
            raise ValueError(f"actors must be >= 1, got {actors}")
        self.actors, self.num_cpus, self.num_gpus = int(actors), float(num_cpus), float(num_gpus)
        self.last_workers: list[int] = []

    def _encode_chunks(self, job: ChunkJob) -> None:
        import ray
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        if not ray.is_initialized():
            raise RuntimeError("RayFeatureStore needs a Ray runtime: call ray.init() first")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own bar below; Ray's would interleave with it
        ctx.print_on_execution_start = False
        chunks, chunk_dirs = job.chunks, job.chunk_dirs
        items = [
            {"chunk": i, "start": chunks[i][0], "stop": chunks[i][1], "dir": str(chunk_dirs[i])}
            for i in job.todo
        ]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(
            _ChunkEncoder,
            batch_size=1,  # one store chunk per call: each is saved as soon as it is encoded
            batch_format="numpy",
            fn_constructor_kwargs={
                "blueprint": encoder_blueprint(job.encoder),
                "cohort": job.cohort,
                "source": job.source,
                "first": job.first,
                "threads": max(1, int(self.num_cpus)),
            },
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(self.actors, len(items))),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
        )
        pids: set[int] = set()
        with Progress(
            TextColumn(f"[bold]{job.encoder.name}[/bold] encoding on Ray"),
            BarColumn(),
            MofNCompleteColumn(),
            disable=not job.progress,
        ) as bar:
            task = bar.add_task("encode", total=job.n_rows)
            for row in out.iter_rows():
                pids.add(int(row["pid"]))
                bar.advance(task, int(row["rows"]))
        missing = [str(d) for d in chunk_dirs if not (d / "meta.json").exists()]
        if missing:
            raise RuntimeError(f"Ray encoding finished without writing chunk {missing[0]}")
        self.last_workers = sorted(pids)


def ray_encode(
    store: FeatureStore,
    encoder: Encoder,
    cohort: pl.DataFrame,
    source: Any,
    *,
    fit_cohort: pl.DataFrame | None = None,
    actors: int = 2,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    progress: bool = True,
) -> ModalityFeatures:
    """`store.encode(...)` with the chunks encoded through Ray Data (same folders, same result).

    `store.last_run` describes the call as after a local encode.
    """
    ray_store = RayFeatureStore(store.root, actors=actors, num_cpus=num_cpus, num_gpus=num_gpus)
    feats = ray_store.encode(encoder, cohort, source, fit_cohort=fit_cohort, progress=progress)
    store.last_run = ray_store.last_run
    return feats
