"""`run_experiment`: config -> splits -> features -> grid cells -> metrics, resumably.

Steps (each safe to repeat after a crash), all under the run folder's lock:
0. remove the temp files an interrupted run left behind;
1. write the resolved config and the cohort with its per-subject splits into the run directory
   (the cohort is validated: a bad row is an error naming its subject and column);
2. check the data sources (MEDS values: null codes, NaN/inf), fit every configured encoder on the
   training rows and encode the whole cohort through the `FeatureStore` (cached chunks are
   reused), saving each fitted encoder for `survfuse predict`; write `data_manifest.parquet`
   (present / missing / failed with the reason, per row x modality x encoder) and print its
   summary;
3. expand the grid and run the unfinished cells through the executor (finished cells with the
   same spec digest are skipped, failed ones are retried);
4. score the finished cells into `metrics.parquet` / `metrics.csv`.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import survfuse
from survfuse.data.cohort import load_cohort
from survfuse.data.meds import MEDSDataset
from survfuse.data.quality import NONFINITE_OUTPUT, manifest_rows, manifest_summary
from survfuse.data.splits import attach_splits, make_splits, predefined_splits
from survfuse.encoders.base import CTSource, hash_keys
from survfuse.encoders.store import FeatureStore
from survfuse.experiment.cell import CellResult
from survfuse.experiment.config import ExperimentConfig
from survfuse.experiment.config_load import encoder_from_choice
from survfuse.experiment.evaluate import evaluate_run
from survfuse.experiment.executors import Executor, get_executor
from survfuse.experiment.grid import CellSpec, expand_grid
from survfuse.experiment.harmonise_step import (
    harmonise_encoded,
    harmonise_record,
    harmonise_summary,
)
from survfuse.experiment.imbalance_eval import imbalance_hook
from survfuse.experiment.lock import RunLock
from survfuse.experiment.rundir import (
    RunDir,
    remove_debris,
    write_json,
    write_parquet,
    write_text,
)
from survfuse.features import MODALITIES, ModalityFeatures
from survfuse.progress import progress_bar

__all__ = [
    "POST_EVALUATION",
    "DataQualityError",
    "RunResult",
    "check_sources",
    "encode_features",
    "prepare_cohort",
    "run_experiment",
    "sources",
    "write_data_manifest",
]


class DataQualityError(ValueError):
    """Data that would be used silently although it is broken (names the subject and file)."""


@dataclass
class RunResult:
    """What a run did: its folder, cells (by status) and the metrics table."""

    run_dir: Path
    specs: list[CellSpec]
    results: list[CellResult] = field(default_factory=list)
    metrics: pl.DataFrame | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.status == "failed"]


def prepare_cohort(cfg: ExperimentConfig, rd: RunDir) -> pl.DataFrame:
    """Load the cohort, make the per-subject splits and write both into the run directory."""
    cohort = load_cohort(cfg.data.cohort, date_format=cfg.data.date_format)
    sp = cfg.splits
    if sp.column is not None:
        splits = predefined_splits(cohort.df, sp.column, sp.external_sites, source=cfg.data.cohort)
    else:
        splits = make_splits(
            cohort,
            external_sites=list(sp.external_sites),
            seed=sp.seed,
            val_frac=sp.val_frac,
            test_frac=sp.test_frac,
            stratify=sp.stratify,
        )
    df = attach_splits(cohort.df, splits)
    write_parquet(rd.splits, splits)
    write_parquet(rd.cohort, df)
    return df


def sources(cfg: ExperimentConfig) -> dict[str, Any]:
    """Return the input source of each modality: a CTSource for CT, a MEDSDataset for EHR."""
    out: dict[str, Any] = {}
    if cfg.data.ct_index is not None:
        src = CTSource.from_index(cfg.data.ct_index)
        if cfg.data.ct_root is not None:
            src = CTSource(index=src.index, root=cfg.data.ct_root, index_path=cfg.data.ct_index)
        out["ct"] = src
    if cfg.data.meds_root is not None:
        out["ehr"] = MEDSDataset(cfg.data.meds_root)
    return out


def _keys(df: pl.DataFrame) -> pl.DataFrame:
    # Encoders see keys only: never outcomes, sites or splits (no label leakage by construction).
    return df.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
    )


def _meta(folder: Path) -> dict[str, Any]:
    import json

    try:
        out: dict[str, Any] = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return out


def encode_features(
    cfg: ExperimentConfig,
    rd: RunDir,
    cohort: pl.DataFrame,
    executor: Executor,
    *,
    progress: bool = True,
    console: Any = None,
) -> dict[str, dict[str, str]]:
    """Fit (training rows) and encode (all rows) every encoder; returns modality -> label -> folder."""
    store = FeatureStore(cfg.feature_store or rd.store)
    srcs = check_sources(cfg)
    keys = _keys(cohort)
    train_keys = _keys(cohort.filter(pl.col("split") == "train"))
    index: dict[str, dict[str, str]] = {}
    manifests: list[pl.DataFrame] = []
    harmonised: dict[str, Path] = {}
    for modality in MODALITIES:
        for choice in getattr(cfg.encoders, modality):
            if console is not None:
                console.print(f"[bold]encoding[/bold] {modality}: {choice.key}")
            encoder = encoder_from_choice(choice, where=f"encoders.{modality}")
            feats = executor.encode(
                store, encoder, keys, srcs[modality], fit_cohort=train_keys, progress=progress
            )
            last = store.last_run
            sid = np.asarray(feats.subject_id)
            folder = None
            if last is not None:
                candidate = last.directory / "results" / hash_keys(sid, feats.prediction_time)[:20]
                if (candidate / "meta.json").exists():
                    folder = candidate
            if folder is None or not folder.is_relative_to(rd.root):
                # Encoded elsewhere (another executor or a shared store outside the run):
                # keep a copy inside the run so the run folder is self-contained.
                folder = rd.root / "features" / modality / choice.key
                if _meta(folder).get("fingerprint") != feats.meta.get("fingerprint") or (
                    "fingerprint" not in feats.meta
                ):
                    ModalityFeatures.save(feats, folder)
            encoder.save(rd.encoder_dir(modality, choice.key))
            if cfg.harmonise.applies(modality):  # cells read the per-site adjusted copy
                folder = harmonise_encoded(cfg, rd, cohort, modality, choice.key, feats)
                harmonised[f"{modality}/{choice.key}"] = folder
            index.setdefault(modality, {})[choice.key] = str(folder.relative_to(rd.root))
            manifests.append(
                manifest_rows(
                    pl.DataFrame(
                        {"subject_id": sid, "prediction_time": np.asarray(feats.prediction_time)}
                    ),
                    np.asarray(feats.present),
                    modality=modality,
                    encoder=choice.key,
                    loader_manifest=feats.meta.get("manifest") or (),
                    features=np.asarray(feats.pooled),
                )
            )
    write_json(rd.features_index, index)
    write_json(harmonise_record(rd), harmonise_summary(cfg, rd, cohort, harmonised))
    if manifests:
        write_data_manifest(rd, cohort, pl.concat(manifests), console=console)
    return index


def write_data_manifest(
    rd: RunDir, cohort: pl.DataFrame, manifest: pl.DataFrame, *, console: Any = None
) -> pl.DataFrame:
    """Write `data_manifest.parquet` (site and split joined in) and print its summary.

    Stops the run when an encoder produced NaN/inf features for a row it marks present.
    """
    extra = [c for c in ("site", "split") if c in cohort.columns]
    if extra:
        manifest = manifest.join(
            cohort.select(
                pl.col("subject_id").cast(pl.Int64),
                pl.col("prediction_time").cast(pl.Datetime("us")),
                *extra,
            ),
            on=["subject_id", "prediction_time"],
            how="left",
        )
    write_parquet(rd.data_manifest, manifest)
    for line in manifest_summary(manifest):
        if console is not None:
            console.print(f"[bold]data[/bold] {line}", soft_wrap=True)
    if "split" in manifest.columns:
        train = manifest.filter(pl.col("split") == "train")
        for (modality, encoder), part in train.group_by(["modality", "encoder"]):
            if part.height and not (part["status"] == "present").any():
                why = manifest_summary(part)[0]
                raise DataQualityError(
                    f"{modality} encoder {encoder!r}: no training row has usable data ({why}); "
                    f"see {rd.data_manifest}"
                )
    broken = manifest.filter(pl.col("reason").str.ends_with(NONFINITE_OUTPUT))
    if broken.height:
        row = broken.row(0, named=True)
        raise DataQualityError(
            f"{row['reason']} for subject {row['subject_id']} at {row['prediction_time']} "
            f"({broken.height} rows; see {rd.data_manifest})"
        )
    return manifest


def check_sources(cfg: ExperimentConfig) -> dict[str, Any]:
    """Open every modality source and check its data before any work.

    The MEDS shards' values (`MEDSDataset.validate(deep=True)`: null codes or subject ids, NaN/inf
    values) and the CT index. Raises a ValueError that names the file, subject and column.
    """
    srcs = sources(cfg)
    if "ehr" in srcs:
        srcs["ehr"].validate(deep=True)
    return srcs


# Analyses that run after the metrics of every run (e.g. the modality-imbalance analysis):
# each is called as hook(cfg, run_dir, specs, executor) and writes its own files into the run.
POST_EVALUATION: list[Callable[[ExperimentConfig, RunDir, list[CellSpec], Executor], None]] = [
    imbalance_hook,
]


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    executor: Executor | None = None,
    progress: bool = True,
    console: Any = None,
) -> RunResult:
    """Run (or resume) the whole study of `cfg` in `run_dir`; see the module docstring.

    Holds the run folder's lock (`RunLockedError` when another run holds it) and removes the
    temp files of an interrupted run before anything else.
    """
    t0 = _time.perf_counter()
    rd = RunDir(run_dir)
    if rd.root.exists() and not rd.root.is_dir():
        raise NotADirectoryError(f"run folder {rd.root} exists and is not a folder")
    with RunLock(rd.root) as lock:
        if lock.stale and console is not None:
            console.print(
                f"[yellow]resuming[/yellow] after a run that stopped (PID {lock.stale.get('pid')})"
            )
        # Why under the lock: a live run's temp folders are never debris; ours are.
        removed = remove_debris(rd, store=cfg.feature_store is None)
        if removed and console is not None:
            console.print(f"removed {removed} temp files/folders left by an interrupted run")
        return _run_locked(cfg, rd, t0, executor=executor, progress=progress, console=console)


def _run_locked(
    cfg: ExperimentConfig,
    rd: RunDir,
    t0: float,
    *,
    executor: Executor | None,
    progress: bool,
    console: Any,
) -> RunResult:

    write_text(rd.config, cfg.dump())
    own_executor = executor is None
    if executor is None:
        options: dict[str, Any] = {"workers": cfg.workers}
        if cfg.ray_address:
            options["address"] = cfg.ray_address
        options["ray"] = cfg.ray  # the Ray executor's options (others ignore them)
        executor = get_executor(cfg.executor, **options)
    try:
        cohort = prepare_cohort(cfg, rd)
        features = encode_features(cfg, rd, cohort, executor, progress=progress, console=console)
        specs = expand_grid(cfg, features)
        todo = [s for s in specs if not rd.is_done(s.cell_id, s.digest())]
        write_json(
            rd.run_info,
            {
                "survfuse_version": survfuse.__version__,
                "started": _time.time(),
                "cells": len(specs),
                "cells_to_run": len(todo),
                "executor": executor.name,
            },
        )
        results: list[CellResult] = []
        with progress_bar(
            "[bold]cells[/bold]", note="{task.description}", enabled=progress, console=console
        ) as bar:
            task = bar.add_task("", total=len(specs), completed=len(specs) - len(todo))

            def done(r: CellResult) -> None:
                results.append(r)
                note = (
                    f"[red]failed[/red] {r.cell_id}: {r.error}"
                    if r.status == "failed"
                    else r.cell_id
                )
                bar.update(task, advance=1, description=note)
                if r.status == "failed" and console is not None:
                    console.print(f"[red]cell failed[/red] {r.cell_id}: {r.error}")

            executor.run(todo, rd.root, on_result=done)
        metrics = evaluate_run(cfg, rd, specs, executor=executor, progress=progress)
        for hook in POST_EVALUATION:
            hook(cfg, rd, specs, executor)
        seconds = _time.perf_counter() - t0
        info = {
            "survfuse_version": survfuse.__version__,
            "finished": _time.time(),
            "seconds": round(seconds, 3),
            "cells": len(specs),
            "cells_run": len(todo),
            "cells_failed": sorted(r.cell_id for r in results if r.status == "failed"),
            "executor": executor.name,
        }
        write_json(rd.run_info, info)
        return RunResult(rd.root, specs, results, metrics, seconds)
    finally:
        if own_executor:
            executor.close()
