"""A study at real-cohort scale: foundation-model-size embeddings, the demo's strategies.

A simulated cohort of `--n` patients whose CT and EHR inputs are precomputed embeddings of
published-FM size, generated here with known signal: a few latent factors per modality
(u_ct [4], u_ehr [4], standard normal) are embedded by fixed random projections into a CT pooled
vector of 2,048 dims plus a token grid (`--ct-tokens` tokens of 2,048 dims) and an EHR pooled
vector of 768 dims plus `--ehr-tokens` tokens of 768 dims, each with Gaussian noise
(signal-to-noise set by `--noise`). Two tasks with exponential event times and uniform censoring:

    PE:   log hazard = 0.8 u_ct0 + 0.5 u_ehr0 + 0.4 u_ct1 u_ehr1
    MACE: log hazard = 0.3 u_ct2 + 0.8 u_ehr2

Splits 70 / 15 / 15 (train / validation for early stopping / test) as contiguous row ranges
(the rows are i.i.d. draws, so a contiguous split is a random one); every fit reads views of
the one copy of the embeddings, never a per-fit copy. Every strategy of `examples/demo.yaml`
(or `--strategies`) trains with `--seeds` seeds per task; the test split is scored with
Harrell's C of the seed-averaged risk and a percentile interval from `--bootstrap` subject
resamples (`survfuse.metrics.bootstrap`, every model on the same resamples), next to the
oracle C of the true log hazard. The exactly fitted `linear` strategies do not depend on the
seed (no random numbers in the solver nor in their pooled standardisation; a test checks
this), so they are fitted once per task and that risk stands for every seed.

Fits run in `--workers` forked processes (default 2), each torch computation on `--threads`
threads (default 1): on two cores two single-threaded fits side by side beat one fit on two
threads (docs/benchmarks.md). The embeddings are generated before the workers fork, so the
workers share one physical copy (never written, so never copied on write). Jobs go to the
workers longest first (attention, then tokens, then pooled-only models).

`--check-subset S` adds the issue's accuracy check: every strategy trained with full-batch
Cox risk sets on an S-patient subset of the cohort (70% of S from the training split, 15% of
S from the validation split; the estimator's default trains one batch up to 4,096 patients),
scored on the same test split as the study. Printed beside the study's C: the study (its
mini-batches, `--batch-size`) must not lose more than 0.01 of C against it.

Printed: wall time, CPU time (this process and its workers) and memory for every stage and
fit, and the C-index table, so speed is never bought with accuracy. Memory: the peak over the
run of the summed proportional set size (PSS: shared pages divided among the processes that
map them, i.e. the physical memory of the study), sampled every 0.5 s, and the largest peak
RSS of one fit (its worker's VmHWM, reset before the fit; the shared embeddings count in full). Mini-batch training (`--batch-size`, default 1,024 at n > 5,000, else the
estimator's default, one batch up to 4,096 training patients) computes the Cox partial likelihood over each
batch's own risk sets (the documented approximation, `survfuse.fusion.batch`). Early stopping
`--patience` defaults to 3 epochs at n > 5,000, else 10 (the demo's): at n = 20,000 an epoch is
14 optimiser steps and every model's best epoch came within 1 to 8 epochs, so 3 epochs of
patience are still more steps without gain than the demo's 10 full-batch epochs, and the
subset check above measures what it costs.

    .venv/bin/python benchmarks/bench_study_scale.py --n 2000 --seeds 1 --bootstrap 100  # smoke
    .venv/bin/python benchmarks/bench_study_scale.py --n 20000 --check-subset 3000       # full
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from typing import Any

import numpy as np

#: The demo's strategies (examples/demo.yaml): label -> (strategy, params).
DEMO: dict[str, tuple[str, dict[str, Any]]] = {
    "linear_ct": ("linear", {"modality": "ct"}),
    "linear_ehr": ("linear", {"modality": "ehr"}),
    "linear": ("linear", {}),
    "unimodal_ct": ("unimodal", {"modality": "ct"}),
    "unimodal_ehr": ("unimodal", {"modality": "ehr"}),
    "unimodal_ct_tokens": (
        "unimodal",
        {"modality": "ct", "tokens": True, "d_model": 16, "hidden": 16},
    ),
    "unimodal_ehr_tokens": (
        "unimodal",
        {"modality": "ehr", "tokens": True, "d_model": 16, "hidden": 16},
    ),
    "concat": ("concat", {}),
    "late": ("late", {}),
    "late_stacking": ("late", {"combine": "stacking"}),
    "contrastive": ("contrastive", {}),
    "cross_attention": ("cross_attention", {"direction": "both", "d_model": 16, "hidden": 16}),
    "co_attention": ("co_attention", {"guide": "ct", "d_model": 16, "hidden": 16}),
}
TASKS = {
    "PE": lambda ct, ehr: 0.8 * ct[:, 0] + 0.5 * ehr[:, 0] + 0.4 * ct[:, 1] * ehr[:, 1],
    "MACE": lambda ct, ehr: 0.3 * ct[:, 2] + 0.8 * ehr[:, 2],
}
#: Relative cost of one fit (CPU seconds at n = 20,000 under load, this file's first
#: measurements): the workers take the longest jobs first, so none is left alone at the end.
COST = {
    "cross_attention": 300.0,
    "co_attention": 300.0,
    "unimodal_ehr_tokens": 60.0,
    "unimodal_ct_tokens": 55.0,
    "contrastive": 17.0,
    "linear_ct": 15.0,
    "linear": 11.0,
}

_DATA: dict[str, Any] = {}  # the simulated cohort, set before the workers fork


def rss_mb() -> tuple[float, float]:
    """(resident memory now, peak resident memory) of this process, MB."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM), so the next reading is one fit's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the reading stays the process's peak
        pass


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), MB; shared pages count in full."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process and of its finished-and-waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def pss_mb(pid: int) -> float:
    """Proportional set size of process `pid`, MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemoryMonitor:
    """Peak over time of the summed PSS of this process and its live children (a thread)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        pids = [os.getpid(), *(p.pid for p in multiprocessing.active_children())]
        total = sum(pss_mb(p) for p in pids if p is not None)
        self.peak_mb = max(self.peak_mb, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryMonitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def embed(
    u: np.ndarray, dim: int, n_tokens: int, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled [N, dim] and tokens [N, T, dim] float32: fixed random projections of the latent
    factors `u` [N, k] (one per token, so tokens differ) plus N(0, noise^2) noise."""
    n, k = u.shape
    proj = rng.normal(0, 1 / np.sqrt(k), (n_tokens + 1, k, dim)).astype(np.float32)
    u32 = u.astype(np.float32)
    pooled = u32 @ proj[0] + rng.normal(0, noise, (n, dim)).astype(np.float32)
    tokens = np.empty((n, n_tokens, dim), np.float32)
    for t in range(n_tokens):  # token by token: no [N, T, dim] float64 temporaries
        tokens[:, t] = u32 @ proj[t + 1] + rng.standard_normal((n, dim), np.float32) * noise
    return pooled, tokens


def rows(f: Any, sl: slice) -> Any:
    """`ModalityFeatures` of the rows `sl` as views (no copy of the embeddings)."""
    take = {
        k: None if getattr(f, k) is None else getattr(f, k)[sl]
        for k in ("subject_id", "prediction_time", "pooled", "present", "tokens", "mask")
    }
    return replace(f, **take, token_codes=None, meta=dict(f.meta))


def split_slices(n: int, start: int = 0) -> dict[str, slice]:
    """Contiguous 70 / 15 / 15 train / val / test row ranges of n rows from `start`."""
    n_tr, n_va = int(0.7 * n), int(0.15 * n)
    a, b = start + n_tr, start + n_tr + n_va
    return {"train": slice(start, a), "val": slice(a, b), "test": slice(b, start + n)}


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    """Features of both modalities, outcomes of both tasks and the splits."""
    import datetime as dt

    from survfuse.features import ModalityFeatures

    rng = np.random.default_rng(args.sim_seed)
    n = args.n
    u = {"ct": rng.standard_normal((n, 4)), "ehr": rng.standard_normal((n, 4))}
    sid = np.arange(n, dtype=np.int64)
    pt = np.full(n, np.datetime64(dt.datetime(2020, 1, 1)), "datetime64[us]")
    feats = {}
    for m, dim, t in (("ct", 2048, args.ct_tokens), ("ehr", 768, args.ehr_tokens)):
        pooled, tokens = embed(u[m], dim, t, args.noise, rng)
        feats[m] = ModalityFeatures(
            sid, pt, pooled, np.ones(n, bool), tokens=tokens, mask=np.ones((n, t), bool)
        )
    outcomes = {}
    for task, f in TASKS.items():
        lp = f(u["ct"], u["ehr"])
        t_event = rng.exponential(365.0 * np.exp(-lp))
        t_cens = rng.uniform(30, 3 * 365, n)
        outcomes[task] = (np.minimum(t_event, t_cens), t_event <= t_cens, lp)
    splits = {"study": split_slices(n)}
    if args.check_subset:
        s = args.check_subset
        tr, va = splits["study"]["train"], splits["study"]["val"]
        sub_tr, sub_va = int(0.7 * s), int(0.15 * s)
        if sub_tr > tr.stop - tr.start or sub_va > va.stop - va.start:
            raise SystemExit(f"--check-subset {s} needs more patients than --n {n} has")
        splits["subset"] = {
            "train": slice(tr.start, tr.start + sub_tr),
            "val": slice(va.start, va.start + sub_va),
            "test": splits["study"]["test"],
        }
    return {"features": feats, "outcomes": outcomes, "splits": splits}


def is_exact(label: str) -> bool:
    """Whether a strategy is fitted by an exact solver (no epochs, no seed)."""
    from survfuse.fusion.base import ExactStrategy
    from survfuse.registry import FUSIONS

    return issubclass(FUSIONS.get(DEMO[label][0]), ExactStrategy)


def fit_predict(
    data: dict[str, Any], task: str, label: str, seed: int, args: argparse.Namespace, split: str
) -> dict[str, Any]:
    """Train one strategy x seed on a split's train rows (early stopping on its validation
    rows); return the test risk, wall / CPU seconds, epochs and this process's peak RSS."""
    from survfuse.fusion import FusionSurvivalModel

    reset_peak_rss()
    w0, c0 = time.perf_counter(), time.process_time()
    strategy, params = DEMO[label]
    t, e, _ = data["outcomes"][task]
    sl = data["splits"][split]
    x = {k: {m: rows(f, s) for m, f in data["features"].items()} for k, s in sl.items()}
    model = FusionSurvivalModel(
        strategy,
        strategy_params=params,
        seed=seed,
        device=args.device,
        max_epochs=args.max_epochs,
        patience=args.patience if split == "study" else args.check_patience,
        lr=3e-3,
        weight_decay=1e-4,
        # the subset check is the full-batch reference: the estimator's default batching
        batch_size=args.batch_size if split == "study" else None,
        threads=args.threads,
    )
    tr, va = sl["train"], sl["val"]
    model.fit(x["train"], t[tr], e[tr], validation=(x["val"], t[va], e[va]))
    risk = np.asarray(model.predict(x["test"]), dtype=np.float64)
    return {
        "risk": risk,
        "wall_s": time.perf_counter() - w0,
        "cpu_s": time.process_time() - c0,
        "epochs": len([h for h in model.history_ if "seconds" in h]),
        "best_epoch": model.best_epoch_,
        "peak_mb": peak_rss_mb(),
    }


def _libc() -> Any:
    """glibc through ctypes, or None (another C library: the allocator is left alone)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_heap() -> None:
    """Allocations above 1 MB get their own mapping, returned to the system when freed.

    Why: glibc raises its mmap threshold to the largest mapped block freed so far (up to
    32 MB), after which a fit's per-batch tensors come from the heap; in an attention fit at
    n = 20,000 the heap then grew by ~150 MB per training step (1.5-2 GB by the end of an
    epoch, kept by the process). A fixed threshold (M_MMAP_THRESHOLD = -3) stops the growth.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)


