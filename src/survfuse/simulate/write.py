"""A multi-site CT + EHR cohort simulator with known ground truth.

`simulate(out_dir, ...)` writes a cohort in the formats a real user has:

- `ct/*.nii.gz` (int16 HU, RAS+) and `ct_index.parquet` (subject_id, study_time, path relative to
  the dataset folder, mask_path): the index CT angiogram of every subject, plus for a few subjects
  an older study and a follow-up study *after* the index (which a correct pipeline never uses);
  each with its region label map `ct/*_seg.nii.gz` (uint8, `survfuse.simulate.ct.REGION_LABELS`:
  what a segmentation model would give);
- `meds/data/*.parquet` (MEDS: subject_id, time, code, numeric_value) and `meds/metadata/`
  (`codes.parquet`, `dataset.json`): events before the index and after it (follow-up, outcomes,
  death: never usable as features);
- `cohort.parquet`: subject_id, prediction_time (= index CT time), site, time, event (= the
  `pe_mortality` task), pe_mortality_time/_event, mace_time/_event (float days, bool);
- `oracle.parquet`: the true log-hazard per task and its parts (never read by models);
- `dataset.json`: every parameter and every derived constant.

Generative model. Each subject has latent factors; image factors (clot burden, RV/LV ratio,
emphysema fraction, coronary calcium volume) are rendered into the CT, EHR factors (cancer, heart
failure, CKD, anaemia, prior MI, troponin, diabetes, LDL, hypertension, sex) into the event stream,
age into both. Per task the log-hazard is

    eta = S * (sqrt(w) * img + sqrt(1 - w) * ehr) + a * age_z + g * 2 sqrt(w (1 - w)) * img * ehr

with img, ehr standardised (mean 0, sd 1 on a fixed reference sample), w = `imbalance` (image share
of the modality-specific signal variance S^2, constant in w), g = `interaction`. Event times are
Weibull, T = (E / (lambda exp(eta)))^(1/k), E ~ Exp(1); follow-up ends at administrative
censoring (study end) or random drop-out; lambda per task is calibrated so the censored fraction is
about `censoring`. A PE death ends MACE follow-up (competing event).

Sites differ in scanner (HU offset, noise, voxel size, blur), case mix (age, cancer, clot
severity), and, at external sites, coding practice (some diagnoses under ICD-9 codes, creatinine in
umol/L). Everything is scaled by `site_shift` (0 = identical sites).

Determinism: latent factors and outcomes are drawn in the main process from `seed`; each subject's
CT and EHR are rendered from its own generator `default_rng([seed, stream, subject index])`, so
chunks can be rendered in parallel and the files are byte-identical for the same arguments.

The generative model (sites, latents, hazards, outcomes, cohort / oracle tables) lives in
`survfuse.simulate.cohort`; this module renders the CT and EHR and writes the files.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from survfuse import __version__
from survfuse.simulate import ehr
from survfuse.simulate.cohort import (
    AGE_COEF,
    DROPOUT_MEAN_YEARS,
    EHR_WEIGHTS,
    IMAGE_WEIGHTS,
    INDEX_END,
    INDEX_START,
    REFERENCE_N,
    SIGNAL,
    STUDY_END,
    TASKS,
    US_PER_DAY,
    WEIBULL_SHAPE,
    CohortArgs,
    check_shape,
    cohort_tables,
    plan_cohort,
    simulate_tables,
)
from survfuse.simulate.ct import Scanner, label_nifti_gz_bytes, nifti_gz_bytes, render_ct

# simulate_tables lives with the generative model and is re-exported here
__all__ = ["simulate", "simulate_tables"]

CHUNK_SIZE = 250
P_PRIOR_CT = 0.08
P_FOLLOWUP_CT = 0.08
OUTPUT_FILES = ("cohort.parquet", "oracle.parquet", "ct_index.parquet", "dataset.json")
INCOMPLETE_MARKER = ".simulation_incomplete"  # present while writing; lets a rerun clean up
_STATIC = np.iinfo(np.int64).min
MEDS_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.timestamp("us")),
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
    ]
)


# ---------------------------------------------------------------------------------------------
# rendering (runs in worker processes)


def mask_path(path: str) -> str:
    """Return the region label map's path of the study at `path` (`x.nii.gz` -> `x_seg.nii.gz`)."""
    return path.removesuffix(".nii.gz") + "_seg.nii.gz"


