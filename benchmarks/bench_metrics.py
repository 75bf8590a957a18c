"""Speed of survfuse.metrics beside lifelines, scikit-survival and torchsurv (same process).

    .venv/bin/python benchmarks/bench_metrics.py [--sizes 1000 10000 100000 1000000]

Prints one table per metric (seconds, best of `--repeat` calls, and the peer / survfuse
ratio) and the bootstrap / comparison timings. A peer whose single call is predicted (from
its time at the previous size and its complexity) to exceed 60 s is skipped and reported.
Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from survfuse.interop import to_sksurv
from survfuse.metrics import (
    bootstrap,
    compare,
    concordance_index,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)

LIMIT_S = 60.0


def data(n: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t_event = rng.exponential(np.exp(-x)) * 365
    t_cens = rng.exponential(500, n)
    t = np.round(np.minimum(t_event, t_cens), 1)  # day-tenths: realistic time ties
    e = t_event <= t_cens
    tr = np.random.default_rng(seed + 1)
    tx = tr.normal(size=n)
    tt_event = tr.exponential(np.exp(-tx)) * 365
    tt_cens = tr.exponential(500, n)
    train_t = np.round(np.minimum(tt_event, tt_cens), 1)
    train_e = tt_event <= tt_cens
    # administrative censoring at the last training follow-up (sksurv needs G at every event)
    late = t >= train_t.max()
    t[late] = np.nextafter(train_t.max(), 0)
    e[late] = False
    risk = x + rng.normal(scale=0.5, size=n)
    times = np.quantile(t[e], np.linspace(0.1, 0.8, 10))
    times = times[times < min(t.max(), train_t.max())]
    surv = np.exp(-np.exp(risk)[:, None] * times[None, :] / 365)
    return dict(t=t, e=e, risk=risk, train_t=train_t, train_e=train_e, times=times, surv=surv)


def timeit(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def timeit_cpu(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Best wall time and the process CPU time of that call (all threads): on a loaded
    machine the CPU time shows what the call costs when it has the cores to itself."""
    best, cpu, out = math.inf, math.inf, None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, c = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, cpu = wall, c
    return best, cpu, out


class Peer:
    """A peer's call with a complexity model used to predict (and skip) slow sizes."""

    def __init__(
        self, name: str, exponent: float, make: Callable[[dict[str, Any]], Callable[[], Any]]
    ):
        self.name, self.exponent, self.make = name, exponent, make
        self.last: tuple[int, float] | None = None

    def predicted(self, n: int) -> float:
        if self.last is None:
            return 0.0
        n0, s0 = self.last
        return s0 * (n / n0) ** self.exponent

    def run(self, d: dict[str, Any], repeat: int) -> tuple[float | None, float | None, str]:
        n = d["t"].shape[0]
        pred = self.predicted(n)
        if pred > LIMIT_S:
            return None, None, f"skipped (predicted {pred:.0f} s > {LIMIT_S:.0f} s)"
        s, c, _ = timeit_cpu(self.make(d), 1 if pred > 5 else repeat)
        self.last = (n, s)
        return s, c, ""


def _lifelines_c(d: dict[str, Any]) -> Callable[[], Any]:
    from lifelines.utils import concordance_index as ll_c

    return lambda: ll_c(d["t"], -d["risk"], d["e"])


def _sksurv_c(d: dict[str, Any]) -> Callable[[], Any]:
    from sksurv.metrics import concordance_index_censored

    return lambda: concordance_index_censored(d["e"], d["t"], d["risk"])


def _torchsurv_c(d: dict[str, Any]) -> Callable[[], Any]:
    import torch
    from torchsurv.metrics.cindex import ConcordanceIndex

    r = torch.as_tensor(d["risk"])
    ev = torch.as_tensor(d["e"])
    tt = torch.as_tensor(d["t"])
    return lambda: ConcordanceIndex()(r, ev, tt)


def _sksurv_uno(d: dict[str, Any]) -> Callable[[], Any]:
    from sksurv.metrics import concordance_index_ipcw as sk

    y_tr, y_te = to_sksurv(d["train_t"], d["train_e"]), to_sksurv(d["t"], d["e"])
    tau = float(d["times"][-1])
    return lambda: sk(y_tr, y_te, d["risk"], tau=tau)


def _sksurv_auc(d: dict[str, Any]) -> Callable[[], Any]:
    from sksurv.metrics import cumulative_dynamic_auc as sk

    y_tr, y_te = to_sksurv(d["train_t"], d["train_e"]), to_sksurv(d["t"], d["e"])
    return lambda: sk(y_tr, y_te, d["risk"], d["times"])


def _sksurv_ibs(d: dict[str, Any]) -> Callable[[], Any]:
    from sksurv.metrics import integrated_brier_score as sk

    y_tr, y_te = to_sksurv(d["train_t"], d["train_e"]), to_sksurv(d["t"], d["e"])
    return lambda: sk(y_tr, y_te, d["surv"], d["times"])


