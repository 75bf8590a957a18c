"""`run_sweep`: where does fusion help? Simulate a cohort per (imbalance, site shift), run every
strategy through the runner, and tabulate + plot the gain over the best unimodal baseline.

A setting is (imbalance w, site shift, simulation seed); `replicates` R simulates R independent
cohorts per (w, shift) (seeds `sim_seed`, `sim_seed` + 1, ...), so the sweep's gains are not
one cohort's luck. For each setting the simulator writes `OUT/data/<setting>/` and the runner
`OUT/runs/<setting>/` (both reused when rerun: finished cells are cached), with the study of a
base config
(`examples/demo.yaml` by default) pointed at the simulated data and optionally reduced
(strategies, EHR encoders, tasks, seeds, epochs, resamples). Only Harrell's C is scored.

CT representation (`ct_features`): with "cells" (the default) the CT is encoded once per setting
by the `ct_radiomics` statistics of the whole volume *and* of each cell of a 2x2x2 grid, all in
the pooled vector (tokens: the cells), and given to the runner as `precomputed` embeddings.
Why: the whole-volume radiomics vector (`ct_radiomics`'s pooled features, all that the pooled
strategies and the unimodal baselines see) carries almost none of the simulator's image signal
(the clot sits in a small region), so the imbalance knob would not reach those models. The
features are unstandardised (no fitting: the fusion model standardises with training rows).
With "config" the base config's CT encoders are used as they are.

The gain of a fused model is the runner's paired difference against each task's reference, the
best unimodal model on validation: delta = C(fused) - C(reference) on internal and external test,
with its percentile CI over the run's shared subject-level resamples (seeds averaged). The row
`best fusion` takes, per setting and task, the fused model with the highest validation C (never
chosen on a test split; column `selected` names it). With `rebalance=True` every fused strategy also runs with OGM-GE
gradient modulation (`<strategy>_ogm`), so its effect appears as extra lines. The measured CT
share of the Shapley contributions (`survfuse.analysis`) is added to each row.

Pooling replicates: the R cohorts are independent studies of the same setting, so their gains
are combined by a DerSimonian-Laird random-effects meta-analysis. Each cohort's bootstrap
interval gives its within-cohort standard error, se_r = (upper_r - lower_r) / (2 z) with z the
run's two-sided normal quantile; with w_r = 1 / se_r^2, Q = sum_r w_r (g_r - g_FE)^2 and
tau^2 = max(0, (Q - (R - 1)) / (sum w - sum w^2 / sum w)) (the between-cohort variance: training
runs and cohorts differ by more than test sampling explains), the pooled gain is
g = sum_r w*_r g_r / sum_r w*_r with w*_r = 1 / (se_r^2 + tau^2) and interval g -/+ z / sqrt(sum
w*). With R = 1 the run's own percentile interval is kept. With few cohorts tau^2 is imprecise:
the interval is approximate. `best fusion` is selected on validation within each cohort (column
`selected` counts the choices).

Measured balance: the nominal w says where the simulator put the signal, not how much of it the
encoders recover (on the 32x32x20 simulator the MACE image factor, coronary calcium, is about
one voxel, and CT-only MACE models score C ~0.5 at every w). So every row also carries the
measured unimodal gap of its cohort and split, `unimodal_gap` = C(best CT-only model) - C(best
EHR-only model) (each modality's unimodal model chosen on validation), and `sweep_gap.png` plots
each cohort's best-fusion gain against it; `sweep.md` gives the Spearman correlation between
|unimodal_gap| and that gain (negative: fusion helps most when the modalities are balanced).

Outputs: `OUT/sweep.parquet` / `sweep.csv` (pooled: one row per w x shift x task x split x
model), `OUT/sweep_replicates.parquet` / `.csv` (one row per cohort), `OUT/sweep.png` (gain vs imbalance: one panel per task x split, one line per model, one figure
per site shift `sweep_shift<s>.png` when several) and `OUT/sweep.md`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml
from numpy.typing import NDArray

from survfuse.experiment.config import (
    EncoderChoice,
    ExperimentConfig,
    StrategyChoice,
    parse_config,
)

__all__ = [
    "BEST_FUSION",
    "SweepResult",
    "gain_table",
    "gap_correlation",
    "gap_figure",
    "pool_replicates",
    "random_effects",
    "run_sweep",
    "sweep_config",
    "sweep_figure",
    "write_cell_embeddings",
]

BEST_FUSION = "best fusion"
TEST_SPLITS = ("internal_test", "external_test")
GAIN_SCHEMA = {
    "imbalance": pl.Float64,
    "site_shift": pl.Float64,
    "sim_seed": pl.Int64,
    "task": pl.Utf8,
    "split": pl.Utf8,
    "model": pl.Utf8,
    "strategy": pl.Utf8,
    "selected": pl.Utf8,
    "rebalance": pl.Boolean,
    "reference": pl.Utf8,
    "estimate": pl.Float64,
    "reference_estimate": pl.Float64,
    "gain": pl.Float64,
    "gain_lower": pl.Float64,
    "gain_upper": pl.Float64,
    "validation_c": pl.Float64,
    "unimodal_gap": pl.Float64,
    "ct_share": pl.Float64,
    "imbalance_index": pl.Float64,
    "n_seeds": pl.Int64,
    "n_boot": pl.Int64,
}


@dataclass
class SweepResult:
    """The sweep's folder, its gain table and the figure paths."""

    out: Path
    table: pl.DataFrame
    figures: list[Path]
    summary: Path