def _render_chunk(spec: dict[str, Any]) -> int:
    """Render the CT studies and the MEDS shard of one chunk of subjects; returns #subjects."""
    out = Path(spec["out_dir"])
    shape = tuple(spec["shape"])
    seed = spec["seed"]
    for st in spec["studies"]:
        rng = np.random.default_rng([seed, 3, st["subject_index"], st["study_no"]])
        labels = np.zeros(shape, np.uint8)
        arr, spacing = render_ct(st["anatomy"], shape, Scanner(**st["scanner"]), rng, labels)  # type: ignore[arg-type]
        (out / st["path"]).write_bytes(nifti_gz_bytes(arr, spacing))
        (out / mask_path(st["path"])).write_bytes(label_nifti_gz_bytes(labels, spacing))
    t_all, c_all, v_all, s_all = [], [], [], []
    for subj in spec["subjects"]:
        rng = np.random.default_rng([seed, 4, subj["subject_index"]])
        t, c, v = ehr.render_ehr(
            subj["latents"],
            subj["index_us"],
            subj["followup_end_us"],
            subj["pe_death_us"],
            subj["mace_us"],
            subj["coding"],
            rng,
        )
        order = np.lexsort((c, t))
        t_all.append(t[order])
        c_all.append(c[order])
        v_all.append(v[order])
        s_all.append(np.full(t.size, subj["subject_id"], dtype=np.int64))
    times = np.concatenate(t_all)
    codes = np.asarray(ehr.VOCAB, dtype=object)[np.concatenate(c_all)]
    vals = np.concatenate(v_all)
    static = times == _STATIC
    table = pa.table(
        {
            "subject_id": pa.array(np.concatenate(s_all), pa.int64()),
            "time": pa.array(np.where(static, 0, times), pa.timestamp("us"), mask=static),
            "code": pa.array(codes, pa.string()),
            "numeric_value": pa.array(vals, pa.float32(), mask=np.isnan(vals)),
        },
        schema=MEDS_SCHEMA,
    )
    _write_parquet(table, out / spec["meds_path"])
    return len(spec["subjects"])


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Deterministic parquet: fixed codec, row-group size and no wall-clock metadata."""
    pq.write_table(
        table.replace_schema_metadata(None),
        path,
        compression="zstd",
        compression_level=3,
        row_group_size=1_000_000,
        write_statistics=True,
    )


# ---------------------------------------------------------------------------------------------
# public entry point


def simulate(
    out_dir: str | os.PathLike[str],
    *,
    n: int = 3000,
    sites: tuple[str, ...] | list[str] = ("A", "B", "C"),
    external: tuple[str, ...] | list[str] = ("C",),
    seed: int = 0,
    imbalance: float = 0.5,
    interaction: float = 0.3,
    site_shift: float = 1.0,
    censoring: float = 0.6,
    shape: tuple[int, int, int] | list[int] = (64, 64, 40),
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write a simulated multi-site CT + EHR cohort to `out_dir` and return its path.

    `imbalance` w in [0, 1] is the image share of the modality-specific signal (0 = all EHR,
    1 = all image); `interaction` the image x EHR coefficient; `site_shift` scales every
    between-site difference; `censoring` the target censored fraction of each task; `shape` the
    CT volume shape (X, Y, Z). `workers` = rendering processes (default: 2 for large cohorts);
    the output does not depend on it.
    """
    shape3 = tuple(int(s) for s in shape)
    args = CohortArgs(
        n, tuple(sites), tuple(external), seed, imbalance, interaction, site_shift, censoring
    )
    sites, external = args.sites, args.external
    check_shape(shape3)
    shape = (shape3[0], shape3[1], shape3[2])
    out = Path(out_dir)
    _prepare_folder(out)
    (out / "ct").mkdir(parents=True, exist_ok=True)
    (out / "meds" / "data").mkdir(parents=True, exist_ok=True)
    (out / "meds" / "metadata").mkdir(parents=True, exist_ok=True)

    plan = plan_cohort(args)
    props, plist, lat, rng = plan["props"], plan["plist"], plan["lat"], plan["rng"]
    site_idx, index_us, outcomes = plan["site_idx"], plan["index_us"], plan["outcomes"]
    subject_ids, followup_end_us = plan["subject_ids"], plan["followup_end_us"]
    extra = rng.random((n, 2))
    extra_t = rng.random((n, 2))

    # plan studies and subjects per chunk
    chunks: list[dict[str, Any]] = []
    ct_rows: list[tuple[int, int, str]] = []
    for c0 in range(0, n, CHUNK_SIZE):
        studies: list[dict[str, Any]] = []
        subjects: list[dict[str, Any]] = []
        for i in range(c0, min(n, c0 + CHUNK_SIZE)):
            sid = int(subject_ids[i])
            site = plist[site_idx[i]]
            anat = {
                k: float(lat[k][i])
                for k in ("body_scale", "age", "emphysema", "rv_lv", "clot", "calcium_mm3")
            }
            anat["heart_dx"] = float(lat["heart_dx"][i])
            anat["heart_dy"] = float(lat["heart_dy"][i])
            todo = [(0, int(index_us[i]), anat, "index")]
            if extra[i, 0] < P_PRIOR_CT:  # an older study without the acute findings
                t = int(index_us[i]) - int((0.5 + 2.5 * extra_t[i, 0]) * 365.25 * US_PER_DAY)
                prior = dict(anat, clot=0.0, rv_lv=min(anat["rv_lv"], 0.9), age=anat["age"] - 1)
                todo.append((1, t - t % 60_000_000, prior, "prior"))
            fu_days = float(followup_end_us[i] - index_us[i]) / US_PER_DAY
            if extra[i, 1] < P_FOLLOWUP_CT and fu_days > 14.0:  # after the index: never usable
                t = int(index_us[i]) + int(
                    (7.0 + (min(fu_days, 365.0) - 7.0) * extra_t[i, 1]) * US_PER_DAY
                )
                follow = dict(anat, clot=anat["clot"] * 0.3, rv_lv=0.5 * (anat["rv_lv"] + 0.9))
                todo.append((2, t - t % 60_000_000, follow, "followup"))
            for study_no, t_us, an, label in todo:
                path = f"ct/{sid}_{label}.nii.gz"
                studies.append(
                    {
                        "subject_index": i,
                        "study_no": study_no,
                        "anatomy": an,
                        "scanner": site["scanner"],
                        "path": path,
                    }
                )
                ct_rows.append((sid, t_us, path))
            ev_pe, ev_mace = outcomes["pe_mortality"][1][i], outcomes["mace"][1][i]
            subjects.append(
                {
                    "subject_index": i,
                    "subject_id": sid,
                    "latents": {k: float(v[i]) for k, v in lat.items()},
                    "index_us": int(index_us[i]),
                    "followup_end_us": int(followup_end_us[i]),
                    "pe_death_us": int(followup_end_us[i]) if ev_pe else None,
                    "mace_us": (
                        int(index_us[i]) + int(np.rint(outcomes["mace"][0][i] * US_PER_DAY))
                        if ev_mace
                        else None
                    ),
                    "coding": site["coding"],
                }
            )
        chunks.append(
            {
                "out_dir": str(out),
                "shape": list(shape),
                "seed": int(seed),
                "studies": studies,
                "subjects": subjects,
                "meds_path": f"meds/data/shard_{c0 // CHUNK_SIZE:04d}.parquet",
            }
        )

    _run_chunks(chunks, n, workers, progress)

    cohort, oracle = cohort_tables(plan)
    _write_parquet(cohort.to_arrow(), out / "cohort.parquet")
    _write_parquet(oracle.to_arrow(), out / "oracle.parquet")
    ct_rows.sort()
    ct_index = pl.DataFrame(
        {
            "subject_id": [r[0] for r in ct_rows],
            "study_time": pl.Series([r[1] for r in ct_rows]).cast(pl.Datetime("us")),
            "path": [r[2] for r in ct_rows],
            "mask_path": [mask_path(r[2]) for r in ct_rows],
        },
        schema={
            "subject_id": pl.Int64,
            "study_time": pl.Datetime("us"),
            "path": pl.Utf8,
            "mask_path": pl.Utf8,
        },
    )
    _write_parquet(ct_index.to_arrow(), out / "ct_index.parquet")
    _write_meds_metadata(out / "meds" / "metadata")

    params = {
        "n": n,
        "sites": list(sites),
        "external": list(external),
        "seed": seed,
        "imbalance": imbalance,
        "interaction": interaction,
        "site_shift": site_shift,
        "censoring": censoring,
        "shape": list(shape),
    }
    realised = {
        task: {
            "events": int(outcomes[task][1].sum()),
            "censored_fraction": float(1.0 - outcomes[task][1].mean()),
            "median_time_days": float(np.median(outcomes[task][0])),
        }
        for task in TASKS
    }
    meta = {
        "generator": "survfuse.simulate",
        "survfuse_version": __version__,
        "parameters": params,
        "tasks": list(TASKS),
        "default_task": "pe_mortality",
        "sites": props,
        "hazard": {
            "formula": "eta = S*(sqrt(w)*img + sqrt(1-w)*ehr) + a*(age-65)/12 "
            "+ g*2*sqrt(w*(1-w))*img*ehr; T = (E/(lambda*exp(eta)))^(1/k) + 1h",
            "S": SIGNAL,
            "age_coef": AGE_COEF,
            "weibull_shape": WEIBULL_SHAPE,
            "weibull_lambda_per_day": plan["lambdas"],
            "image_weights": IMAGE_WEIGHTS,
            "ehr_weights": EHR_WEIGHTS,
            "standardisation": plan["moments"],
            "reference_n": REFERENCE_N,
        },
        "censoring_model": {
            "index_window": [INDEX_START.isoformat(), INDEX_END.isoformat()],
            "study_end": STUDY_END.isoformat(),
            "dropout_mean_years": DROPOUT_MEAN_YEARS,
            "competing": "PE death ends MACE follow-up",
        },
        "ct": {
            "p_prior_study": P_PRIOR_CT,
            "p_followup_study": P_FOLLOWUP_CT,
            "dtype": "int16",
            "orientation": "RAS",
            "n_studies": len(ct_rows),
        },
        "ehr": {
            "outcome_codes": {"pe_mortality": [ehr.DEATH_CODE], "mace": list(ehr.MACE_CODES)},
            "diagnoses": ehr.DIAGNOSES,
            "labs": {k: v[0] for k, v in ehr.LABS.items()},
            "creatinine_si_code": ehr.CREATININE_SI,
            "n_noise_diagnoses": ehr.N_NOISE_DIAGNOSES,
            "zipf_exponent": ehr.ZIPF_EXPONENT,
        },
        "realised": realised,
        "files": {
            "cohort": "cohort.parquet",
            "oracle": "oracle.parquet",
            "ct_index": "ct_index.parquet",
            "meds": "meds",
        },
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / INCOMPLETE_MARKER).unlink()
    return out