def _job(job: tuple[str, str, str, int], args: argparse.Namespace) -> dict[str, Any]:
    """One fit in a worker: the cohort comes from the parent's memory (forked)."""
    split, task, label, seed = job
    limit_heap()
    try:
        return fit_predict(_DATA, task, label, seed, args, split)
    finally:
        libc = _libc()
        if libc is not None:  # hand the fit's freed heap back before the next fit
            libc.malloc_trim(0)


def run_fits(
    jobs: list[tuple[str, str, str, int]], args: argparse.Namespace
) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """Every job, longest first, in `args.workers` forked processes (or in this process)."""
    jobs = sorted(jobs, key=lambda j: -COST.get(j[2], 5.0))
    out: dict[tuple[str, str, str, int], dict[str, Any]] = {}

    def report(job: tuple[str, str, str, int], r: dict[str, Any]) -> None:
        out[job] = r
        split, task, label, seed = job
        name = f"{split} {task} {label} seed {seed}"
        print(
            f"{name:<44}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{r['epochs']:>7}"
            f"{r['best_epoch'] if r['best_epoch'] is not None else '-':>6}{r['peak_mb']:>9.0f}",
            flush=True,
        )

    if args.workers <= 1:
        for job in jobs:
            report(job, _job(job, args))
        return out
    # fork: the workers share the parent's embeddings. No torch or numba code has run in this
    # process yet (simulation is numpy only), so there is no thread pool state to inherit.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = {pool.submit(_job, job, args): job for job in jobs}
        for fut in as_completed(futures):
            report(futures[fut], fut.result())
    return out