def _setting_name(imbalance: float, site_shift: float, sim_seed: int) -> str:
    return f"imb{imbalance:g}_shift{site_shift:g}_sim{sim_seed}"


def _parse_floats(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{what}: give at least one value")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: values must be distinct, got {out}")
    return out


def write_cell_embeddings(
    data_dir: Path, out: Path, *, grid: tuple[int, int, int] = (2, 2, 2), n_bins: int = 16
) -> Path:
    """CT embeddings of every cohort row as an npz for the `precomputed` encoder: pooled =
    [whole-volume features, each grid cell's features] (raw `ct_radiomics` statistics), tokens =
    cells + centre positions, mask = cells with voxels. Rows without a CT are left out (the
    encoder then marks them absent with `on_missing="absent"`)."""
    from survfuse.encoders.base import CTSource
    from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder, grid_positions

    cohort = pl.read_parquet(data_dir / "cohort.parquet").select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    )
    enc = CTRadiomicsEncoder(grid=grid, n_bins=n_bins)
    r = enc.raw(cohort, CTSource.from_index(data_dir / "ct_index.parquet"))
    keep = r["present"]
    if not np.any(keep):
        raise ValueError(
            f"{data_dir}: no CT volume could be encoded (volumes need at least "
            "min_slices=16 voxels along every axis; use a larger --shape)"
        )
    cells = np.where(r["valid"][..., None], r["cells"], 0.0)[keep]
    pos = np.broadcast_to(grid_positions(grid), (*cells.shape[:2], 3))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    np.savez(
        tmp,
        subject_id=cohort["subject_id"].to_numpy()[keep],
        prediction_time=cohort["prediction_time"].to_numpy()[keep],
        pooled=np.concatenate([r["volume"][keep], cells.reshape(cells.shape[0], -1)], axis=1),
        tokens=np.concatenate([cells, pos], axis=2).astype(np.float32),
        mask=r["valid"][keep],
    )
    tmp.replace(out)
    return out


