"""`run_sweep`: a sweep over simulated cohorts that shows where fusion helps.

Simulate a cohort per (imbalance, site shift), run every strategy through the runner, and
tabulate + plot the gain over the best unimodal baseline.

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

The gain of a fused model is the runner's paired difference against each task's reference, the best
unimodal model on validation: delta = C(fused) - C(reference) on internal and external test, with
its percentile CI over the run's shared subject-level resamples (seeds averaged). The row `best
fusion` takes, per setting and task, the fused model with the highest validation C (never chosen on
a test split; column `selected` names it). With `rebalance=True` every fused strategy also runs with
OGM-GE gradient modulation (`<strategy>_ogm`), so its effect appears as extra lines. The measured CT
share of the Shapley contributions (`survfuse.analysis`) is added to each row.

Pooling replicates: the R cohorts are independent studies of the same setting, so their gains are
combined by a DerSimonian-Laird random-effects meta-analysis
(`survfuse.metrics.meta.random_effects`; the between-cohort variance tau^2 absorbs that training
runs and cohorts differ by more than test sampling explains). Each cohort's bootstrap interval gives
its within-cohort standard error, se_r = (upper_r - lower_r) / (2 z) with z the run's two-sided
normal quantile. With R = 1 the run's own percentile interval is kept. With few cohorts tau^2 is
imprecise: the interval is approximate. `best fusion` is selected on validation within each cohort
(column `selected` counts the choices).

Measured balance: the nominal w says where the simulator put the signal, not how much of it the
encoders recover (on the 32x32x20 simulator the MACE image factor, coronary calcium, is about
one voxel, and CT-only MACE models score C ~0.5 at every w). So every row also carries the
measured unimodal gap of its cohort and split, `unimodal_gap` = C(best CT-only model) - C(best
EHR-only model) (each modality's unimodal model chosen on validation), and `sweep_gap.png` plots
each cohort's best-fusion gain against it; `sweep.md` gives the Spearman correlation between
|unimodal_gap| and that gain (negative: fusion helps most when the modalities are balanced).

Outputs: `OUT/sweep.parquet` / `sweep.csv` (pooled: one row per w x shift x task x split x
model) and `OUT/sweep_replicates.parquet` / `.csv` (one row per cohort); the figures and
`OUT/sweep.md` are drawn by `survfuse.report.sweep.write_sweep_report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from survfuse.encoders.base import CTSource
from survfuse.encoders.ct_radiomics import CTRadiomicsEncoder, grid_positions
from survfuse.experiment.config import EncoderChoice, ExperimentConfig, StrategyChoice
from survfuse.experiment.config_load import parse_config
from survfuse.experiment.demo import default_demo_config
from survfuse.experiment.imbalance_eval import IMBALANCE_FILE, evaluate_imbalance
from survfuse.experiment.rundir import RunDir, write_parquet
from survfuse.experiment.runner import run_experiment
from survfuse.experiment.sweep_tables import GAIN_SCHEMA, gain_table, pool_replicates
from survfuse.registry import look_up_option
from survfuse.simulate import simulate

__all__ = ["SweepResult", "run_sweep", "sweep_config", "write_cell_embeddings"]


@dataclass
class SweepResult:
    """The sweep's folder, its pooled gain table, the per-cohort table and the site shifts.

    `survfuse.report.sweep.write_sweep_report` draws and summarises them.
    """

    out: Path
    table: pl.DataFrame
    per_cohort: pl.DataFrame
    site_shifts: list[float]


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
    """Write CT embeddings of every cohort row as an npz for the `precomputed` encoder.

    pooled =
    [whole-volume features, each grid cell's features] (raw `ct_radiomics` statistics), tokens =
    cells + centre positions, mask = cells with voxels. Rows without a CT are left out (the
    encoder then marks them absent with `on_missing="absent"`).
    """
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
    """Return the base study pointed at `data_dir` and reduced for a sweep (module docstring).

    strategies: keys to keep (e.g. `unimodal_ct`, `late`; unimodal baselines are always kept);
    ehr_encoders: EHR encoder keys to keep; seeds: training seeds 0..seeds-1; ct_embeddings:
    an npz of `write_cell_embeddings` that replaces the CT encoders (label `ct_cells`).
    """
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
    return SweepResult(root, table, per_cohort, shifts)
