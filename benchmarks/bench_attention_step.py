"""CPU time of one attention training step: padded, token buckets, prepared batch (issue 25).

The cohort of `bench_fusion.py` (n patients, 15% held out, the rest one full batch: 64 CT
tokens, 256 EHR token slots of which a third are padding). After one epoch of training, the same
module runs forward + Cox loss + backward on the training batch `--reps` times per variant, the
variants alternating for `--rounds` rounds: `padded` (the strategy's fuse on the padded batch,
as before issue 25), `buckets` (`survfuse.fusion.buckets.fuse_in_buckets` on a plain batch:
normalised, sorted and sliced again at every step, codes through `nn.EmbeddingBag`) and
`prepared` (`module.prepare(batch)` once, as the estimator trains: buckets and embedding-bag
matrices reused). Prints CPU and wall seconds per step and each variant's ratio to `padded`.

    .venv/bin/python benchmarks/bench_attention_step.py --strategies cross_attention,co_attention
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def setup(strategy: str, n: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_fusion import cohort

    from survfuse.fusion import FusionSurvivalModel
    from survfuse.fusion.batch import to_batch

    data = cohort(n, seed=0)
    val = np.zeros(n, bool)
    val[np.random.default_rng(0).permutation(n)[: int(0.15 * n)]] = True
    tr = {m: f.select(~val) for m, f in data.features.items()}
    model = FusionSurvivalModel(strategy, seed=0, device="cpu", max_epochs=1)
    model.fit(tr, data.time[~val], data.event[~val])
    module = model.module_
    module.train()
    batch = to_batch(tr, modalities=module.modalities, with_tokens=True)
    return module, batch, torch.as_tensor(data.time[~val]), torch.as_tensor(data.event[~val])


VARIANTS = ("padded", "buckets", "prepared")


def step_seconds(module: Any, batch: Any, t: Any, e: Any, reps: int, variant: str) -> tuple:
    cls = type(module)
    bucketed = cls.fuse
    if variant == "padded":
        cls.fuse = cls._fuse
    if variant == "prepared":
        batch = module.prepare(batch)  # once, outside the timing, as the estimator does
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(reps):
            loss = module.loss(module(batch), t, e)
            module.zero_grad()
            loss.backward()
        return (time.process_time() - cpu) / reps, (time.perf_counter() - wall) / reps
    finally:
        cls.fuse = bucketed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--strategies", default="cross_attention,co_attention")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{'strategy':16s} {'round':>5s} "
        + " ".join(f"{v + ' CPU s':>12s}" for v in VARIANTS)
        + " "
        + " ".join(f"{v + ' / padded':>18s}" for v in VARIANTS[1:])
        + " "
        + " ".join(f"{v + ' wall s':>13s}" for v in VARIANTS)
    )
    for strategy in args.strategies.split(","):
        module, batch, t, e = setup(strategy, args.n)
        for r in range(args.rounds):
            res = {v: step_seconds(module, batch, t, e, args.reps, v) for v in VARIANTS}
            cpu = {v: res[v][0] for v in VARIANTS}
            print(
                f"{strategy:16s} {r:>5d} "
                + " ".join(f"{cpu[v]:>12.3f}" for v in VARIANTS)
                + " "
                + " ".join(f"{cpu[v] / cpu['padded']:>18.2f}" for v in VARIANTS[1:])
                + " "
                + " ".join(f"{res[v][1]:>13.3f}" for v in VARIANTS),
                flush=True,
            )


if __name__ == "__main__":
    main()