def sweep_config(
    base: str | Path | dict[str, Any],
    data_dir: Path,
    *,
    strategies: Sequence[str] | None = None,
    ehr_encoders: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    seeds: int = 1,
    bootstrap: int = 200,
    max_epochs: int | None = None,
    rebalance: bool = False,
    ct_embeddings: Path | None = None,
) -> ExperimentConfig:
    """The base study pointed at `data_dir` and reduced for a sweep (see the module docstring).

    strategies: keys to keep (e.g. `unimodal_ct`, `late`; unimodal baselines are always kept);
    ehr_encoders: EHR encoder keys to keep; seeds: training seeds 0..seeds-1; ct_embeddings:
    an npz of `write_cell_embeddings` that replaces the CT encoders (label `ct_cells`).
    """
    from survfuse.registry import look_up_option

    raw: dict[str, Any] = (
        dict(base) if isinstance(base, dict) else yaml.safe_load(Path(base).read_text())
    )
    raw["data"] = {
        "cohort": str(data_dir / "cohort.parquet"),
        "ct_index": str(data_dir / "ct_index.parquet"),
        "meds_root": str(data_dir / "meds"),
    }
    cfg = parse_config(raw, source="sweep config")
    strat = list(cfg.strategies)
    if strategies is not None:
        keys = [s.key for s in strat]
        wanted = {look_up_option(k, keys, kind="strategy") for k in strategies}
        strat = [s for s in strat if s.key in wanted or s.modality is not None]
    if rebalance:
        strat += [
            StrategyChoice(
                name=s.name,
                label=f"{s.key}_ogm",
                params=s.params,
                training={**s.training, "rebalance": "ogm_ge"},
            )
            for s in strat
            if s.modality is None
        ]
    encoders = cfg.encoders
    if ct_embeddings is not None:
        cells = {
            "name": "precomputed",
            "label": "ct_cells",
            "params": {"path": str(ct_embeddings), "modality": "ct", "on_missing": "absent"},
        }
        encoders = encoders.model_copy(update={"ct": [EncoderChoice.model_validate(cells)]})
    if ehr_encoders is not None:
        keys = [e.key for e in encoders.ehr]
        wanted = {look_up_option(k, keys, kind="EHR encoder") for k in ehr_encoders}
        encoders = encoders.model_copy(update={"ehr": [e for e in encoders.ehr if e.key in wanted]})
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    training = cfg.training
    if max_epochs is not None:
        training = training.model_copy(update={"max_epochs": int(max_epochs)})
    ev = cfg.evaluation.model_copy(update={"metrics": ["harrell_c"], "bootstrap": int(bootstrap)})
    dumped = cfg.model_copy(
        update={
            "strategies": strat,
            "encoders": encoders,
            "tasks": list(tasks) if tasks is not None else cfg.tasks,
            "seeds": list(range(seeds)),
            "training": training,
            "evaluation": ev,
        }
    ).model_dump(mode="json")
    return parse_config(dumped, source="sweep config")  # re-validated as a whole


def gain_table(
    metrics: pl.DataFrame,
    imbalance: pl.DataFrame | None,
    *,
    setting: dict[str, float | int],
    rebalanced: set[str] | None = None,
) -> pl.DataFrame:
    """Gain over the reference (best unimodal) of every fused model and of the best fusion, per
    task x test split, from one run's `metrics.parquet` (+ its `imbalance.parquet`)."""
    rebalanced = rebalanced or set()
    hc = metrics.filter(pl.col("metric") == "harrell_c")
    rows: list[dict[str, Any]] = []
    for task in dict.fromkeys(hc["task"].to_list()):
        t = hc.filter(pl.col("task") == task)
        val = t.filter((pl.col("split") == "validation") & ~pl.col("unimodal"))
        val_c = {r["model"]: r["estimate"] for r in val.iter_rows(named=True)}
        finite = {m: c for m, c in val_c.items() if c is not None and math.isfinite(c)}
        best = max(finite, key=lambda m: finite[m]) if finite else None
        best_uni = _best_unimodal_per_modality(t)
        for split in TEST_SPLITS:
            s = t.filter(pl.col("split") == split)
            uni_c = {
                m: s.filter(pl.col("model") == name)["estimate"] for m, name in best_uni.items()
            }
            gap = (
                float(uni_c["ct"][0]) - float(uni_c["ehr"][0])
                if all(k in uni_c and uni_c[k].len() for k in ("ct", "ehr"))
                else math.nan
            )
            if not s.height:
                continue
            ref_rows = s.filter(pl.col("is_reference"))
            ref_est = float(ref_rows["estimate"][0]) if ref_rows.height else math.nan
            for r in s.filter(~pl.col("unimodal")).iter_rows(named=True):
                share = index = math.nan
                if imbalance is not None and imbalance.height:
                    im = imbalance.filter(
                        (pl.col("task") == task)
                        & (pl.col("split") == split)
                        & (pl.col("model") == r["model"])
                    )
                    for q in ("ct_share", "imbalance_index"):
                        v = im.filter(pl.col("quantity") == q)["estimate"]
                        if v.len():
                            if q == "ct_share":
                                share = float(v[0])
                            else:
                                index = float(v[0])
                row = {
                    **setting,
                    "task": task,
                    "split": split,
                    "model": r["model"],
                    "strategy": r["strategy"],
                    "selected": r["strategy"],
                    "rebalance": r["strategy"] in rebalanced,
                    "reference": r["reference"],
                    "estimate": r["estimate"],
                    "reference_estimate": ref_est,
                    "gain": r["delta"],
                    "gain_lower": r["delta_lower"],
                    "gain_upper": r["delta_upper"],
                    "validation_c": val_c.get(r["model"], math.nan),
                    "unimodal_gap": gap,
                    "ct_share": share,
                    "imbalance_index": index,
                    "n_seeds": r["n_seeds"],
                    "n_boot": r["n_boot"],
                }
                rows.append(row)
                if r["model"] == best:
                    rows.append({**row, "model": BEST_FUSION, "strategy": BEST_FUSION})
    return pl.DataFrame(rows, schema=GAIN_SCHEMA, orient="row")


