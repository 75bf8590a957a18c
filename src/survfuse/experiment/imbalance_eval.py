"""Modality contributions of every fused model of a run: `RUN_DIR/imbalance.parquet` (+ .csv).

For each finished two-modality cell the trained model is reloaded and its risk is predicted with
only CT and with only EHR present (`survfuse.analysis.ablation_risks`; cached in
`RUN_DIR/imbalance/ablation/<cell_id>.<digest>.parquet`). Then, per task x evaluation split x
fused model, `survfuse.analysis.modality_contributions` gives the ablation C's, the Shapley
contributions, the imbalance index and the unimodal gap against the unimodal baselines of the
same encoders, seeds averaged as in `metrics.parquet`, with percentile CIs on exactly the
resamples of the run's evaluation (`evaluate.group_seed`). The baseline the fusion gain refers to
is the better of the two on validation (never chosen on a test split).

Each model x split's result is cached in `RUN_DIR/eval_cache/imbalance/<digest>.parquet`, keyed
by a SHA-256 of its inputs (the outcomes, subjects, every risk it reads, the reference, the
bootstrap settings), so an unchanged run re-reads it; a progress bar counts the models.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from survfuse.analysis import ablation_risks, modality_contributions
from survfuse.analysis.imbalance import TABLE_SCHEMA
from survfuse.data.cohort import outcome_columns
from survfuse.data.splits import EVAL_SPLITS
from survfuse.experiment.cell import load_features
from survfuse.experiment.config import ExperimentConfig
from survfuse.experiment.config_load import parse_config
from survfuse.experiment.eval_cache import CACHE_DIR
from survfuse.experiment.evaluate import MODEL_SCHEMA, group_seed
from survfuse.experiment.grid import CellSpec
from survfuse.experiment.rundir import RunDir, write_parquet
from survfuse.fusion import FusionSurvivalModel
from survfuse.metrics import MetricUndefinedError

__all__ = [
    "IMBALANCE_FILE",
    "ablation_predictions",
    "ensure_imbalance",
    "evaluate_imbalance",
    "imbalance_hook",
]

IMBALANCE_FILE = "imbalance.parquet"
IMBALANCE_CACHE = "imbalance"  # under eval_cache/
_VERSION = "2026.2"  # bump when what a cached result holds changes (2026.2: lower / upper columns)
MODEL_COLUMNS = {
    **MODEL_SCHEMA,
    "n_seeds": pl.Int64,
    "reference_modality": pl.Utf8,
}


def _ablation_file(rd: RunDir, spec: CellSpec) -> Path:
    return rd.root / "imbalance" / "ablation" / f"{spec.cell_id}.{spec.digest()[:16]}.parquet"


def ablation_predictions(
    rd: RunDir, spec: CellSpec, rows: np.ndarray | None = None
) -> pl.DataFrame:
    """Predict the risk of one finished fused cell per cohort row, with and without each modality.

    Columns `full`, `ct` (only CT present), `ehr` (only EHR present); predicted for `rows` only
    (default: all; NaN elsewhere, e.g. the training rows, which no analysis scores). Cached per cell
    digest.
    """
    path = _ablation_file(rd, spec)
    if path.exists():
        return pl.read_parquet(path)
    model = FusionSurvivalModel.load(rd.cell(spec.cell_id) / "model", device="cpu")
    features = load_features(rd, spec)
    n = len(next(iter(features.values())))
    idx = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    risks = ablation_risks(model, {m: f.select(idx) for m, f in features.items()})
    cols = {}
    for k in ("full", "ct", "ehr"):
        col = np.full(n, np.nan)
        col[idx] = risks[k]
        cols[k] = col
    df = pl.DataFrame(cols)
    write_parquet(path, df)
    return df


def _risk_matrix(rd: RunDir, cells: list[CellSpec], rows: np.ndarray) -> np.ndarray:
    out = [pl.read_parquet(rd.cell(c.cell_id) / "predictions.parquet")["risk"] for c in cells]
    return np.stack([r.to_numpy()[rows] for r in out]).astype(np.float64)


def _baselines(
    specs: list[CellSpec], fused: CellSpec, metrics: pl.DataFrame | None
) -> dict[str, list[CellSpec]]:
    """Return the unimodal cells (all seeds) of each modality with the fused model's encoder.

    When the config has several unimodal strategies per modality, the best on validation
    Harrell C.
    """
    out: dict[str, list[CellSpec]] = {}
    for m in ("ct", "ehr"):
        enc = fused.ct_encoder if m == "ct" else fused.ehr_encoder
        cand: dict[str, list[CellSpec]] = {}
        for s in specs:
            s_enc = s.ct_encoder if m == "ct" else s.ehr_encoder
            if s.task == fused.task and s.modalities == [m] and s_enc == enc:
                cand.setdefault(s.model, []).append(s)
        if not cand:
            continue
        best = next(iter(cand))
        if len(cand) > 1 and metrics is not None:
            val = metrics.filter(
                (pl.col("task") == fused.task)
                & (pl.col("split") == "validation")
                & (pl.col("metric") == "harrell_c")
                & pl.col("model").is_in(list(cand))
            ).sort("estimate", descending=True, nulls_last=True)
            if val.height:
                best = str(val["model"][0])
        out[m] = sorted(cand[best], key=lambda c: c.seed)
    return out


def _digest(meta: dict[str, Any], arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps({"version": _VERSION, **meta}, sort_keys=True).encode())
    for a in arrays:
        arr = np.ascontiguousarray(a)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _model_frames(
    rd: RunDir,
    cohort: pl.DataFrame,
    split: np.ndarray,
    sid: np.ndarray,
    done: list[CellSpec],
    metrics: pl.DataFrame | None,
    ev: Any,
    task: str,
    model: str,
    cells: list[CellSpec],
    cache_dir: Path,
    used: set[str],
) -> list[pl.DataFrame]:
    """Compute the imbalance rows of one fused model, per evaluation split (validation first)."""
    schema = {**MODEL_COLUMNS, **TABLE_SCHEMA}
    eval_rows = np.flatnonzero(np.isin(split, list(EVAL_SPLITS)))
    cells = sorted(cells, key=lambda c: c.seed)
    abl = [ablation_predictions(rd, c, eval_rows) for c in cells]
    base = _baselines(done, cells[0], metrics)
    tcol, ecol = outcome_columns(task)
    time = cohort[tcol].cast(pl.Float64).to_numpy()
    event = cohort[ecol].cast(pl.Boolean).to_numpy()
    reference: str | None = None
    frames: list[pl.DataFrame] = []
    for name in sorted(EVAL_SPLITS, key=lambda s: s != "validation"):  # validation first
        rows = np.flatnonzero(split == name)
        if rows.size == 0:
            continue
        risks = {k: np.stack([a[k].to_numpy()[rows] for a in abl]) for k in ("full", "ct", "ehr")}
        uni = {m: _risk_matrix(rd, cs, rows) for m, cs in base.items()}
        ref_arg = reference if reference in uni else None
        seed = group_seed(ev.seed, task, name)
        key = _digest(
            {
                "task": task,
                "split": name,
                "model": model,
                "reference": ref_arg,
                "uni": sorted(uni),
                "n_boot": ev.bootstrap,
                "seed": seed,
                "level": 1.0 - ev.alpha,
            },
            [time[rows], event[rows], sid[rows], *risks.values(), *uni.values()],
        )
        path = cache_dir / f"{key[:32]}.parquet"
        used.add(path.stem)
        if path.exists():
            t = pl.read_parquet(path)
        else:
            try:
                res = modality_contributions(
                    time[rows],
                    event[rows],
                    risks,
                    unimodal=uni,
                    reference=ref_arg,
                    cluster=sid[rows],
                    n_boot=ev.bootstrap,
                    seed=seed,
                    level=1.0 - ev.alpha,
                )
            except MetricUndefinedError as exc:
                warnings.warn(f"imbalance {task}/{name}/{model}: {exc}", stacklevel=2)
                continue
            t = res.table().with_columns(pl.lit(res.reference, dtype=pl.Utf8).alias("_reference"))
            write_parquet(path, t)
        res_reference = t["_reference"][0] if t.height else ref_arg
        if name == "validation":
            reference = res_reference
        spec = cells[0]
        info = {
            "task": task,
            "split": name,
            "model": model,
            "strategy": spec.strategy,
            "fusion": spec.strategy_name,
            "ct_encoder": spec.ct_encoder,
            "ehr_encoder": spec.ehr_encoder,
            "head": spec.head,
            "n_seeds": len(cells),
            "reference_modality": res_reference,
        }
        frames.append(
            t.with_columns(
                [pl.lit(v, dtype=MODEL_COLUMNS[k]).alias(k) for k, v in info.items()]
            ).select(list(schema))
        )
    return frames


def evaluate_imbalance(
    cfg: ExperimentConfig,
    rd: RunDir,
    specs: list[CellSpec],
    *,
    write: bool = True,
    progress: bool = True,
    console: Any = None,
) -> pl.DataFrame:
    """Compute the imbalance table of a run (module docstring); written to RUN_DIR when `write`.

    Columns: task, split, model, strategy, fusion, ct_encoder, ehr_encoder, head, n_seeds,
    reference_modality, then `ImbalanceAnalysis.table()`'s quantity, modality, estimate,
    lower, upper, level, n_boot, seed, n_subjects, n_events.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    schema = {**MODEL_COLUMNS, **TABLE_SCHEMA}
    cohort = pl.read_parquet(rd.cohort)
    split = cohort["split"].to_numpy()
    sid = cohort["subject_id"].cast(pl.Int64).to_numpy()
    metrics = pl.read_parquet(rd.metrics) if rd.metrics.exists() else None
    done = [s for s in specs if rd.is_done(s.cell_id, s.digest())]
    fused: dict[tuple[str, str], list[CellSpec]] = {}
    for s in done:
        if sorted(s.modalities) == ["ct", "ehr"]:
            fused.setdefault((s.task, s.model), []).append(s)
    ev = cfg.evaluation
    frames: list[pl.DataFrame] = []
    cache_dir = rd.root / CACHE_DIR / IMBALANCE_CACHE
    used: set[str] = set()
    bar = Progress(
        TextColumn("[bold]imbalance[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
        console=console,
    )
    with bar:
        job = bar.add_task("fused models", total=len(fused))
        for (task, model), cells in fused.items():
            bar.update(job, description=f"{task}/{model}")
            frames.extend(
                _model_frames(
                    rd, cohort, split, sid, done, metrics, ev, task, model, cells, cache_dir, used
                )
            )
            bar.advance(job)
    if cache_dir.exists():
        for f in cache_dir.glob("*.parquet"):
            if f.stem not in used:
                f.unlink(missing_ok=True)
    table = pl.concat(frames) if frames else pl.DataFrame(schema=schema)
    if write:
        path = rd.root / IMBALANCE_FILE
        write_parquet(path, table)
        tmp = path.with_name(".imbalance.csv.tmp")
        table.write_csv(tmp)
        tmp.replace(path.with_suffix(".csv"))
    return table


def ensure_imbalance(run_dir: str | Path) -> Path | None:
    """Return `RUN_DIR/imbalance.parquet`, computing it first when missing or stale.

    Computed from the run folder alone (its resolved config and the cells' spec.json) when it is
    missing or older than `metrics.parquet`; None when the run has no metrics yet.
    """
    import json

    rd = RunDir(run_dir)
    path = rd.root / IMBALANCE_FILE
    if not rd.metrics.exists():
        return None
    if path.exists() and path.stat().st_mtime >= rd.metrics.stat().st_mtime:
        return path
    cfg = parse_config(rd.read_config_yaml(), source=str(rd.config))
    specs = []
    if rd.cells.exists():
        for d in sorted(rd.cells.iterdir()):
            f = d / "spec.json"
            if d.is_dir() and not d.name.startswith(".") and f.exists():
                specs.append(CellSpec.model_validate(json.loads(f.read_text())))
    evaluate_imbalance(cfg, rd, specs)
    return path


def imbalance_hook(cfg: ExperimentConfig, rd: RunDir, specs: list[CellSpec], executor: Any) -> None:
    """Write the imbalance table of every run (the `runner.POST_EVALUATION` hook).

    A failure here is a warning, not a failed run (the metrics are already written; the report
    retries it).
    """
    try:
        evaluate_imbalance(cfg, rd, specs)
    except Exception as exc:  # the analysis must not fail a finished run
        warnings.warn(
            f"modality-imbalance analysis failed: {type(exc).__name__}: {exc}", stacklevel=2
        )