def _prepare_folder(out: Path) -> None:
    """Make `out` ready for a fresh dataset.

    Stale files of an earlier simulation would change the dataset (an extra MEDS shard or CT
    file), so they are removed; any other content is an error rather than something to delete.
    """
    if out.exists() and any(out.iterdir()):
        ours = (out / INCOMPLETE_MARKER).exists()
        if (out / "dataset.json").exists():
            try:
                meta = json.loads((out / "dataset.json").read_text())
                ours = ours or meta.get("generator") == "survfuse.simulate"
            except (ValueError, OSError):
                ours = False
        if not ours:
            raise FileExistsError(
                f"{out} is not empty and does not hold a simulated dataset; "
                "choose an empty or new folder"
            )
        for sub in ("ct", "meds"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in (*OUTPUT_FILES, INCOMPLETE_MARKER):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE_MARKER).write_text("simulation in progress\n")


def _run_chunks(chunks: list[dict[str, Any]], n: int, workers: int | None, progress: bool) -> None:
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if n >= 600 else 1
    bar = None
    task_id = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        bar.start()
        task_id = bar.add_task("simulating subjects", total=n)
    try:
        if workers <= 1 or len(chunks) == 1:
            for ch in chunks:
                done = _render_chunk(ch)
                if bar is not None and task_id is not None:
                    bar.advance(task_id, done)
        else:
            # fork (Linux) needs no `if __name__ == "__main__"` guard in the user's script; the
            # children only use numpy/pyarrow/zlib, never a thread pool inherited from the parent
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for done in pool.map(_render_chunk, chunks):
                    if bar is not None and task_id is not None:
                        bar.advance(task_id, done)
    finally:
        if bar is not None:
            bar.stop()


def _write_meds_metadata(meta_dir: Path) -> None:
    desc = ehr.code_descriptions()
    codes = pa.table(
        {
            "code": pa.array(list(desc), pa.string()),
            "description": pa.array(list(desc.values()), pa.string()),
            "parent_codes": pa.array([[] for _ in desc], pa.list_(pa.string())),
        }
    )
    _write_parquet(codes, meta_dir / "codes.parquet")
    info = {
        "dataset_name": "survfuse simulated CT + EHR cohort",
        "dataset_version": __version__,
        "etl_name": "survfuse.simulate",
        "etl_version": __version__,
        "meds_version": "0.4.1",
    }
    (meta_dir / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