def table(title: str, rows: list[list[str]], header: list[str]) -> None:
    print(f"\n## {title}")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def fmt(s: float | None) -> str:
    return "-" if s is None else f"{s:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--boot-n", type=int, default=10_000)
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    # warm numba (cache=True: compiled once per machine, loaded afterwards)
    w = data(300)
    t0 = time.perf_counter()
    concordance_index(w["t"], w["e"], w["risk"])
    bootstrap("harrell_c", w["t"], w["e"], w["risk"], n_boot=4, seed=0)
    bootstrap(
        "mean_auc",
        w["t"],
        w["e"],
        w["risk"],
        n_boot=4,
        seed=0,
        times=w["times"],
        train_time=w["train_t"],
        train_event=w["train_e"],
    )
    kw = dict(train_time=w["train_t"], train_event=w["train_e"])
    concordance_index_ipcw(w["t"], w["e"], w["risk"], tau=float(w["times"][-1]), **kw)
    cumulative_dynamic_auc(w["t"], w["e"], w["risk"], w["times"], **kw)
    integrated_brier_score(w["t"], w["e"], w["surv"], w["times"], **kw)
    print(f"numba warm-up (compile or cache load): {time.perf_counter() - t0:.2f} s")
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs")

    suites: dict[str, tuple[Callable[[dict[str, Any]], Callable[[], Any]], list[Peer]]] = {
        "Harrell C": (
            lambda d: lambda: concordance_index(d["t"], d["e"], d["risk"]),
            [
                Peer("numpy.sort", 1.0, lambda d: lambda: np.sort(d["risk"])),
                Peer("lifelines", 1.1, _lifelines_c),
                Peer("sksurv", 2.0, _sksurv_c),
                Peer("torchsurv", 2.0, _torchsurv_c),
            ],
        ),
        "Uno C (tau = 80% event quantile)": (
            lambda d: (
                lambda: concordance_index_ipcw(
                    d["t"],
                    d["e"],
                    d["risk"],
                    train_time=d["train_t"],
                    train_event=d["train_e"],
                    tau=float(d["times"][-1]),
                )
            ),
            [Peer("sksurv", 2.0, _sksurv_uno)],
        ),
        "cumulative/dynamic AUC (10 times)": (
            lambda d: (
                lambda: cumulative_dynamic_auc(
                    d["t"],
                    d["e"],
                    d["risk"],
                    d["times"],
                    train_time=d["train_t"],
                    train_event=d["train_e"],
                )
            ),
            [Peer("sksurv", 1.1, _sksurv_auc)],
        ),
        "integrated Brier score (10 times)": (
            lambda d: (
                lambda: integrated_brier_score(
                    d["t"],
                    d["e"],
                    d["surv"],
                    d["times"],
                    train_time=d["train_t"],
                    train_event=d["train_e"],
                )
            ),
            [Peer("sksurv", 1.1, _sksurv_ibs)],
        ),
    }
    results: dict[str, list[list[str]]] = {k: [] for k in suites}
    for n in args.sizes:
        d = data(n)
        for title, (ours_make, peers) in suites.items():
            ours, ours_cpu, _ = timeit_cpu(ours_make(d), args.repeat)
            row = [f"{n:,}", f"{fmt(ours)} / {fmt(ours_cpu)}"]
            for p in peers:
                s, c, note = p.run(d, args.repeat)
                if s is None or c is None:
                    row.append(note)
                else:
                    row.append(f"{fmt(s)} / {fmt(c)} ({c / ours_cpu:.3g}x)")
            results[title].append(row)
            print(f"n={n:,} {title}: survfuse {ours:.4f} s", flush=True)
    for title, (_, peers) in suites.items():
        header = ["n", "survfuse wall / CPU s"] + [
            f"{p.name} wall / CPU s (CPU ratio)" for p in peers
        ]
        table(title, results[title], header)
    print(
        "\nCPU ratio = peer CPU time / survfuse CPU time (> 1: survfuse faster; for numpy.sort"
        " 1 / ratio is how many sorts of the risks one survfuse Harrell C costs). CPU time is the"
        " process time of all threads, less sensitive than wall time to other jobs on a shared"
        " machine."
    )

    n = args.boot_n
    d = data(n, seed=5)
    rows = []
    for method in ("percentile", "bca"):
        call = functools.partial(
            bootstrap, "harrell_c", d["t"], d["e"], d["risk"], n_boot=1000, seed=0, method=method
        )
        s, c, res = timeit_cpu(call, args.repeat)
        rows.append([f"Harrell C CI, 1,000 resamples ({method})", f"{s:.3f}", f"{c:.3f}", str(res)])
    rng = np.random.default_rng(0)
    models = {f"m{k}": d["risk"] + rng.normal(scale=0.3 * k, size=n) for k in range(7)}
    s, c, cmp = timeit_cpu(
        lambda: compare(models, d["t"], d["e"], reference="m0", n_boot=1000, seed=0), args.repeat
    )
    rows.append(
        [
            "7-model paired comparison, 1,000 resamples",
            f"{s:.3f}",
            f"{c:.3f}",
            f"{cmp.table.height} comparisons, Holm-adjusted",
        ]
    )
    s, c, _ = timeit_cpu(
        lambda: bootstrap(
            "uno_c",
            d["t"],
            d["e"],
            d["risk"],
            n_boot=1000,
            seed=0,
            train_time=d["train_t"],
            train_event=d["train_e"],
            tau=float(d["times"][-1]),
        ),
        args.repeat,
    )
    rows.append(["Uno C CI, 1,000 resamples", f"{s:.3f}", f"{c:.3f}", ""])
    s, c, _ = timeit_cpu(
        lambda: bootstrap(
            "ibs",
            d["t"],
            d["e"],
            d["surv"],
            n_boot=1000,
            seed=0,
            times=d["times"],
            train_time=d["train_t"],
            train_event=d["train_e"],
        ),
        args.repeat,
    )
    rows.append(["IBS CI, 1,000 resamples", f"{s:.3f}", f"{c:.3f}", ""])
    table(
        f"bootstrap at n = {n:,} (targets: Harrell CI <= 1.5 s, 7-model compare <= 10 s)",
        rows,
        ["task", "wall s", "CPU s (all threads)", "result"],
    )
    print(
        f"\nload average at the end: {os.getloadavg()} on {os.cpu_count()} CPUs; "
        f"numba threads: {numba.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
