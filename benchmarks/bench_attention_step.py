"""CPU time of one attention training step with and without token buckets (issue 25).

The cohort of `bench_fusion.py` (n patients, 15% held out, the rest one full batch: 64 CT
tokens, 256 EHR token slots of which a third are padding). After one epoch of training, the same
module runs forward + Cox loss + backward on the training batch `--reps` times per variant, the
variants alternating for `--rounds` rounds: `padded` (the strategy's fuse on the padded batch,
as before issue 25) and `buckets` (`survfuse.fusion.buckets.fuse_in_buckets`, the default).
Prints CPU and wall seconds per step and the ratio buckets / padded of each round.

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


def step_seconds(module: Any, batch: Any, t: Any, e: Any, reps: int, padded: bool) -> tuple:
    cls = type(module)
    bucketed = cls.fuse
    if padded:
        cls.fuse = cls._fuse
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
        f"{'strategy':16s} {'round':>5s} {'padded CPU s':>12s} {'buckets CPU s':>13s} "
        f"{'ratio':>6s} {'padded wall s':>13s} {'buckets wall s':>14s}"
    )
    for strategy in args.strategies.split(","):
        module, batch, t, e = setup(strategy, args.n)
        for r in range(args.rounds):
            pc, pw = step_seconds(module, batch, t, e, args.reps, padded=True)
            bc, bw = step_seconds(module, batch, t, e, args.reps, padded=False)
            print(
                f"{strategy:16s} {r:>5d} {pc:>12.3f} {bc:>13.3f} {bc / pc:>6.2f} "
                f"{pw:>13.3f} {bw:>14.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
