"""A study at real-cohort scale: foundation-model-size embeddings, the demo's strategies.

A simulated cohort of `--n` patients whose CT and EHR inputs are precomputed embeddings of
published-FM size, generated here with known signal: a few latent factors per modality
(u_ct [4], u_ehr [4], standard normal) are embedded by fixed random projections into a CT pooled
vector of 2,048 dims plus a token grid (`--ct-tokens` tokens of 2,048 dims) and an EHR pooled
vector of 768 dims plus `--ehr-tokens` tokens of 768 dims, each with Gaussian noise
(signal-to-noise set by `--noise`). Two tasks with exponential event times and uniform censoring:

    PE:   log hazard = 0.8 u_ct0 + 0.5 u_ehr0 + 0.4 u_ct1 u_ehr1
    MACE: log hazard = 0.3 u_ct2 + 0.8 u_ehr2

Splits 70 / 15 / 15 (train / validation for early stopping / test). Every strategy of
`examples/demo.yaml` (or `--strategies`) trains with `--seeds` seeds per task; the test split is
scored with Harrell's C of the seed-averaged risk and a percentile interval from `--bootstrap`
subject resamples, next to the oracle C of the true log hazard.

Printed: wall time, CPU time, the process's resident memory after and peak RSS for every stage
(generate, each strategy x task, bootstrap) and the C-index table, so speed is never bought with
accuracy. Mini-batch training (`--batch-size`, default 1,024 at n > 5,000, else full batch)
computes the Cox partial likelihood over each batch's own risk sets (the training loop's
documented approximation).

    .venv/bin/python benchmarks/bench_study_scale.py --n 2000 --seeds 1 --bootstrap 100  # smoke
    .venv/bin/python benchmarks/bench_study_scale.py --n 20000                          # full
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Callable
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


def rss_mb() -> tuple[float, float]:
    """(resident memory now, peak resident memory) of this process, MB."""
    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Wall / CPU seconds and memory per named stage, printed as they finish."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        now, peak = rss_mb()
        row = {
            "stage": name,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0,
            "rss_mb": now,
            "peak_mb": peak,
        }
        self.rows.append(row)
        print(
            f"{name:<34}{row['wall_s']:>9.1f}{row['cpu_s']:>9.1f}{now:>9.0f}{peak:>9.0f}",
            flush=True,
        )
        return out


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
    split = rng.permutation(n)
    n_tr, n_va = int(0.7 * n), int(0.15 * n)
    idx = {"train": split[:n_tr], "val": split[n_tr : n_tr + n_va], "test": split[n_tr + n_va :]}
    return {"features": feats, "outcomes": outcomes, "idx": idx}


def fit_predict(
    data: dict[str, Any], task: str, label: str, seed: int, args: argparse.Namespace
) -> np.ndarray:
    """Train one strategy x seed on the train split (early stopping on validation); test risk."""
    from survfuse.fusion import FusionSurvivalModel

    strategy, params = DEMO[label]
    t, e, _ = data["outcomes"][task]
    idx = data["idx"]
    sel = {k: {m: f.select(i) for m, f in data["features"].items()} for k, i in idx.items()}
    model = FusionSurvivalModel(
        strategy,
        strategy_params=params,
        seed=seed,
        device=args.device,
        max_epochs=args.max_epochs,
        patience=args.patience,
        lr=3e-3,
        weight_decay=1e-4,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    tr, va = idx["train"], idx["val"]
    model.fit(sel["train"], t[tr], e[tr], validation=(sel["val"], t[va], e[va]))
    return np.asarray(model.predict(sel["test"]), dtype=np.float64)


def bootstrap_c(
    time_: np.ndarray, event: np.ndarray, risk: np.ndarray, b: int, seed: int
) -> tuple[float, float, float]:
    """Harrell's C and its percentile 95% interval over `b` subject resamples."""
    from survfuse.metrics.concordance import concordance_index

    def c(i: Any) -> float:
        return float(concordance_index(time_[i], event[i], risk[i]).estimate)

    rng = np.random.default_rng(seed)
    n = len(time_)
    reps = [c(rng.integers(0, n, n)) for _ in range(b)]
    lo, hi = np.percentile(reps, [2.5, 97.5]) if b else (np.nan, np.nan)
    return c(np.arange(n)), float(lo), float(hi)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--strategies", default=",".join(DEMO))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--ct-tokens", type=int, default=8, help="CT token grid (2 x 2 x 2)")
    ap.add_argument("--ehr-tokens", type=int, default=16)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sim-seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.batch_size is None and args.n > 5000:
        args.batch_size = 1024
    labels = args.strategies.split(",")
    unknown = sorted(set(labels) - set(DEMO))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {sorted(DEMO)}")
    import torch

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(
        f"n={args.n:,}, CT 2048-d + {args.ct_tokens} tokens, EHR 768-d + {args.ehr_tokens} "
        f"tokens, {args.seeds} seeds, {args.bootstrap} resamples, batch {args.batch_size}, "
        f"{args.threads} threads, device {args.device}; load average {load:.1f} at start"
    )
    print(f"{'stage':<34}{'wall s':>9}{'CPU s':>9}{'RSS MB':>9}{'peak MB':>9}")
    st = Stages()
    start = time.perf_counter()
    data = st.run("generate embeddings", lambda: simulate(args))
    results = []
    for task in args.tasks.split(","):
        t, e, lp = data["outcomes"][task]
        te = data["idx"]["test"]
        oracle = st.run(
            f"{task} oracle bootstrap",
            lambda t=t, e=e, lp=lp, te=te: bootstrap_c(t[te], e[te], lp[te], args.bootstrap, 0),
        )
        results.append((task, "oracle (true log hazard)", oracle, []))
        for label in labels:
            risks = [
                st.run(
                    f"{task} {label} seed {s}",
                    lambda label=label, s=s, task=task: fit_predict(data, task, label, s, args),
                )
                for s in range(args.seeds)
            ]
            per_seed = [bootstrap_c(t[te], e[te], r, 0, 0)[0] for r in risks]
            z = np.mean([(r - r.mean()) / max(r.std(), 1e-12) for r in risks], axis=0)
            ci = st.run(
                f"{task} {label} bootstrap",
                lambda t=t, e=e, te=te, z=z: bootstrap_c(t[te], e[te], z, args.bootstrap, 0),
            )
            results.append((task, label, ci, per_seed))
    wall = time.perf_counter() - start
    print(f"\ntotal wall {wall / 60:.1f} min, CPU {time.process_time() / 60:.1f} min, "
          f"peak RSS {rss_mb()[1] / 1024:.2f} GB (targets at n = 20,000: <= 60 min, <= 8 GB)")  # fmt: skip
    print(f"\n{'task':<6}{'model':<26}{'test C':>8}{'95% CI':>17}  per-seed C")
    for task, label, (c, lo, hi), per_seed in results:
        seeds = " ".join(f"{v:.3f}" for v in per_seed)
        print(f"{task:<6}{label:<26}{c:>8.3f}   [{lo:.3f}, {hi:.3f}]  {seeds}")


if __name__ == "__main__":
    sys.exit(main())