def _best_unimodal_per_modality(t: pl.DataFrame) -> dict[str, str]:
    """Model name of the best unimodal model of each modality on validation (Harrell's C)."""
    out: dict[str, str] = {}
    val = t.filter((pl.col("split") == "validation") & pl.col("unimodal"))
    for m, col in (("ct", "ct_encoder"), ("ehr", "ehr_encoder")):
        rows = val.filter(pl.col(col).is_not_null() & pl.col("estimate").is_finite())
        if rows.height:
            out[m] = str(rows.sort("estimate", descending=True)["model"][0])
    return out


def gap_correlation(per_cohort: pl.DataFrame) -> pl.DataFrame:
    """Spearman correlation between |unimodal_gap| and the best fusion's gain over cohorts x
    imbalances, per site shift x task x split (columns rho, n)."""
    from scipy.stats import spearmanr

    best = per_cohort.filter(
        (pl.col("model") == BEST_FUSION)
        & pl.col("gain").is_finite()
        & pl.col("unimodal_gap").is_finite()
    )
    rows = []
    for (shift, task, split), part in best.group_by(
        ["site_shift", "task", "split"], maintain_order=True
    ):
        rho = math.nan
        if part.height >= 3:
            rho = float(spearmanr(part["unimodal_gap"].abs(), part["gain"]).statistic)
        rows.append(
            {"site_shift": shift, "task": task, "split": split, "rho": rho, "n": part.height}
        )
    schema = {"site_shift": pl.Float64, "task": pl.Utf8, "split": pl.Utf8, "rho": pl.Float64}
    return pl.DataFrame(rows, schema={**schema, "n": pl.Int64}, orient="row")


