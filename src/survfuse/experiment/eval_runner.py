"""Scoring every task x split group of a run.

Per-model statistics are read from the run's evaluation cache when unchanged, the rest scored by
the executor (Ray: bootstrap blocks fanned out as tasks; local: worker processes or this
process) with a progress bar.
"""

from __future__ import annotations

from typing import Any

from survfuse.experiment.eval_cache import CACHE_DIR, EvalCache, group_digest, model_digest
from survfuse.experiment.rundir import RunDir
from survfuse.experiment.scoring import GroupData, finish_group, score_group
from survfuse.progress import progress_bar

__all__ = ["score_groups"]


def _split_entry(score: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "point": score["point"][model],
        "boot": score["boot"][model],
        "infl": score["infl"][model],
        "p_cal": score["p_cal"].get(model, {}),
    }


def _score_pool(subs: list[GroupData], workers: int, bar: Any, task: Any) -> list[dict[str, Any]]:
    """`score_group` of each (one-model) group in `workers` spawned processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out: list[dict[str, Any] | None] = [None] * len(subs)
    ctx = multiprocessing.get_context("spawn")  # torch and numba state must not be forked
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(score_group, g): i for i, g in enumerate(subs)}
        for fut in as_completed(futures):
            i = futures[fut]
            out[i] = fut.result()
            bar.advance(task, max(subs[i].n_boot, 1))
    return [o for o in out if o is not None]


def score_groups(
    groups: list[GroupData],
    rd: RunDir | None,
    *,
    executor: Any = None,
    progress: bool = True,
    console: Any = None,
) -> list[dict[str, Any]]:
    """Run `score_group` on every group, through the run's evaluation cache.

    Per-model statistics are read from / written to the cache (`eval_cache.EvalCache`; no cache when
    `rd` is None). Only models whose entry is missing are scored: by `executor.score_groups` (Ray),
    in the local executor's worker processes, or here, with a progress bar.
    """
    from dataclasses import replace

    from rich.console import Console

    cache = EvalCache(rd.root / CACHE_DIR) if rd is not None else None
    digests: list[dict[str, str]] = []
    cached: list[dict[str, dict[str, Any]]] = []
    subs: list[tuple[int, GroupData]] = []
    for i, g in enumerate(groups):
        gd = group_digest(g)
        digests.append({m.model: model_digest(gd, m) for m in g.models})
        hit = {}
        if cache is not None:
            for m in g.models:
                e = cache.load(digests[i][m.model])
                if e is not None:
                    hit[m.model] = e
        cached.append(hit)
        missing = [m for m in g.models if m.model not in hit]
        if missing:
            subs.append((i, replace(g, models=missing)))
    n_models = sum(len(g.models) for g in groups)
    n_todo = sum(len(s.models) for _, s in subs)
    workers = int(getattr(executor, "workers", 1) or 1)
    new: list[tuple[int, dict[str, Any]]] = []
    with progress_bar(
        "[bold]bootstrap[/bold] {task.description}",
        enabled=progress and bool(subs),
        console=console,
    ) as bar:

        def say(msg: str) -> None:
            if progress:  # through the live bar's console when there is one
                (bar.console if subs else console or Console(stderr=True)).print(msg)

        if n_todo < n_models:
            say(
                f"[bold]evaluation[/bold] {n_models - n_todo} of {n_models} model x split "
                f"statistics read from {CACHE_DIR}/"
            )
        if not subs:
            pass
        elif executor is not None and hasattr(executor, "score_groups"):
            say(
                f"[bold]bootstrap[/bold] {n_todo} model x split statistics x "
                f"{groups[0].n_boot} resamples ({executor.name})"
            )
            raws = executor.score_groups([s for _, s in subs])  # e.g. Ray: blocks fanned out
            new = [(i, finish_group(s, r)) for (i, s), r in zip(subs, raws, strict=True)]
        elif executor is not None and type(executor).__name__ == "LocalExecutor" and workers > 1:
            # one job per model: even load on the workers, progress as models finish
            jobs = [(i, replace(s, models=[m])) for i, s in subs for m in s.models]
            t = bar.add_task(
                f"{len(jobs)} models x splits ({workers} workers)",
                total=sum(max(j.n_boot, 1) for _, j in jobs),
            )
            outs = _score_pool([j for _, j in jobs], workers, bar, t)
            new = [(i, o) for (i, _), o in zip(jobs, outs, strict=True)]
        elif executor is not None and type(executor).__name__ != "LocalExecutor":
            say(f"[bold]bootstrap[/bold] {len(subs)} task x split groups ({executor.name})")
            outs = executor.map(score_group, [s for _, s in subs])
            new = [(i, o) for (i, _), o in zip(subs, outs, strict=True)]
        else:
            for i, s in subs:
                t = bar.add_task(
                    f"{s.task}/{s.split} ({len(s.models)} models)", total=max(s.n_boot, 1)
                )

                def advance(b: int, t: Any = t) -> None:
                    bar.advance(t, b)

                new.append((i, score_group(s, advance)))
                bar.update(t, completed=max(s.n_boot, 1))
    for i, score in new:
        for model in score["point"]:
            entry = _split_entry(score, model)
            cached[i][model] = entry
            if cache is not None:
                cache.save(digests[i][model], entry)
    if cache is not None:
        cache.prune({d for ds in digests for d in ds.values()})
    out = []
    for g, hit in zip(groups, cached, strict=True):
        models = [m.model for m in g.models]
        out.append(
            {
                "point": {m: hit[m]["point"] for m in models},
                "boot": {m: hit[m]["boot"] for m in models},
                "infl": {m: hit[m]["infl"] for m in models},
                "p_cal": {m: hit[m]["p_cal"] for m in models},
            }
        )
    return out