def seed_mean(risks: list[np.ndarray]) -> np.ndarray:
    """Seed-averaged risk: the mean of the per-seed standardised risks."""
    return np.mean([(r - r.mean()) / max(r.std(), 1e-12) for r in risks], axis=0)


def harrell(time_: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    from survfuse.metrics.concordance import concordance_index

    return float(concordance_index(time_, event, risk).estimate)


def bootstrap_table(
    time_: np.ndarray, event: np.ndarray, risks: dict[str, np.ndarray], b: int, seed: int
) -> dict[str, tuple[float, float, float]]:
    """Harrell's C and its percentile 95% interval per model, every model on the same `b`
    subject resamples (the library's vectorised bootstrap)."""
    if b == 0:
        return {k: (harrell(time_, event, r), np.nan, np.nan) for k, r in risks.items()}
    from survfuse.metrics.bootstrap import bootstrap

    res = bootstrap("harrell_c", time_, event, risks, n_boot=b, seed=seed)
    return {k: (r.estimate, r.ci_low, r.ci_high) for k, r in zip(risks, res, strict=True)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--strategies", default=",".join(DEMO))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--ct-tokens", type=int, default=8, help="CT token grid (2 x 2 x 2)")
    ap.add_argument("--ehr-tokens", type=int, default=16)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=None, help="default: see above")
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=None, help="default: see above")
    ap.add_argument("--workers", type=int, default=2, help="fits side by side (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per fit")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sim-seed", type=int, default=0)
    ap.add_argument(
        "--check-subset",
        type=int,
        default=0,
        help="also train full-batch on a subset of this many patients (0: no check)",
    )
    ap.add_argument(
        "--check-patience", type=int, default=10, help="the subset check's (the demo's) patience"
    )
    args = ap.parse_args(argv)
    if args.n > 5000:  # mini-batches: 14 optimiser steps an epoch at n = 20,000 (see above)
        args.batch_size = args.batch_size or 1024
        args.patience = args.patience or 3
    args.patience = args.patience or 10
    unknown = sorted(set(args.strategies.split(",")) - set(DEMO))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {sorted(DEMO)}")
    unknown = sorted(set(args.tasks.split(",")) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; print the stage table and the C table; return the results."""
    args = parse_args(argv)
    labels, tasks = args.strategies.split(","), args.tasks.split(",")
    print(
        f"n={args.n:,}, CT 2048-d + {args.ct_tokens} tokens, EHR 768-d + {args.ehr_tokens} "
        f"tokens, {args.seeds} seeds, {args.bootstrap} resamples, batch "
        f"{args.batch_size or 'default'}, {args.workers} workers x {args.threads} threads, "
        f"device {args.device}; load average {os.getloadavg()[0]:.1f} at start"
    )
    with MemoryMonitor() as mem:
        start, c_start = time.perf_counter(), cpu_s()
        print(f"{'stage':<44}{'wall s':>9}{'CPU s':>9}{'epochs':>7}{'best':>6}{'peak MB':>9}")
        data = simulate(args)
        _DATA.update(data)
        print(
            f"{'generate embeddings':<44}{time.perf_counter() - start:>9.1f}"
            f"{cpu_s() - c_start:>9.1f}{'':>13}{rss_mb()[1]:>9.0f}",
            flush=True,
        )
        exact = {label: is_exact(label) for label in labels}
        seeds = {label: [0] if exact[label] else list(range(args.seeds)) for label in labels}
        jobs = [("study", t, lb, s) for t in tasks for lb in labels for s in seeds[lb]]
        fits = run_fits(jobs, args)
        study_wall, study_cpu = time.perf_counter() - start, cpu_s() - c_start
        study_mem = mem.peak_mb
        sub_wall = sub_cpu = 0.0
        if args.check_subset:
            w0, c0 = time.perf_counter(), cpu_s()
            sub = [("subset", t, lb, s) for t in tasks for lb in labels for s in seeds[lb]]
            fits.update(run_fits(sub, args))
            sub_wall, sub_cpu = time.perf_counter() - w0, cpu_s() - c0
        w0, c0 = time.perf_counter(), cpu_s()
        te = data["splits"]["study"]["test"]
        table: dict[tuple[str, str], dict[str, Any]] = {}
        for task in tasks:
            t, e, lp = (a[te] for a in data["outcomes"][task])
            risks = {"oracle (true log hazard)": lp}
            per_seed: dict[str, list[float]] = {}
            subset: dict[str, float] = {}
            for label in labels:
                rs = [fits["study", task, label, s]["risk"] for s in seeds[label]]
                risks[label] = seed_mean(rs)
                per_seed[label] = [harrell(t, e, r) for r in rs]
                if args.check_subset:
                    sr = [fits["subset", task, label, s]["risk"] for s in seeds[label]]
                    subset[label] = harrell(t, e, seed_mean(sr))
            for label, ci in bootstrap_table(t, e, risks, args.bootstrap, 0).items():
                table[task, label] = {
                    "ci": ci,
                    "per_seed": per_seed.get(label, []),
                    "subset_c": subset.get(label),
                }
        boot_wall, boot_cpu = time.perf_counter() - w0, cpu_s() - c0
        print(f"{'bootstrap (every task and model)':<44}{boot_wall:>9.1f}{boot_cpu:>9.1f}")
    wall = time.perf_counter() - start
    peak_rss = max(r["peak_mb"] for r in fits.values()) if fits else 0.0
    print(
        f"\nstudy (generate + fits): {study_wall / 60:.1f} min wall, {study_cpu / 60:.1f} min CPU;"
        f" peak memory {study_mem / 1024:.2f} GB (summed PSS)"
    )
    if args.check_subset:
        print(f"subset check fits: {sub_wall / 60:.1f} min wall, {sub_cpu / 60:.1f} min CPU")
    print(
        f"total {wall / 60:.1f} min wall, {cpu_s() / 60:.1f} min CPU, peak memory "
        f"{mem.peak_mb / 1024:.2f} GB summed PSS, largest peak RSS of one fit {peak_rss / 1024:.2f}"
        " GB (shared embeddings counted in full; targets at n = 20,000 for the study: <= 60 min, <= 8 GB)"
    )
    head = f"\n{'task':<6}{'model':<26}{'test C':>8}{'95% CI':>17}  "
    if args.check_subset:
        head += f"{'subset C':>9}{'diff':>8}  "
    print(head + "per-seed C")
    for (task, label), row in table.items():
        c, lo, hi = row["ci"]
        line = f"{task:<6}{label:<26}{c:>8.3f}   [{lo:.3f}, {hi:.3f}]  "
        if args.check_subset:
            sc = row["subset_c"]
            if sc is None:
                line += f"{'':>17}  "
            else:
                flag = "" if c - sc >= -0.01 else " LOW"
                line += f"{sc:>9.3f}{c - sc:>+8.3f}{flag}  "
        print(line + " ".join(f"{v:.3f}" for v in row["per_seed"]))
    return {
        "table": table,
        "fits": fits,
        "study_wall_s": study_wall,
        "peak_pss_mb": mem.peak_mb,
    }


if __name__ == "__main__":
    main()
    sys.exit(0)