def gap_figure(per_cohort: pl.DataFrame, *, site_shift: float | None = None) -> Any:
    """Best-fusion gain (95% CI) of each cohort against its measured unimodal gap C(CT-only) -
    C(EHR-only); one panel per task x split, colour = nominal imbalance w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from survfuse.report.figures import SPLIT_LABELS, WIDTH

    sel = per_cohort.filter(pl.col("model") == BEST_FUSION)
    if site_shift is not None:
        sel = sel.filter(pl.col("site_shift") == site_shift)
    tasks = list(dict.fromkeys(sel["task"].to_list()))
    splits = [s for s in TEST_SPLITS if s in set(sel["split"].to_list())]
    fig, axes = plt.subplots(
        max(len(tasks), 1),
        max(len(splits), 1),
        figsize=(WIDTH, 3.0 * max(len(tasks), 1)),
        squeeze=False,
    )
    cmap = plt.get_cmap("viridis")
    for i, task in enumerate(tasks):
        for j, split in enumerate(splits):
            ax = axes[i][j]
            p = sel.filter((pl.col("task") == task) & (pl.col("split") == split))
            x, y = p["unimodal_gap"].to_numpy(), p["gain"].to_numpy()
            err = np.vstack([y - p["gain_lower"].to_numpy(), p["gain_upper"].to_numpy() - y])
            ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0.0), fmt="none", c="0.6")
            sc = ax.scatter(x, y, c=p["imbalance"].to_numpy(), cmap=cmap, vmin=0, vmax=1, zorder=3)
            ax.axhline(0, color="grey", lw=0.8)
            ax.axvline(0, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{task} · {SPLIT_LABELS.get(split, split)}", fontsize=9)
            ax.set_xlabel("unimodal gap C(CT-only) − C(EHR-only)")
            ax.set_ylabel("best fusion Δ C")
            fig.colorbar(sc, ax=ax, label="w")
    fig.suptitle(
        "Best-fusion gain against the measured modality balance (one point per cohort)", fontsize=10
    )
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.96))
    return fig


POOLED_KEYS = ("imbalance", "site_shift", "task", "split", "model")
MIN_SE = 1e-6  # a degenerate interval (a model identical to its reference) still gets a weight


def random_effects(
    gain: NDArray[np.float64], se: NDArray[np.float64], *, level: float = 0.95
) -> tuple[float, float, float, float]:
    """DerSimonian-Laird pooled estimate of independent estimates `gain` [R] with standard
    errors `se` [R]: (estimate, lower, upper, tau^2) at two-sided `level` (module docstring)."""
    from statistics import NormalDist

    g = np.asarray(gain, dtype=np.float64)
    v = np.maximum(np.asarray(se, dtype=np.float64), MIN_SE) ** 2
    w = 1.0 / v
    fixed = float(np.sum(w * g) / np.sum(w))
    q = float(np.sum(w * (g - fixed) ** 2))
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    tau2 = max(0.0, (q - (g.size - 1)) / c) if c > 0 else 0.0
    w_re = 1.0 / (v + tau2)
    est = float(np.sum(w_re * g) / np.sum(w_re))
    half = NormalDist().inv_cdf(0.5 + level / 2) / math.sqrt(float(np.sum(w_re)))
    return est, est - half, est + half, tau2


def pool_replicates(table: pl.DataFrame, *, level: float = 0.95) -> pl.DataFrame:
    """Random-effects pooled gain over the simulated cohorts of each (w, shift, task, split,
    model), with its interval at `level` (the runs' bootstrap level; module docstring); the
    run's own interval when a group has one cohort. Columns: those of `GAIN_SCHEMA` without
    `sim_seed`, plus `tau2` (between-cohort variance) and `n_replicates`; `selected` lists how
    often each strategy was the validation-selected best fusion; other numbers are means."""
    from statistics import NormalDist

    if not table.height:
        schema = {k: v for k, v in GAIN_SCHEMA.items() if k != "sim_seed"}
        return pl.DataFrame(schema={**schema, "tau2": pl.Float64, "n_replicates": pl.Int64})
    z = NormalDist().inv_cdf(0.5 + level / 2)
    mean_cols = [
        "estimate",
        "reference_estimate",
        "validation_c",
        "unimodal_gap",
        "ct_share",
        "imbalance_index",
    ]
    rows = []
    for key, part in table.group_by(list(POOLED_KEYS), maintain_order=True):
        r = len(part)
        first = part.row(0, named=True)
        tau2 = math.nan
        ok = part.filter(
            pl.col("gain").is_finite()
            & pl.col("gain_lower").is_finite()
            & pl.col("gain_upper").is_finite()
        )
        if r == 1 or not ok.height:
            gain, lo, hi = first["gain"], first["gain_lower"], first["gain_upper"]
        else:
            se = (ok["gain_upper"] - ok["gain_lower"]).to_numpy() / (2 * z)
            gain, lo, hi, tau2 = random_effects(ok["gain"].to_numpy(), se, level=level)
        counts = Counter(part["selected"].to_list())
        selected = (
            first["selected"]
            if len(counts) == 1
            else ", ".join(f"{k} x{v}" for k, v in counts.most_common())
        )
        rows.append(
            {
                **dict(zip(POOLED_KEYS, key, strict=True)),
                "strategy": first["strategy"],
                "selected": selected,
                "rebalance": first["rebalance"],
                "reference": first["reference"],
                **{c: _nanmean(part[c].to_numpy()) for c in mean_cols},
                "gain": gain,
                "gain_lower": lo,
                "gain_upper": hi,
                "n_seeds": first["n_seeds"],
                "n_boot": first["n_boot"],
                "tau2": tau2,
                "n_replicates": r,
            }
        )
    order = [k for k in GAIN_SCHEMA if k != "sim_seed"] + ["tau2", "n_replicates"]
    return pl.DataFrame(rows).select(order)


def _nanmean(x: NDArray[np.float64]) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def sweep_figure(table: pl.DataFrame, *, site_shift: float | None = None) -> Any:
    """Gain over the best unimodal baseline (95% CI) against the imbalance; one panel per task
    x split, one line per model (`best fusion` in black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from survfuse.report.figures import SPLIT_LABELS, WIDTH

    sel = table if site_shift is None else table.filter(pl.col("site_shift") == site_shift)
    tasks = list(dict.fromkeys(sel["task"].to_list()))
    splits = [s for s in TEST_SPLITS if s in set(sel["split"].to_list())]
    models = list(dict.fromkeys(sel["model"].to_list()))
    models = [m for m in models if m != BEST_FUSION] + [BEST_FUSION]
    fig, axes = plt.subplots(
        max(len(tasks), 1),
        max(len(splits), 1),
        figsize=(WIDTH, 3.2 * max(len(tasks), 1)),
        squeeze=False,
        sharex=True,
    )
    cmap = plt.get_cmap("tab10")
    offsets = np.linspace(-0.02, 0.02, max(len(models), 1))
    for i, task in enumerate(tasks):
        for j, split in enumerate(splits):
            ax = axes[i][j]
            part = sel.filter((pl.col("task") == task) & (pl.col("split") == split))
            for k, model in enumerate(models):
                p = part.filter(pl.col("model") == model).sort("imbalance")
                if not p.height:
                    continue
                x = p["imbalance"].to_numpy() + offsets[k]
                y = p["gain"].to_numpy()
                err = np.vstack([y - p["gain_lower"].to_numpy(), p["gain_upper"].to_numpy() - y])
                best = model == BEST_FUSION
                ax.errorbar(
                    x,
                    y,
                    yerr=np.where(np.isfinite(err), err, 0.0),
                    marker="o",
                    ms=4 if not best else 6,
                    lw=2.2 if best else 1.0,
                    capsize=2,
                    color="black" if best else cmap(k % 10),
                    label=model.split("/")[0],
                )
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{task} · {SPLIT_LABELS.get(split, split)}", fontsize=9)
            ax.set_xlabel("imbalance w (image share of the modality-specific signal)")
            ax.set_ylabel("Δ C vs best unimodal")
    title = "Fusion gain over the best unimodal baseline"
    if site_shift is not None:
        title += f" (site shift {site_shift:g})"
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = math.ceil(len(labels) / 3)
    bottom = 0.03 + 0.03 * rows / max(len(tasks), 1)
    if handles:  # below the panels, so it never hides a point
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0.0, bottom, 1.0, 0.97))
    return fig


