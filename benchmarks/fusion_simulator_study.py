"""Fusion strategies vs unimodal baselines on the survfuse simulator (issue 9 done-when).

For each imbalance w and seed: simulate a cohort (`survfuse.simulate.simulate`), split it
per subject (external site C held out), encode CT with `ct_radiomics` and EHR with `ehr_onehot`
(both fitted on the training split), train every strategy with `FusionSurvivalModel` (early
stopping on the validation C-index) and score Harrell's C on the internal test split with a
percentile bootstrap CI (subjects resampled; one row per subject here).

    .venv/bin/python benchmarks/fusion_simulator_study.py --n 3000 --seeds 0,1,2 \
        --imbalance 0.5,1 --interaction 0.3 --out /tmp/fusion_study

Prints one table per imbalance (mean C over seeds, the seeds' pooled bootstrap CI) and writes
`results.csv` (one row per imbalance x seed x model) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from survfuse.data.meds import MEDSDataset
from survfuse.data.splits import attach_splits, make_splits
from survfuse.encoders.base import CTSource
from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder
from survfuse.encoders.ehr_onehot import EHROneHotEncoder
from survfuse.features import ModalityFeatures
from survfuse.fusion import FusionSurvivalModel
from survfuse.metrics import concordance_index
from survfuse.simulate import simulate

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "ct_only": ("unimodal", {"modality": "ct"}),
    "ehr_only": ("unimodal", {"modality": "ehr"}),
    "concat": ("concat", {}),
    "late": ("late", {}),
    "late_stacking": ("late", {"combine": "stacking"}),
    "contrastive": ("contrastive", {}),
    "cross_attention": ("cross_attention", {}),
    "co_attention": ("co_attention", {}),
}
UNIMODAL = ("ct_only", "ehr_only")


def bootstrap_c(
    time_: np.ndarray, event: np.ndarray, risk: np.ndarray, *, n_boot: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = time_.shape[0]
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        out.append(concordance_index(time_[idx], event[idx], risk[idx]).estimate)
    return np.asarray(out)


def encode(
    root: Path, seed: int, ct_pooled: str = "volume+cells", ct_grid: tuple[int, ...] = (2, 2, 2)
) -> tuple[pl.DataFrame, dict[str, ModalityFeatures]]:
    cohort = pl.read_parquet(root / "cohort.parquet")
    splits = make_splits(cohort, external_sites=("C",), seed=seed)
    df = attach_splits(cohort, splits)
    train = df.filter(pl.col("split") == "train")
    keys = df.select("subject_id", "prediction_time")
    grid = "x".join(map(str, ct_grid))
    tag = {"ct": f"ct_{ct_pooled.replace('+', '_')}_{grid}", "ehr": "ehr"}
    cache = {m: root / f"features_{tag[m]}_split{seed}" for m in ("ct", "ehr")}
    if all((p / "meta.json").exists() for p in cache.values()):
        return df, {m: ModalityFeatures.load(p, mmap=False) for m, p in cache.items()}
    ct_src = CTSource.from_index(root / "ct_index.parquet")
    meds = MEDSDataset(root / "meds")
    ct_enc = CTRadiomicsEncoder(pooled=ct_pooled, grid=ct_grid).fit(train, ct_src)
    ehr_enc = EHROneHotEncoder().fit(train, meds)
    feats = {"ct": ct_enc.encode(keys, ct_src), "ehr": ehr_enc.encode(keys, meds)}
    for m, p in cache.items():  # encoders are fitted on this split's training rows
        feats[m].save(p)
    return df, feats


def run(args: argparse.Namespace) -> pl.DataFrame:
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for w in args.imbalance:
        for seed in args.seeds:
            root = out / f"sim_w{w}_s{seed}"
            t0 = time.perf_counter()
            if not (root / "dataset.json").exists():
                simulate(
                    root,
                    n=args.n,
                    seed=seed,
                    imbalance=w,
                    interaction=args.interaction,
                    progress=False,
                )
            df, feats = encode(root, seed, args.ct_pooled, args.ct_grid)
            t_prep = time.perf_counter() - t0
            split = df["split"].to_numpy()
            tt = df["time"].to_numpy().astype(np.float64)
            ee = df["event"].to_numpy().astype(bool)
            part = {s: np.flatnonzero(split == s) for s in ("train", "validation", "internal_test")}
            sel = {s: {m: f.select(i) for m, f in feats.items()} for s, i in part.items()}
            for name in args.models:
                strategy, params = MODELS[name]
                t1 = time.perf_counter()
                model = FusionSurvivalModel(
                    strategy,
                    strategy_params=params,
                    seed=seed,
                    max_epochs=args.max_epochs,
                    patience=args.patience,
                    lr=args.lr,
                    weight_decay=args.weight_decay,
                    device="cpu",
                    **args.fit_kwargs,
                )
                tr, va, te = part["train"], part["validation"], part["internal_test"]
                model.fit(
                    sel["train"], tt[tr], ee[tr], validation=(sel["validation"], tt[va], ee[va])
                )
                risk = model.predict_risk(sel["internal_test"])
                c = concordance_index(tt[te], ee[te], risk).estimate
                boot = bootstrap_c(tt[te], ee[te], risk, n_boot=args.n_boot, seed=seed)
                rows.append(
                    {
                        "imbalance": w,
                        "seed": seed,
                        "model": name,
                        "c_index": c,
                        "ci_low": float(np.quantile(boot, 0.025)),
                        "ci_high": float(np.quantile(boot, 0.975)),
                        "epochs": len(model.history_),
                        "fit_s": time.perf_counter() - t1,
                        "prep_s": t_prep,
                        "n_test": int(te.size),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            pl.DataFrame(rows).write_csv(out / "results.csv")
    return pl.DataFrame(rows)


def summarise(res: pl.DataFrame) -> None:
    for w in res["imbalance"].unique().sort():
        sub = res.filter(pl.col("imbalance") == w)
        table = (
            sub.group_by("model")
            .agg(
                pl.col("c_index").mean().alias("mean_c"),
                pl.col("ci_low").mean().alias("mean_ci_low"),
                pl.col("ci_high").mean().alias("mean_ci_high"),
                pl.col("c_index").alias("per_seed"),
            )
            .sort("mean_c", descending=True)
        )
        per_seed_best_uni = (
            sub.filter(pl.col("model").is_in(UNIMODAL))
            .group_by("seed")
            .agg(pl.col("c_index").max().alias("best_uni"))
        )
        print(f"\nimbalance {w}: internal-test Harrell C (mean over seeds; mean 95% bootstrap CI)")
        for r in table.iter_rows(named=True):
            seeds = ", ".join(f"{v:.3f}" for v in r["per_seed"])
            print(
                f"  {r['model']:16s} {r['mean_c']:.4f} [{r['mean_ci_low']:.3f}, "
                f"{r['mean_ci_high']:.3f}]  seeds: {seeds}"
            )
        best_uni = float(per_seed_best_uni["best_uni"].mean())
        ct = float(sub.filter(pl.col("model") == "ct_only")["c_index"].mean())
        print(f"  best unimodal per seed (mean): {best_uni:.4f}; ct_only mean: {ct:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument(
        "--imbalance", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0]
    )
    p.add_argument("--interaction", type=float, default=0.3)
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument(
        "--ct-pooled",
        default="volume+cells",
        help="ct_radiomics pooled vector: volume (whole-volume statistics) or volume+cells",
    )
    p.add_argument(
        "--ct-grid",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=(2, 2, 2),
        help="ct_radiomics grid (tokens = cells), as in examples/demo.yaml",
    )
    p.add_argument(
        "--fit-kwargs",
        type=json.loads,
        default={},
        help="extra FusionSurvivalModel arguments as JSON, e.g. '{\"modality_dropout\": 0.2}'",
    )
    p.add_argument("--out", default="/tmp/fusion_study")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument(
        "--summarise-only", action="store_true", help="print tables of --out/results.csv"
    )
    args = p.parse_args()
    if args.summarise_only:
        summarise(pl.read_csv(Path(args.out) / "results.csv"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    summarise(run(args))


if __name__ == "__main__":
    main()
