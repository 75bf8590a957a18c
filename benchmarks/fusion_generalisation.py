"""A hold-out study survfuse was not tuned on: how far is each model from the simulator's oracle?

For every setting of a grid (imbalance w x interaction x site shift) and for simulator seeds
drawn at random on each run (printed; pass --sim-seeds to repeat a run), simulate a cohort,
run the study of a base config (default `examples/demo.yaml`, reduced with the flags below) and
report per task x split:

- the oracle C (Harrell's C of the true log-hazard on that split), the image-only oracle C (the
  image part of the log-hazard) and the EHR-only oracle C (EHR part + age, which the EHR holds);
- every model's Harrell C with its 95% bootstrap CI (`metrics.parquet`);
- the best model (chosen on validation, as a user would) and its gap to the oracle;
- how many fusions fall more than 0.01 below the best unimodal model (token and linear
  baselines included);
- every modality that branch stopping dropped, with that modality's oracle C.

    .venv/bin/python benchmarks/fusion_generalisation.py --out /tmp/fusion_gen \
        [--n 2500] [--imbalance 0.25,0.5,0.75,1] [--interaction 0,0.5] [--site-shift 1,2] \
        [--replicates 2] [--sim-seeds 11,12] [--seeds 1] [--bootstrap 200] \
        [--strategies ...] [--ehr-encoders ehr_onehot] [--max-epochs 100]

Writes `OUT/generalisation.csv` (one row per setting x seed x task x split x model) and
`OUT/drops.csv`, and prints the summary (mean over seeds per setting, task and split) and the
issue's done-when checks. `--summarise OUT1,OUT2` prints them for runs already made (e.g. two
halves of the grid), without simulating or training.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import polars as pl

from survfuse.data.cohort import outcome_columns
from survfuse.experiment.config import ExperimentConfig
from survfuse.experiment.grid import model_key
from survfuse.experiment.rundir import RunDir
from survfuse.experiment.runner import run_experiment
from survfuse.experiment.sweep import sweep_config
from survfuse.metrics import concordance_index
from survfuse.metrics.paired import paired_concordance
from survfuse.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]
TEST_SPLITS = ("internal_test", "external_test")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    return float(concordance_index(time, event, risk).estimate)


def oracle_c(run: RunDir, data: Path, task: str) -> dict[tuple[str, str], float]:
    """(split, oracle | image_oracle | ehr_oracle) -> Harrell C of the true parts."""
    cohort = pl.read_parquet(run.cohort)
    oracle = pl.read_parquet(data / "oracle.parquet")
    df = cohort.join(oracle, on=["subject_id", "prediction_time"], how="left")
    tcol, ecol = outcome_columns(task)
    parts = {
        "oracle": df[f"{task}_log_hazard"].to_numpy(),
        "image_oracle": df[f"{task}_image"].to_numpy(),
        "ehr_oracle": (df[f"{task}_ehr"] + df[f"{task}_shared"]).to_numpy(),
    }
    out = {}
    for split in ("validation", *TEST_SPLITS):
        rows = (df["split"] == split).to_numpy()
        if rows.sum() < 2:
            continue
        t, e = df[tcol].to_numpy()[rows], df[ecol].to_numpy()[rows].astype(bool)
        for name, risk in parts.items():
            out[(split, name)] = _c(t, e, risk[rows])
    return out


def dropped(run: RunDir) -> list[dict[str, object]]:
    """Modalities branch stopping dropped, per cell."""
    rows = []
    for cell in sorted(run.cells.iterdir()):
        cfg = cell / "model" / "config.json"
        if cfg.exists():
            for m in json.loads(cfg.read_text()).get("dropped_modalities", []):
                spec = json.loads((cell / "spec.json").read_text())
                model = model_key(
                    spec["strategy"], spec["ct_encoder"], spec["ehr_encoder"], spec["head"]
                )
                rows.append({"task": spec["task"], "model": model, "modality": m})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "demo.yaml")
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--imbalance", default="0.25,0.5,0.75,1")
    ap.add_argument("--interaction", default="0,0.5")
    ap.add_argument("--site-shift", default="1,2")
    ap.add_argument(
        "--settings",
        default=None,
        help="explicit w:interaction:shift triples (e.g. 0.25:0:1,1:0.5:2) instead of the grid",
    )
    ap.add_argument("--replicates", type=int, default=2, help="fresh simulator seeds")
    ap.add_argument("--sim-seeds", default=None, help="repeat a run: these simulator seeds")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per cell")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--strategies", default=None)
    ap.add_argument("--ehr-encoders", default="ehr_onehot")
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--shape", default="64,64,40")
    ap.add_argument(
        "--summarise",
        default=None,
        help="comma list of earlier OUT folders: print their combined summary and exit",
    )
    ap.add_argument(
        "--offset",
        choices=("none", "linear", "both"),
        default="none",
        help="linear: every deep strategy learns the residual of the elastic-net Cox "
        "(strategy parameter offset: linear); both: each such strategy with and without it "
        "(label suffix _lin)",
    )
    args = ap.parse_args()
    if args.summarise:
        folders = [Path(f) for f in args.summarise.split(",")]
        report(
            pl.concat([pl.read_csv(f / "generalisation.csv") for f in folders]),
            [d for f in folders for d in _read_drops(f / "drops.csv")],
            offset_both=False,
            folders=folders,
        )
        return

    sim_seeds = (
        [int(s) for s in args.sim_seeds.split(",")]
        if args.sim_seeds
        else random.SystemRandom().sample(range(1000, 10**6), args.replicates)
    )
    print(f"simulator seeds: {','.join(map(str, sim_seeds))} (repeat with --sim-seeds)")
    shape = tuple(int(v) for v in args.shape.split(","))
    rows: list[dict[str, object]] = []
    drops: list[dict[str, object]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    settings = (
        [tuple(float(v) for v in s.split(":")) for s in args.settings.split(",")]
        if args.settings
        else [
            (w, i, s)
            for w in _floats(args.imbalance)
            for i in _floats(args.interaction)
            for s in _floats(args.site_shift)
        ]
    )
    for w, inter, shift in settings:
        for seed in sim_seeds:
            name = f"w{w:g}_i{inter:g}_s{shift:g}_sim{seed}"
            data = args.out / "data" / name
            if not (data / "dataset.json").exists():
                simulate(
                    data, n=args.n, seed=seed, imbalance=w, interaction=inter,
                    site_shift=shift, shape=shape, progress=False,
                )  # fmt: skip
            cfg = sweep_config(
                args.config,
                data,
                strategies=args.strategies.split(",") if args.strategies else None,
                ehr_encoders=args.ehr_encoders.split(","),
                seeds=args.seeds,
                bootstrap=args.bootstrap,
                max_epochs=args.max_epochs,
            )
            cfg = with_offset(cfg, args.offset)
            started = time.perf_counter()
            res = run_experiment(cfg, args.out / "runs" / name, progress=False)
            for failed in res.failed:  # a failed cell is missing from the table: say so
                print(f"{name}: cell {failed.cell_id} FAILED: {failed.error}", flush=True)
            rd = RunDir(res.run_dir)
            metrics = pl.read_parquet(rd.metrics).filter(pl.col("metric") == "harrell_c")
            setting = {"imbalance": w, "interaction": inter, "site_shift": shift}
            for task in cfg.tasks:
                orc = oracle_c(rd, data, task)
                for r in metrics.filter(pl.col("task") == task).iter_rows(named=True):
                    rows.append(
                        {
                            **setting,
                            "sim_seed": seed,
                            "task": task,
                            "split": r["split"],
                            "model": r["model"],
                            "unimodal": r["unimodal"],
                            "c": r["estimate"],
                            "lower": r["lower"],
                            "upper": r["upper"],
                            **{k: orc.get((r["split"], k), math.nan) for k in (
                                "oracle", "image_oracle", "ehr_oracle")},
                        }
                    )  # fmt: skip
                for d in dropped(rd):
                    if d["task"] == task:
                        key = "image_oracle" if d["modality"] == "ct" else "ehr_oracle"
                        drops.append(
                            {**setting, "sim_seed": seed, **d,
                             "modality_oracle_c": orc.get(("internal_test", key))}
                        )  # fmt: skip
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    table = pl.DataFrame(rows)
    table.write_csv(args.out / "generalisation.csv")
    pl.DataFrame(drops or None).write_csv(args.out / "drops.csv")
    report(table, drops, offset_both=args.offset == "both", folders=[args.out])


def _read_drops(path: Path) -> list[dict[str, object]]:
    try:
        return pl.read_csv(path).to_dicts()
    except (FileNotFoundError, pl.exceptions.NoDataError):  # a run without drops
        return []


def report(
    table: pl.DataFrame,
    drops: list[dict[str, object]],
    *,
    offset_both: bool,
    folders: list[Path] | None = None,
) -> None:
    """Print the summary tables and the done-when checks of issue 17.

    With `folders` whose run folders are still there, also the paired test of the best deep
    fusion on each test split against the linear concatenation (`paired_vs_linear`).
    """
    summary = summarise(table)
    deep = deep_vs_linear(table)
    with pl.Config(tbl_rows=200, tbl_cols=20, tbl_width_chars=200, fmt_str_lengths=60):
        print(summary)
        print("where the signal is lost: each modality's oracle C against its best model:")
        print(signal_loss(table))
        print("deep fusion (chosen on validation; best on test) against the linear concatenation:")
        print(deep)
        if offset_both:
            print("offset linear: C with it minus C without, per strategy (mean over settings):")
            print(offset_effect(table))
    strong = sum(1 for d in drops if float(d["modality_oracle_c"] or 0) >= 0.60)  # type: ignore[arg-type]
    print(f"drops of a modality with oracle C >= 0.60: {strong} of {len(drops)}")
    print("done-when checks (means over seeds, then over settings):")
    internal = summary.filter(pl.col("split") == "internal_test")
    for task, part in internal.group_by("task", maintain_order=True):
        print(f"  {task[0]}: mean gap of the validation-chosen model to the oracle, internal "
              f"test {part['gap'].mean():.3f} over {part.height} settings (target <= 0.04)")  # fmt: skip
    both = internal.filter(pl.col("imbalance").is_between(0.25, 0.75))
    below = below_unimodal(table)
    worst = below.filter(pl.col("imbalance").is_between(0.25, 0.75)).sort("delta").head(1)
    print(f"  fusion strategies whose C (mean over seeds) is > 0.01 below the best unimodal's at "
          f"0.25 <= w <= 0.75 (internal test): "
          f"{below.filter(pl.col('imbalance').is_between(0.25, 0.75) & (pl.col('delta') < -0.01)).height}"
          f" of {below.filter(pl.col('imbalance').is_between(0.25, 0.75)).height} (target 0; "
          f"lowest {worst['delta'][0]:+.3f}, {worst['strategy'][0]}); per seed, summed means: "
          f"{both['fusions_below_unimodal'].sum():g}")  # fmt: skip
    at_one = below.filter(pl.col("imbalance") == 1.0)
    if at_one.height:
        print(f"  at w = 1, fusion strategies > 0.01 below the best unimodal (mean over seeds, "
              f"internal test): {at_one.filter(pl.col('delta') < -0.01).height} of "
              f"{at_one.height} (lowest {at_one['delta'].min():+.3f})")  # fmt: skip
    for col, what in (("delta", "chosen on validation"), ("delta_best", "best on test")):
        below = deep.filter(pl.col(col) < 0)
        print(f"  deep fusion {what} below the linear concatenation: {below.height} of "
              f"{deep.height} setting x task x split rows (worst {deep[col].min():+.3f})")  # fmt: skip
    paired = paired_vs_linear(folders or [])
    if paired.height:
        sig = paired.filter(pl.col("z") < -1.96)
        print("  best deep fusion on test against the linear concatenation, paired IJ test (mean "
              f"delta over seeds, SE sqrt(sum SE^2) / seeds): {sig.height} of {paired.height} rows "
              f"below by more than 1.96 SE (lowest z {paired['z'].min():+.2f}, delta "
              f"{paired.sort('z')['delta'][0]:+.4f})")  # fmt: skip


def paired_vs_linear(folders: list[Path]) -> pl.DataFrame:
    """Per setting x task x test split: the deep fusion best on test against `linear`, paired.

    Reads each run's predictions (training seed 0) and the simulated cohort's outcomes from the
    benchmark's `runs/` and `data/` folders, and compares every deep fusion with the linear
    concatenation on the same patients (`paired_concordance`, IJ variance). Per seed the best deep
    fusion's delta and SE; over seeds the mean delta, SE = sqrt(sum SE^2) / seeds and z.
    """
    rows = []
    for folder in folders:
        for run in sorted((folder / "runs").glob("w*_i*_s*_sim*")):
            cohort_path = folder / "data" / run.name / "cohort.parquet"
            cells = {p.name.removesuffix(".s0"): p for p in (run / "cells").glob("*.s0")}
            if not cohort_path.exists() or not cells:
                continue
            cohort = pl.read_parquet(cohort_path)
            w, inter, shift, seed = (float(v) for v in re.findall(r"[-\d.]+", run.name))
            for task in sorted({k.split(".")[0] for k in cells}):
                fused = {
                    k.split(".")[1]: p for k, p in cells.items()
                    if k.startswith(f"{task}.") and ".none." not in k
                }  # fmt: skip
                if "linear" not in fused or len(fused) < 2:
                    continue
                preds = {
                    name: pl.read_parquet(p / "predictions.parquet").join(
                        cohort, on=["subject_id", "prediction_time"], maintain_order="left"
                    )
                    for name, p in fused.items()
                }
                for split in TEST_SPLITS:
                    on = {k: v.filter(pl.col("split") == split) for k, v in preds.items()}
                    ref = on["linear"]
                    if not ref.height:
                        continue
                    tcol, ecol = outcome_columns(task)
                    t = paired_concordance(
                        ref[tcol].to_numpy().astype(np.float64),
                        ref[ecol].to_numpy().astype(bool),
                        {k: v["risk"].to_numpy() for k, v in on.items()},
                        reference="linear",
                    ).sort("c", descending=True)
                    rows.append(
                        {"imbalance": w, "interaction": inter, "site_shift": shift,
                         "sim_seed": int(seed), "task": task, "split": split,
                         "best_deep": t["model"][0], "delta": t["delta"][0],
                         "se": t["std_error"][0]}
                    )  # fmt: skip
    if not rows:
        return pl.DataFrame()
    return (
        pl.DataFrame(rows)
        .group_by(["task", "split", *SETTING], maintain_order=True)
        .agg(
            pl.col("delta").mean(),
            ((pl.col("se") ** 2).sum().sqrt() / pl.len()).alias("se"),
            pl.len().alias("seeds"),
        )
        .with_columns(  # identical risks: delta 0, SE 0
            pl.when(pl.col("se") > 0).then(pl.col("delta") / pl.col("se")).otherwise(0.0).alias("z")
        )
    )


#: strategies that take the `offset` parameter (trained end to end with a Cox head)
OFFSET_STRATEGIES = ("unimodal", "concat", "late", "contrastive", "cross_attention", "co_attention")


def with_offset(cfg: ExperimentConfig, offset: str) -> ExperimentConfig:
    """`cfg` with `offset: linear` on the strategies that take it (replacing them, or beside
    them with the label suffix `_lin` when `offset` is "both")."""
    if offset == "none":
        return cfg
    out = []
    for s in cfg.strategies:
        if s.name not in OFFSET_STRATEGIES:
            out.append(s)
            continue
        lin = s.model_copy(update={"params": {**s.params, "offset": "linear"}})
        if offset == "both":
            out.append(s)
            lin = lin.model_copy(update={"label": f"{s.key}_lin"})
        out.append(lin)
    return cfg.model_copy(update={"strategies": out})


def _strategy(model: str) -> str:
    """`concat_lin[ct_radiomics+ehr_onehot]/cox` -> `concat_lin`."""
    return model.split("[", 1)[0]


def _with_strategy(table: pl.DataFrame) -> pl.DataFrame:
    """`table` with a `strategy` column (the model key without encoders and head)."""
    return table.with_columns(pl.col("model").map_elements(_strategy, pl.String).alias("strategy"))


SETTING = ["imbalance", "interaction", "site_shift"]


def _mean_over_seeds(
    per: pl.DataFrame, by: list[str], means: list[str], names: str, order: list[str]
) -> pl.DataFrame:
    """Mean of `means` per `by` group (the simulator seeds averaged), the distinct values of
    the model-name column `names` joined, rows sorted by `order`."""
    return (
        per.group_by(by, maintain_order=True)
        .agg(*[pl.col(c).mean() for c in means], pl.col(names).unique().str.join(", "))
        .sort(order)
    )


def signal_loss(table: pl.DataFrame) -> pl.DataFrame:
    """Per setting x task on internal test (mean over seeds): the image-only and EHR-only
    oracle C beside the best CT-only and EHR-only model chosen on validation: a modality's
    features lose its signal where its best model stays far below its oracle."""
    t = _with_strategy(table)
    keys = ["imbalance", "interaction", "site_shift", "sim_seed", "task"]
    out = []
    for key, part in t.group_by(keys, maintain_order=True):
        row = dict(zip(keys, key, strict=True))
        test = part.filter(pl.col("split") == "internal_test")
        if not test.height:
            continue
        for modality in ("ct", "ehr"):
            uni = part.filter(pl.col("unimodal") & pl.col("strategy").str.contains(modality))
            val = uni.filter(pl.col("split") == "validation").sort("c", descending=True)
            best = val["model"][0] if val.height else None
            c = test.filter(pl.col("model") == best)["c"]
            row[f"{modality}_model_c"] = c[0] if c.len() else math.nan
        row["image_oracle"] = test["image_oracle"][0]
        row["ehr_oracle"] = test["ehr_oracle"][0]
        row["oracle"] = test["oracle"][0]
        out.append(row)
    return (
        pl.DataFrame(out)
        .group_by(["task", "imbalance", "interaction", "site_shift"], maintain_order=True)
        .agg(
            pl.col("oracle").mean(),
            pl.col("image_oracle").mean(),
            pl.col("ct_model_c").mean(),
            pl.col("ehr_oracle").mean(),
            pl.col("ehr_model_c").mean(),
        )
        .sort(["task", "imbalance", "interaction", "site_shift"])
    )


def deep_vs_linear(table: pl.DataFrame) -> pl.DataFrame:
    """Per setting x task x test split (mean over seeds): the deep fusion chosen on validation
    (every fused model but `linear`), and the best deep fusion on that test split, against the
    `linear` concatenation."""
    t = _with_strategy(table)
    deep = t.filter(~pl.col("unimodal") & (pl.col("strategy") != "linear"))
    keys = ["imbalance", "interaction", "site_shift", "sim_seed", "task"]
    out = []
    for key, part in deep.group_by(keys, maintain_order=True):
        val = part.filter(pl.col("split") == "validation").sort("c", descending=True)
        if not val.height:
            continue
        best = val["model"][0]
        lin = t.filter(
            (pl.col("strategy") == "linear")
            & pl.all_horizontal([pl.col(k) == v for k, v in zip(keys, key, strict=True)])
        )
        for split in TEST_SPLITS:
            on_split = part.filter(pl.col("split") == split)
            c_deep = on_split.filter(pl.col("model") == best)["c"]
            c_lin = lin.filter(pl.col("split") == split)["c"]
            if c_deep.len() and c_lin.len():
                out.append(
                    {**dict(zip(keys, key, strict=True)), "split": split,
                     "best_deep": _strategy(best), "deep_c": c_deep[0],
                     "best_on_test_c": on_split["c"].max(), "linear_c": c_lin[0]}
                )  # fmt: skip
    per = pl.DataFrame(out).with_columns(
        (pl.col("deep_c") - pl.col("linear_c")).alias("delta"),
        (pl.col("best_on_test_c") - pl.col("linear_c")).alias("delta_best"),
    )
    by = ["task", "split", *SETTING]
    means = ["deep_c", "best_on_test_c", "linear_c", "delta", "delta_best"]
    return _mean_over_seeds(per, by, means, "best_deep", by)


def offset_effect(table: pl.DataFrame) -> pl.DataFrame:
    """Mean (over settings and seeds) C of `<strategy>_lin` minus `<strategy>`, per task x split."""
    t = _with_strategy(table)
    keys = ["imbalance", "interaction", "site_shift", "sim_seed", "task", "split"]
    lin = t.filter(pl.col("strategy").str.ends_with("_lin")).with_columns(
        pl.col("strategy").str.strip_suffix("_lin")
    )
    pairs = lin.join(t, on=[*keys, "strategy"], suffix="_base")
    return (
        pairs.with_columns((pl.col("c") - pl.col("c_base")).alias("delta"))
        .group_by(["task", "split", "strategy"], maintain_order=True)
        .agg(pl.col("delta").mean(), pl.col("delta").min().alias("min"), pl.len().alias("n"))
        .sort(["task", "split", "strategy"])
    )


def below_unimodal(table: pl.DataFrame, split: str = "internal_test") -> pl.DataFrame:
    """Per setting x task x fusion strategy: its C minus the C of the unimodal model chosen on
    validation (token and linear baselines included), on `split`, mean over seeds (`delta`)."""
    keys = ["imbalance", "interaction", "site_shift", "sim_seed", "task"]
    out = []
    for key, part in _with_strategy(table).group_by(keys, maintain_order=True):
        val = part.filter(pl.col("split") == "validation").sort("c", descending=True)
        p = part.filter(pl.col("split") == split)
        if not val.height or not p.height:
            continue
        c_uni = p.filter(pl.col("model") == val.filter(pl.col("unimodal"))["model"][0])["c"]
        for row in p.filter(~pl.col("unimodal")).iter_rows(named=True):
            out.append(
                {**dict(zip(keys, key, strict=True)), "strategy": row["strategy"],
                 "delta": row["c"] - c_uni[0]}
            )  # fmt: skip
    return (
        pl.DataFrame(out)
        .group_by([*SETTING, "task", "strategy"], maintain_order=True)
        .agg(pl.col("delta").mean(), pl.len().alias("seeds"))
        .sort([*SETTING, "task", "strategy"])
    )


def summarise(table: pl.DataFrame) -> pl.DataFrame:
    """Per setting, task and split (mean over simulator seeds): oracle C, best model chosen on
    validation and its test C, gap to the oracle, best unimodal, fusions > 0.01 below it."""
    keys = ["imbalance", "interaction", "site_shift", "sim_seed", "task"]
    out = []
    for key, part in table.group_by(keys, maintain_order=True):
        val = part.filter(pl.col("split") == "validation").sort("c", descending=True)
        if not val.height:
            continue
        best = val["model"][0]
        best_uni = val.filter(pl.col("unimodal"))["model"][0]
        for split in TEST_SPLITS:
            p = part.filter(pl.col("split") == split)
            if not p.height:
                continue
            c = dict(zip(p["model"], p["c"], strict=True))
            fused = p.filter(~pl.col("unimodal"))
            below = int((fused["c"] < c[best_uni] - 0.01).sum())
            out.append(
                {
                    **dict(zip(keys, key, strict=True)),
                    "split": split,
                    "oracle": p["oracle"][0],
                    "image_oracle": p["image_oracle"][0],
                    "ehr_oracle": p["ehr_oracle"][0],
                    "best_model": best,
                    "best_c": c[best],
                    "gap": p["oracle"][0] - c[best],
                    "best_unimodal": best_uni,
                    "best_unimodal_c": c[best_uni],
                    "fusions_below_unimodal": below,
                    "n_fusions": fused.height,
                }
            )
    means = ["oracle", "best_c", "gap", "best_unimodal_c", "fusions_below_unimodal"]
    order = ["task", "split", *SETTING]
    return _mean_over_seeds(
        pl.DataFrame(out), [*SETTING, "task", "split"], means, "best_model", order
    )


if __name__ == "__main__":
    main()