def _fmt(est: float, lo: float, hi: float) -> str:
    from survfuse.report.tables import fmt_ci

    return fmt_ci(est, lo, hi)


def summary_markdown(table: pl.DataFrame, correlation: pl.DataFrame | None = None) -> str:
    """`gain [CI]` per model (rows) and imbalance (columns), per site shift, task and split;
    the mean measured unimodal gap per imbalance; where the best fusion peaks; and the
    Spearman correlation of `gap_correlation` when given."""
    lines = ["# survfuse sweep-imbalance", ""]
    for shift in sorted(set(table["site_shift"].to_list())):
        for task in dict.fromkeys(table["task"].to_list()):
            for split in TEST_SPLITS:
                part = table.filter(
                    (pl.col("site_shift") == shift)
                    & (pl.col("task") == task)
                    & (pl.col("split") == split)
                )
                if not part.height:
                    continue
                ws = sorted(set(part["imbalance"].to_list()))
                lines += [
                    f"## {task}, {split}, site shift {shift:g}: Δ C vs best unimodal [95% CI]",
                    "",
                    "| model | " + " | ".join(f"w={w:g}" for w in ws) + " |",
                    "|---|" + "---|" * len(ws),
                ]
                for model in dict.fromkeys(part["model"].to_list()):
                    cells = []
                    for w in ws:
                        r = part.filter((pl.col("model") == model) & (pl.col("imbalance") == w))
                        cell = (
                            _fmt(r["gain"][0], r["gain_lower"][0], r["gain_upper"][0])
                            if r.height
                            else "–"
                        )
                        if r.height and model == BEST_FUSION:
                            cell += f" ({r['selected'][0]})"
                        cells.append(cell)
                    lines.append(f"| {model} | " + " | ".join(cells) + " |")
                gaps = []
                for w in ws:
                    g = part.filter((pl.col("model") == BEST_FUSION) & (pl.col("imbalance") == w))[
                        "unimodal_gap"
                    ]
                    gaps.append(f"{g[0]:+.3f}" if g.len() and g[0] is not None else "–")
                lines.append("| unimodal gap C(CT) − C(EHR) | " + " | ".join(gaps) + " |")
                lines += ["", _peak_line(part)]
                if correlation is not None:
                    r = correlation.filter(
                        (pl.col("site_shift") == shift)
                        & (pl.col("task") == task)
                        & (pl.col("split") == split)
                    )
                    if r.height:
                        lines.append(
                            f"Spearman correlation of |unimodal gap| and best-fusion gain over "
                            f"{r['n'][0]} cohorts: {r['rho'][0]:+.2f}."
                        )
                lines.append("")
    return "\n".join(lines)


