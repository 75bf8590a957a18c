"""External sites: does per-site harmonisation keep the image signal on the external site?

For fresh simulator seeds (printed; pass --sim-seeds to repeat) at site shift 1 and 2, with
imbalance w cycling over --imbalance (one w per seed), simulate a cohort (sites A, B
development, C external), encode it once (shared feature store) and run a reduced study once
per CT intensity calibration (`--hu-calibration`: `none` and/or `landmarks`, the
`CTPreprocessing.hu_calibration` of `ct_radiomics`, each volume's lung peak moved to -850 HU)
and per harmonisation method of the CT features (`none`; `site_standardise` and `combat` with
every site adjusted, and with the development sites as the unchanged reference). Prints, per
setting x task x calibration x method, on the external site (and internal test):

- the oracle C, the image-only and the EHR-only oracle C (simulator truth);
- CT-only C (best of the linear and deep CT-only models, chosen on validation), EHR-only C,
  the linear concatenation's C, the best model chosen on validation and its C, and that model's
  calibration slope and intercept at the calibration horizon;
- the done-when checks: CT-only keeps >= 80% of the image-only oracle's margin above 0.5; the
  best model within 0.05 of the oracle; its calibration slope within [0.8, 1.2].

    .venv/bin/python benchmarks/external_sites.py --out /tmp/external_sites \
        [--n 2500] [--site-shift 1,2] [--imbalance 0.25,0.75] [--replicates 2] \
        [--sim-seeds 11,12] [--methods none,site_standardise,combat] [--max-epochs 60] \
        [--hu-calibration none,landmarks]

Writes OUT/external_sites.csv (one row per setting x seed x method x task x split x model).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

import polars as pl
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_generalisation import oracle_c

from survfuse.experiment.config_load import parse_config
from survfuse.experiment.rundir import RunDir
from survfuse.experiment.runner import run_experiment
from survfuse.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("internal_test", "external_test")
STRATEGIES: list[dict[str, Any]] = [
    {"name": "linear", "modality": "ct"},
    {"name": "linear", "modality": "ehr"},
    {"name": "linear"},
    {"name": "unimodal", "modality": "ct"},
    {"name": "unimodal", "modality": "ehr"},
    {"name": "concat"},
    {"name": "late"},
]


def study(
    data: Path,
    store: Path,
    method: str,
    max_epochs: int,
    bootstrap: int,
    hu_calibration: str = "none",
) -> Any:
    """The demo study reduced to ct_radiomics + ehr_onehot, `STRATEGIES`, one seed;
    `method` is `name` (every site adjusted) or `name/development` (development sites are the
    reference and stay as encoded); `hu_calibration` is ct_radiomics' preprocessing option."""
    raw = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    raw["data"] = {
        "cohort": str(data / "cohort.parquet"),
        "ct_index": str(data / "ct_index.parquet"),
        "meds_root": str(data / "meds"),
    }
    raw["encoders"]["ehr"] = [e for e in raw["encoders"]["ehr"] if e["name"] == "ehr_onehot"]
    if hu_calibration != "none":  # "none" leaves the config (and its store key) as before
        for enc in raw["encoders"]["ct"]:
            prep = enc.setdefault("params", {}).setdefault("preprocessing", {})
            prep["hu_calibration"] = hu_calibration
    raw["strategies"] = STRATEGIES
    raw["seeds"] = [0]
    raw["training"].update(max_epochs=max_epochs, threads=1)
    raw["evaluation"].update(
        metrics=["harrell_c", "calibration"], bootstrap=bootstrap, horizons=[365]
    )
    raw["workers"] = 1
    raw["feature_store"] = str(store)
    name, _, reference = method.partition("/")
    raw["harmonise"] = {"method": name, "modalities": ["ct"], "reference": reference or "all"}
    return parse_config(raw, source="external_sites")


def rows_of(run: RunDir, data: Path, setting: dict[str, Any]) -> list[dict[str, Any]]:
    m = pl.read_parquet(run.metrics)
    out = []
    for task in m["task"].unique().sort().to_list():
        orc = oracle_c(run, data, task)
        part = m.filter(pl.col("task") == task)
        wide = part.filter(pl.col("metric").is_in(["harrell_c", "cal_slope", "cal_intercept"]))
        for r in wide.iter_rows(named=True):
            out.append(
                {
                    **setting,
                    "task": task,
                    "split": r["split"],
                    "model": r["model"],
                    "metric": r["metric"],
                    "value": r["estimate"],
                    **{k: orc.get((r["split"], k)) for k in ("oracle", "image_oracle", "ehr_oracle")},
                }
            )  # fmt: skip
    return out


