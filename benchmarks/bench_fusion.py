"""Training time per epoch and peak RSS of every fusion strategy (issue 9).

Synthetic `ModalityFeatures` (survfuse.fusion.synthetic): CT with 64 dense tokens (dim 32),
EHR with 256 sparse code tokens (4 codes each, vocabulary 1,000). Each (strategy, n) runs in a
fresh subprocess so its peak RSS (ru_maxrss) is its own. At n <= 5,000 the model trains to early
stopping (15% validation, max 100 epochs, patience 10) and the wall time to stop is reported
(target: <= 30 s at 3,000 patients on 2 cores for the attention strategies); larger n run
`--epochs-large` epochs. `--offsets none,linear` runs each strategy without and with
`strategy_params={"offset": "linear"}` (training starts at the elastic-net Cox). Accuracy:
the best validation C and Harrell's C on an independent test cohort of 1,000 patients
(`synthetic_features(seed=seed + 1)`, same signal); `--seed` is the training cohort's data seed
(default 0; the split and the model seed stay 0). `--threads` sets the benchmark process's torch
threads; the model trains with its own `threads` option (default 1), which `--options` sets
(JSON training options, ';' between configurations, each run in turn for every strategy).

Peer, in the same subprocess and on the same pooled features: an MLP with torchsurv's Cox loss
(`torchsurv.loss.cox.neg_partial_log_likelihood`), full batch, same epochs as survfuse `concat`;
the table gives survfuse's time per epoch / the peer's.

    .venv/bin/python benchmarks/bench_fusion.py --n 3000,30000 --threads 2
    .venv/bin/python benchmarks/bench_fusion.py --n 3000 --strategies cross_attention \
        --offsets none,linear --options '{};{"threads": 2}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "unimodal_ct": ("unimodal", {"modality": "ct"}),
    "unimodal_ehr": ("unimodal", {"modality": "ehr"}),
    "concat": ("concat", {}),
    "late": ("late", {}),
    "contrastive": ("contrastive", {}),
    "cross_attention": ("cross_attention", {}),
    "co_attention": ("co_attention", {}),
}


def peer_epoch_seconds(feats: Any, time_: np.ndarray, event: np.ndarray, epochs: int) -> float:
    """torchsurv Cox loss + a torch MLP on the concatenated pooled features, full batch."""
    import torch
    from torchsurv.loss.cox import neg_partial_log_likelihood

    x = torch.from_numpy(np.concatenate([feats["ct"].pooled, feats["ehr"].pooled], 1))
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 32), torch.nn.GELU(), torch.nn.Linear(32, 1)
    )
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    ev = torch.from_numpy(event)
    tt = torch.from_numpy(time_)
    started = time.perf_counter()
    for _ in range(epochs):
        opt.zero_grad()
        neg_partial_log_likelihood(net(x), ev, tt).backward()
        opt.step()
    return (time.perf_counter() - started) / max(epochs, 1)


def cohort(n: int, seed: int) -> Any:
    from survfuse.fusion.synthetic import synthetic_features

    return synthetic_features(
        n,
        seed=seed,
        ct_tokens=64,
        ct_dim=32,
        ehr_tokens=256,
        codes_per_token=4,
        vocab_size=1000,
        p_missing_ct=0.1,
        p_missing_ehr=0.1,
    )


def child(
    name: str,
    n: int,
    epochs_large: int,
    threads: int,
    offset: str,
    options: dict[str, Any],
    seed: int = 0,
) -> None:
    import torch

    from survfuse.fusion import FusionSurvivalModel
    from survfuse.metrics import concordance_index

    torch.set_num_threads(threads)
    data = cohort(n, seed=seed)
    rng = np.random.default_rng(0)
    val = np.zeros(n, bool)
    val[rng.permutation(n)[: int(0.15 * n)]] = True
    tr = {m: f.select(~val) for m, f in data.features.items()}
    va = {m: f.select(val) for m, f in data.features.items()}
    small = n <= 5000
    strategy, params = STRATEGIES[name]
    if offset != "none":
        params = {**params, "offset": offset}
    model = FusionSurvivalModel(
        strategy,
        strategy_params=params,
        seed=0,
        device="cpu",
        max_epochs=100 if small else epochs_large,
        patience=10,
        **options,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    model.fit(
        tr, data.time[~val], data.event[~val], validation=(va, data.time[val], data.event[val])
    )
    total = time.perf_counter() - started
    total_cpu = time.process_time() - cpu_started
    test = cohort(1000, seed=seed + 1)
    test_risk = model.predict(test.features)
    test_c = concordance_index(test.time, test.event, test_risk).estimate
    per_epoch = float(np.median([h["seconds"] for h in model.history_]))
    peer = None
    if name == "concat":
        peer = peer_epoch_seconds(tr, data.time[~val], data.event[~val], len(model.history_))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(
        json.dumps(
            {
                "strategy": name,
                "offset": offset,
                "options": options,
                "n": n,
                "seed": seed,
                "epochs": len(model.history_),
                "sec_per_epoch": per_epoch,
                "fit_seconds": total,
                "fit_cpu_seconds": total_cpu,
                "peak_rss_mb": rss,
                "peer_sec_per_epoch": peer,
                "best_epoch": model.best_epoch_,
                "best_val_c": max(h.get("val_c_index", float("nan")) for h in model.history_),
                "test_c": test_c,
                # bit-identity of a speed-up: the test risks' bytes and the epochs' val C
                "test_risk_sha": hashlib.sha256(test_risk.tobytes()).hexdigest()[:16],
                "val_c_history": [h.get("val_c_index") for h in model.history_],
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", default="3000,30000")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--epochs-large", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="data seed (test cohort: seed + 1)")
    p.add_argument("--offsets", default="none", help="comma list of none / linear")
    p.add_argument(
        "--options",
        default="{}",
        help="training options as JSON, ';'-separated for several runs of each strategy, "
        "e.g. '{};{\"threads\": 2}' (the model trains with `threads`, default 1, whatever "
        "--threads sets for the benchmark process)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per (strategy, n)")
    p.add_argument("--child", nargs=4, metavar=("STRATEGY", "N", "OFFSET", "OPTIONS"))
    args = p.parse_args()
    if args.child:
        name, n, offset, options = args.child
        child(name, int(n), args.epochs_large, args.threads, offset, json.loads(options), args.seed)
        return
    # compile the numba concordance kernels into their on-disk cache once, before any timing:
    # a fresh checkout otherwise compiles them inside the first run's fit (several CPU seconds
    # that every later process loads from the cache instead; docs/benchmarks.md, session 7)
    from survfuse.metrics import concordance_index

    concordance_index([1.0, 2.0, 3.0], [True, True, False], [3.0, 2.0, 1.0])
    rows = []
    runs = [
        (n, name, offset, options)
        for n in [int(v) for v in args.n.split(",")]
        for name in args.strategies.split(",")
        for offset in args.offsets.split(",")
        for options in args.options.split(";")
    ]
    for n, name, offset, options in runs:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            str(n),
            offset,
            options,
            "--epochs-large",
            str(args.epochs_large),
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
        ]
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.timeout, check=True
            )
            row = json.loads(res.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            row = {"strategy": name, "offset": offset, "n": n, "timeout": args.timeout}
            row["options"] = json.loads(options)
        except subprocess.CalledProcessError as err:
            row = {
                "strategy": name,
                "offset": offset,
                "options": json.loads(options),
                "n": n,
                "error": err.stderr.strip().splitlines()[-1],
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n{'strategy':16s} {'offset':6s} {'options':22s} {'n':>6s} {'seed':>4s} {'epochs':>6s} "
        f"{'best':>4s} {'s/epoch':>8s} {'fit s':>7s} {'CPU s':>7s} {'peak MB':>7s} {'val C':>6s} "
        f"{'test C':>6s} {'vs torchsurv MLP':>16s}"
    )
    for r in rows:
        opts = json.dumps(r["options"], separators=(",", ":"))
        if "sec_per_epoch" not in r:
            why = "timeout" if "timeout" in r else r.get("error")
            print(f"{r['strategy']:16s} {r['offset']:6s} {opts:22s} {r['n']:>6d}  {why}")
            continue
        ratio = (
            f"{r['sec_per_epoch'] / r['peer_sec_per_epoch']:.1f}x"
            if r["peer_sec_per_epoch"]
            else ""
        )
        print(
            f"{r['strategy']:16s} {r['offset']:6s} {opts:22s} {r['n']:>6d} "
            f"{r.get('seed', 0):>4d} {r['epochs']:>6d} {r['best_epoch']:>4d} "
            f"{r['sec_per_epoch']:>8.3f} {r['fit_seconds']:>7.1f} "
            f"{r['fit_cpu_seconds']:>7.1f} {r['peak_rss_mb']:>7.0f} {r['best_val_c']:>6.3f} "
            f"{r['test_c']:>6.3f} {ratio:>16s}"
        )


if __name__ == "__main__":
    main()