def _peak_line(part: pl.DataFrame) -> str:
    """Where the best fusion's gain peaks and what it is at the extremes of w (the study's
    claim: largest at balanced contributions, shrinking toward 0 at the extremes)."""
    best = part.filter(pl.col("model") == BEST_FUSION).sort("imbalance")
    if best.height < 2:
        return ""
    ws, g = best["imbalance"].to_list(), best["gain"].to_list()
    lo, hi = best["gain_lower"].to_list(), best["gain_upper"].to_list()
    gains = np.asarray([math.nan if x is None else x for x in g], dtype=np.float64)
    if not np.isfinite(gains).any():
        return "Best fusion: no finite gain."
    k = int(np.nanargmax(gains))
    ends = ", ".join(f"w={ws[i]:g}: {_fmt(g[i], lo[i], hi[i])}" for i in (0, len(ws) - 1))
    return f"Best fusion peaks at w={ws[k]:g} ({_fmt(g[k], lo[k], hi[k])}); extremes {ends}."


def run_sweep(
    out: str | Path,
    *,
    imbalance: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    site_shift: Sequence[float] = (1.0,),
    seeds: int = 1,
    n: int = 1500,
    sim_seed: int = 0,
    replicates: int = 1,
    shape: tuple[int, int, int] = (32, 32, 20),
    config: str | Path | None = None,
    strategies: Sequence[str] | None = None,
    ehr_encoders: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    bootstrap: int = 200,
    max_epochs: int | None = None,
    rebalance: bool = False,
    ct_features: str = "cells",
    progress: bool = True,
    console: Any = None,
) -> SweepResult:
    """Run the sweep (see the module docstring); rerunning resumes (data and cells are reused).

    seeds: training seeds per cell (0..seeds-1, averaged by the runner); sim_seed: the first
    simulation seed (within a replicate the same latent patients in every setting, so settings
    differ only in w and the site shift); replicates: independent cohorts per (w, shift).
    """
    from survfuse.data.simulate import simulate
    from survfuse.experiment.demo import default_demo_config
    from survfuse.experiment.imbalance_eval import IMBALANCE_FILE, evaluate_imbalance
    from survfuse.experiment.rundir import RunDir, write_parquet, write_text
    from survfuse.experiment.runner import run_experiment
    from survfuse.registry import look_up_option

    ct_features = look_up_option(ct_features, ("cells", "config"), kind="ct_features")
    ws = _parse_floats(imbalance, "imbalance")
    shifts = _parse_floats(site_shift, "site_shift")
    for w in ws:
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"imbalance must lie in [0, 1], got {w}")
    for s in shifts:
        if s < 0:
            raise ValueError(f"site_shift must be >= 0, got {s}")
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    base = Path(config) if config is not None else default_demo_config()
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    frames = []
    settings = [(shift, w, sim_seed + r) for r in range(replicates) for shift in shifts for w in ws]
    for shift, w, seed in settings:
        name = _setting_name(w, shift, seed)
        data_dir = root / "data" / name
        if not (data_dir / "dataset.json").exists():
            if console is not None:
                console.print(f"[bold]simulating[/bold] {name}: {n} patients")
            simulate(
                data_dir,
                n=n,
                seed=seed,
                imbalance=w,
                site_shift=shift,
                shape=shape,
                progress=progress,
            )
        emb = None
        if ct_features == "cells":
            emb = data_dir / "ct_cells.npz"
            if not emb.exists():
                if console is not None:
                    console.print(f"[bold]encoding[/bold] CT cells of {name}")
                write_cell_embeddings(data_dir, emb)
        cfg = sweep_config(
            base,
            data_dir,
            ct_embeddings=emb,
            strategies=strategies,
            ehr_encoders=ehr_encoders,
            tasks=tasks,
            seeds=seeds,
            bootstrap=bootstrap,
            max_epochs=max_epochs,
            rebalance=rebalance,
        )
        if console is not None:
            console.print(f"[bold]running[/bold] {name}")
        run_dir = root / "runs" / name
        result = run_experiment(cfg, run_dir, progress=progress, console=console)
        rd = RunDir(run_dir)
        imb_path = rd.root / IMBALANCE_FILE
        imb = (
            pl.read_parquet(imb_path)
            if imb_path.exists() and imb_path.stat().st_mtime >= rd.metrics.stat().st_mtime
            else evaluate_imbalance(cfg, rd, result.specs)
        )
        rebalanced = {s.key for s in cfg.strategies if s.training.get("rebalance") == "ogm_ge"}
        assert result.metrics is not None
        frames.append(
            gain_table(
                result.metrics,
                imb,
                setting={"imbalance": w, "site_shift": shift, "sim_seed": seed},
                rebalanced=rebalanced,
            )
        )
    per_cohort = pl.concat(frames) if frames else pl.DataFrame(schema=GAIN_SCHEMA)
    write_parquet(root / "sweep_replicates.parquet", per_cohort)
    per_cohort.write_csv(root / "sweep_replicates.csv")
    level = 1.0 - cfg.evaluation.alpha if settings else 0.95
    table = pool_replicates(per_cohort, level=level)
    write_parquet(root / "sweep.parquet", table)
    table.write_csv(root / "sweep.csv")
    import matplotlib.pyplot as plt

    figs = []
    for shift in shifts:
        fig = sweep_figure(table, site_shift=shift)
        path = root / ("sweep.png" if len(shifts) == 1 else f"sweep_shift{shift:g}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        figs.append(path)
    for shift in shifts:
        fig = gap_figure(per_cohort, site_shift=shift)
        name = "sweep_gap.png" if len(shifts) == 1 else f"sweep_gap_shift{shift:g}.png"
        fig.savefig(root / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        figs.append(root / name)
    summary = write_text(root / "sweep.md", summary_markdown(table, gap_correlation(per_cohort)))
    return SweepResult(root, table, figs, summary)