def summarise(table: pl.DataFrame) -> pl.DataFrame:
    """Per setting x seed x method x task x test split: the columns of the module docstring."""
    keys = ["site_shift", "imbalance", "sim_seed", "hu_calibration", "method", "task"]
    out = []
    for key, part in table.group_by(keys, maintain_order=True):
        c = part.filter(pl.col("metric") == "harrell_c")
        val = c.filter(pl.col("split") == "validation")
        pick = dict(zip(val["model"], val["value"], strict=True))

        def best(models: list[str], pick: dict[str, float] = pick) -> str:
            return max(models, key=lambda m: pick.get(m, float("-inf")))

        models = list(pick)
        ct = best([k for k in models if "+" not in k and "ct_radiomics" in k])
        ehr = best([k for k in models if "+" not in k and "ehr_" in k])
        top = best(models)
        for split in SPLITS:
            p = part.filter(pl.col("split") == split)
            if not p.height:
                continue
            v = {(r["model"], r["metric"]): r["value"] for r in p.iter_rows(named=True)}
            first = p.row(0, named=True)
            img = first["image_oracle"]
            out.append(
                {
                    **dict(zip(keys, key, strict=True)),
                    "split": split,
                    "oracle": first["oracle"],
                    "image_oracle": img,
                    "ehr_oracle": first["ehr_oracle"],
                    "ct_only": v.get((ct, "harrell_c")),
                    "ehr_only": v.get((ehr, "harrell_c")),
                    "linear": v.get(("linear[ct_radiomics+ehr_onehot]/cox", "harrell_c")),
                    "best_model": top,
                    "best_c": v.get((top, "harrell_c")),
                    "best_slope": v.get((top, "cal_slope")),
                    "best_intercept": v.get((top, "cal_intercept")),
                    "ct_keeps_80pct": v.get((ct, "harrell_c"), 0.0) - 0.5 >= 0.8 * (img - 0.5),
                    "best_within_005": first["oracle"] - v.get((top, "harrell_c"), 0.0) <= 0.05,
                    "slope_ok": 0.8 <= (v.get((top, "cal_slope")) or 0.0) <= 1.2,
                }
            )
    return pl.DataFrame(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--site-shift", default="1,2")
    ap.add_argument("--imbalance", default="0.25,0.75")
    ap.add_argument("--replicates", type=int, default=2)
    ap.add_argument("--sim-seeds", default=None)
    ap.add_argument(
        "--methods",
        default="none,site_standardise,combat,site_standardise/development,combat/development",
    )
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--bootstrap", type=int, default=20)
    ap.add_argument("--shape", default="64,64,40")
    ap.add_argument("--hu-calibration", default="none", help="comma list of none, landmarks")
    args = ap.parse_args()
    seeds = (
        [int(s) for s in args.sim_seeds.split(",")]
        if args.sim_seeds
        else random.SystemRandom().sample(range(1000, 10**6), args.replicates)
    )
    print(f"simulator seeds: {','.join(map(str, seeds))} (repeat with --sim-seeds)", flush=True)
    ws = [float(w) for w in args.imbalance.split(",")]
    shape = tuple(int(v) for v in args.shape.split(","))
    rows: list[dict[str, Any]] = []
    for shift in (float(s) for s in args.site_shift.split(",")):
        for i, seed in enumerate(seeds):
            w = ws[i % len(ws)]
            name = f"s{shift:g}_w{w:g}_sim{seed}"
            data = args.out / "data" / name
            if not (data / "dataset.json").exists():
                simulate(data, n=args.n, seed=seed, imbalance=w, interaction=0.0,
                         site_shift=shift, shape=shape, progress=False)  # fmt: skip
            for cal, method in product(args.hu_calibration.split(","), args.methods.split(",")):
                t0 = time.perf_counter()
                store = args.out / "store" / name
                cfg = study(data, store, method, args.max_epochs, args.bootstrap, cal)
                folder = args.out / "runs" / name / cal / method.replace("/", "@")
                res = run_experiment(cfg, folder, progress=False)
                setting = {"site_shift": shift, "imbalance": w, "sim_seed": seed,
                           "hu_calibration": cal, "method": method}  # fmt: skip
                rows += rows_of(RunDir(res.run_dir), data, setting)
                print(f"{name} {cal} {method}: {time.perf_counter() - t0:.0f} s", flush=True)
            table = pl.DataFrame(rows)
            table.write_csv(args.out / "external_sites.csv")
    summary = summarise(pl.DataFrame(rows))
    summary.write_csv(args.out / "summary.csv")
    with pl.Config(tbl_rows=200, tbl_cols=30, tbl_width_chars=250, float_precision=3):
        print(summary.drop("best_model"))
        ids = ["site_shift", "sim_seed", "hu_calibration", "method", "task", "split"]
        print(summary.select([*ids, "best_model"]))


if __name__ == "__main__":
    main()
