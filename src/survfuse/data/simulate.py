"""A multi-site CT + EHR cohort simulator with known ground truth.

`simulate(out_dir, ...)` writes a cohort in the formats a real user has:

- `ct/*.nii.gz` (int16 HU, RAS+) and `ct_index.parquet` (subject_id, study_time, path relative to
  the dataset folder): the index CT angiogram of every subject, plus for a few subjects an older
  study and a follow-up study *after* the index (which a correct pipeline never uses);
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
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import multiprocessing
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.special import ndtr

from survfuse import __version__
from survfuse.data import simulate_ehr as ehr
from survfuse.data.simulate_ct import Scanner, nifti_gz_bytes, render_ct

TASKS = ("pe_mortality", "mace")
US_PER_DAY = ehr.US_PER_DAY
INDEX_START = dt.datetime(2016, 1, 1)
INDEX_END = dt.datetime(2021, 12, 31)
STUDY_END = dt.datetime(2023, 1, 1)  # administrative censoring
DROPOUT_MEAN_YEARS = 10.0  # random censoring: exponential loss to follow-up
MIN_EVENT_DAYS = 1.0 / 24.0  # outcomes happen at least an hour after the index CT
SIGNAL = 1.4  # S: sd of the modality-specific part of the log-hazard
AGE_COEF = {"pe_mortality": 0.35, "mace": 0.45}
WEIBULL_SHAPE = {"pe_mortality": 0.7, "mace": 1.1}
IMAGE_WEIGHTS = {
    "pe_mortality": {"clot": 1.0, "rv_lv": 0.6, "emphysema": 0.3},
    "mace": {"log_calcium": 1.0},
}
EHR_WEIGHTS = {
    "pe_mortality": {"cancer": 0.9, "z_hf": 0.5, "z_ckd": 0.4, "z_anemia": 0.3},
    "mace": {
        "prior_mi": 0.8,
        "z_trop": 0.6,
        "diabetes": 0.4,
        "z_ldl": 0.3,
        "hypertension": 0.3,
        "male": 0.3,
        "z_ckd": 0.2,
    },
}
REFERENCE_N = 20_000
CHUNK_SIZE = 250
P_PRIOR_CT = 0.08
P_FOLLOWUP_CT = 0.08
FIRST_SUBJECT_ID = 10_001
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
# sites


def site_properties(
    sites: tuple[str, ...], external: tuple[str, ...], site_shift: float
) -> dict[str, dict[str, Any]]:
    """Scanner, case mix, coding practice and sampling weight of each site (deterministic)."""
    props: dict[str, dict[str, Any]] = {}
    dev_rank = 0
    ext_rank = 0
    d = float(site_shift)
    for name in sites:
        if name in external:
            sign = 1.0 if ext_rank % 2 else -1.0
            scanner = Scanner(
                spacing_scale=1.0 + 0.12 * d,
                hu_offset=sign * 25.0 * d,
                noise_sd=10.0 + 12.0 * d,
                blur_xy=0.35 + 0.25 * d,
                blur_z=0.45 + 0.35 * d,
            )
            mix = {"age_mean": 65.0 + 5.0 * d, "cancer_p": 0.2 + 0.12 * d, "clot_shift": 0.3 * d}
            coding = {"recode_p": min(1.0, 0.8 * d), "creatinine_si": float(d > 0)}
            weight = 0.8
            ext_rank += 1
        else:
            offs = (0.0, 8.0, -6.0, 5.0, -4.0)[dev_rank % 5]
            scanner = Scanner(
                spacing_scale=1.0 - 0.03 * d * (dev_rank % 3),
                hu_offset=offs * d,
                noise_sd=10.0 + 3.0 * d * (dev_rank % 3),
                blur_xy=0.35 + 0.1 * d * (dev_rank % 2),
                blur_z=0.45 + 0.1 * d * (dev_rank % 2),
            )
            mix = {
                "age_mean": 65.0 + (-1.5, 1.5, 0.0)[dev_rank % 3] * d,
                "cancer_p": 0.2 + (-0.02, 0.02, 0.0)[dev_rank % 3] * d,
                "clot_shift": 0.0,
            }
            coding = {"recode_p": 0.0, "creatinine_si": 0.0}
            weight = 1.0 - 0.1 * (dev_rank % 3)
            dev_rank += 1
        props[name] = {
            "external": name in external,
            "scanner": asdict(scanner),
            "case_mix": mix,
            "coding": coding,
            "weight": weight,
        }
    return props


# ---------------------------------------------------------------------------------------------
# latent factors and hazards


def _draw_latents(
    rng: np.random.Generator, site_idx: np.ndarray, props: list[dict[str, Any]]
) -> dict[str, np.ndarray]:
    """Latent factors of len(site_idx) subjects (vectorised)."""
    n = site_idx.size

    def per_site(key: str) -> np.ndarray:
        return np.array([p["case_mix"][key] for p in props])[site_idx]

    lat: dict[str, np.ndarray] = {}
    lat["age"] = np.clip(rng.normal(per_site("age_mean"), 12.0), 25.0, 95.0)
    lat["male"] = (rng.random(n) < 0.5).astype(np.float64)
    lat["body_scale"] = np.clip(rng.normal(1.0, 0.06, n), 0.85, 1.15)
    # image factors
    z_clot = rng.normal(per_site("clot_shift"), 1.0)
    lat["clot"] = 0.85 * ndtr(z_clot - 0.3)
    z_rv = 0.5 * z_clot + np.sqrt(0.75) * rng.normal(size=n)  # clot strains the right ventricle
    lat["rv_lv"] = np.clip(0.9 + 0.2 * z_rv, 0.55, 1.6)
    lat["emphysema"] = 0.35 * ndtr(rng.normal(size=n) - 1.0)
    z_cac = rng.normal(size=n)
    # no calcium in ~27%; otherwise at least 150 mm^3 (a lesion the 6 mm voxels resolve)
    lat["calcium_mm3"] = np.where(
        z_cac < -0.6, 0.0, np.minimum(150.0 * np.exp(0.9 * (z_cac + 0.6)), 3000.0)
    )
    lat["log_calcium"] = np.log1p(lat["calcium_mm3"] / 50.0)
    lat["heart_dx"] = rng.normal(0.0, 4.0, n)
    lat["heart_dy"] = rng.normal(0.0, 4.0, n)
    # EHR factors
    lat["cancer"] = (rng.random(n) < per_site("cancer_p")).astype(np.float64)
    for k in ("z_hf", "z_ckd", "z_anemia", "z_trop", "z_ldl"):
        lat[k] = rng.normal(size=n)
    lat["heart_failure"] = (lat["z_hf"] > 1.1).astype(np.float64)
    lat["ckd"] = (lat["z_ckd"] > 1.0).astype(np.float64)
    lat["prior_mi"] = (rng.random(n) < 0.08 + 0.05 * lat["male"]).astype(np.float64)
    lat["diabetes"] = (rng.random(n) < 0.2).astype(np.float64)
    p_htn = np.clip(0.35 + 0.01 * (lat["age"] - 60.0), 0.05, 0.8)
    lat["hypertension"] = (rng.random(n) < p_htn).astype(np.float64)
    lat["statin"] = np.maximum.reduce(
        [lat["prior_mi"], lat["diabetes"], (lat["z_ldl"] > 1.0).astype(np.float64)]
    )
    lat["history_years"] = rng.uniform(2.0, 8.0, n)
    for concept in ehr.DIAGNOSES:
        lat[f"onset_{concept}"] = rng.uniform(0.5, 15.0, n)  # years before the index
    lat["age_c"] = lat["age"] - 60.0
    return lat


def _raw_parts(lat: dict[str, np.ndarray], task: str) -> tuple[np.ndarray, np.ndarray]:
    img = sum(w * lat[k] for k, w in IMAGE_WEIGHTS[task].items())
    ehr_ = sum(w * lat[k] for k, w in EHR_WEIGHTS[task].items())
    return np.asarray(img, dtype=np.float64), np.asarray(ehr_, dtype=np.float64)


def _hazard_parts(
    lat: dict[str, np.ndarray],
    task: str,
    moments: dict[str, float],
    imbalance: float,
    interaction: float,
) -> dict[str, np.ndarray]:
    """The log-hazard of `task` and its image, EHR, shared (age) and interaction parts."""
    img_raw, ehr_raw = _raw_parts(lat, task)
    img = (img_raw - moments["img_mean"]) / moments["img_sd"]
    ehr_z = (ehr_raw - moments["ehr_mean"]) / moments["ehr_sd"]
    w = float(imbalance)
    parts = {
        "image": SIGNAL * np.sqrt(w) * img,
        "ehr": SIGNAL * np.sqrt(1.0 - w) * ehr_z,
        "shared": AGE_COEF[task] * (lat["age"] - 65.0) / 12.0,
        "interaction": interaction * 2.0 * np.sqrt(w * (1.0 - w)) * img * ehr_z,
    }
    parts["log_hazard"] = parts["image"] + parts["ehr"] + parts["shared"] + parts["interaction"]
    return parts


def _event_times(eta: np.ndarray, lam: float, shape_k: float, unit_exp: np.ndarray) -> np.ndarray:
    """Weibull event times in days: T = (E / (lambda exp(eta)))^(1/k)."""
    return MIN_EVENT_DAYS + (unit_exp / (lam * np.exp(eta))) ** (1.0 / shape_k)


def _calibrate_lambda(
    eta: np.ndarray,
    shape_k: float,
    unit_exp: np.ndarray,
    censor_days: np.ndarray,
    target: float,
) -> float:
    """Weibull scale so that the censored fraction P(T > C) is about `target` (bisection)."""
    lo, hi = -40.0, 20.0  # log lambda
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        frac = float(np.mean(_event_times(eta, np.exp(mid), shape_k, unit_exp) > censor_days))
        if frac > target:
            lo = mid  # too much censoring: raise the hazard
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def _followup(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index times (us since epoch, whole minutes) and follow-up end in days after the index."""
    span_min = int((INDEX_END - INDEX_START).total_seconds() // 60)
    start_us = int((INDEX_START - dt.datetime(1970, 1, 1)).total_seconds()) * 1_000_000
    index_us = start_us + rng.integers(0, span_min, size=n) * 60_000_000
    end_us = int((STUDY_END - dt.datetime(1970, 1, 1)).total_seconds()) * 1_000_000
    admin_days = (end_us - index_us) / US_PER_DAY
    dropout_days = rng.exponential(DROPOUT_MEAN_YEARS * 365.25, size=n)
    return index_us, np.minimum(admin_days, dropout_days)


def _outcomes(
    etas: dict[str, np.ndarray],
    lambdas: dict[str, float],
    unit_exp: dict[str, np.ndarray],
    censor_days: np.ndarray,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(time days, event) per task; a PE death ends MACE follow-up."""
    t_pe = _event_times(
        etas["pe_mortality"],
        lambdas["pe_mortality"],
        WEIBULL_SHAPE["pe_mortality"],
        unit_exp["pe_mortality"],
    )
    t_mace = _event_times(etas["mace"], lambdas["mace"], WEIBULL_SHAPE["mace"], unit_exp["mace"])
    end_pe = censor_days
    ev_pe = t_pe <= end_pe
    time_pe = np.minimum(t_pe, end_pe)
    end_mace = np.minimum(time_pe, censor_days)
    ev_mace = t_mace <= end_mace
    time_mace = np.minimum(t_mace, end_mace)
    return {"pe_mortality": (time_pe, ev_pe), "mace": (time_mace, ev_mace)}


# ---------------------------------------------------------------------------------------------
# rendering (runs in worker processes)


def _render_chunk(spec: dict[str, Any]) -> int:
    """Render the CT studies and the MEDS shard of one chunk of subjects; returns #subjects."""
    out = Path(spec["out_dir"])
    shape = tuple(spec["shape"])
    seed = spec["seed"]
    for st in spec["studies"]:
        rng = np.random.default_rng([seed, 3, st["subject_index"], st["study_no"]])
        arr, spacing = render_ct(st["anatomy"], shape, Scanner(**st["scanner"]), rng)  # type: ignore[arg-type]
        (out / st["path"]).write_bytes(nifti_gz_bytes(arr, spacing))
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
    sites = tuple(str(s) for s in sites)
    external = tuple(str(s) for s in external)
    shape3 = tuple(int(s) for s in shape)
    _check_args(n, sites, external, imbalance, interaction, site_shift, censoring, shape3)
    shape = (shape3[0], shape3[1], shape3[2])
    out = Path(out_dir)
    _prepare_folder(out)
    (out / "ct").mkdir(parents=True, exist_ok=True)
    (out / "meds" / "data").mkdir(parents=True, exist_ok=True)
    (out / "meds" / "metadata").mkdir(parents=True, exist_ok=True)

    plan = _plan(n, sites, external, seed, imbalance, interaction, site_shift, censoring)
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

    cohort, oracle = _tables(plan)
    _write_parquet(cohort.to_arrow(), out / "cohort.parquet")
    _write_parquet(oracle.to_arrow(), out / "oracle.parquet")
    ct_rows.sort()
    ct_index = pl.DataFrame(
        {
            "subject_id": [r[0] for r in ct_rows],
            "study_time": pl.Series([r[1] for r in ct_rows]).cast(pl.Datetime("us")),
            "path": [r[2] for r in ct_rows],
        },
        schema={"subject_id": pl.Int64, "study_time": pl.Datetime("us"), "path": pl.Utf8},
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
        "generator": "survfuse.data.simulate",
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
    """Make `out` ready for a fresh dataset: stale files of an earlier simulation would change
    the dataset (an extra MEDS shard or CT file), so they are removed; any other content is an
    error rather than something to delete."""
    if out.exists() and any(out.iterdir()):
        ours = (out / INCOMPLETE_MARKER).exists()
        if (out / "dataset.json").exists():
            try:
                meta = json.loads((out / "dataset.json").read_text())
                ours = ours or meta.get("generator") == "survfuse.data.simulate"
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


def _plan(
    n: int,
    sites: tuple[str, ...],
    external: tuple[str, ...],
    seed: int,
    imbalance: float,
    interaction: float,
    site_shift: float,
    censoring: float,
) -> dict[str, Any]:
    """Latent factors, hazards and outcomes of the cohort (everything but the rendering)."""
    props = site_properties(sites, external, site_shift)
    plist = [props[s] for s in sites]
    weights = np.array([p["weight"] for p in plist])
    weights = weights / weights.sum()

    # reference sample: standardisation moments and baseline calibration, independent of n
    ref_rng = np.random.default_rng([seed, 1])
    ref_sites = ref_rng.choice(len(sites), size=REFERENCE_N, p=weights)
    ref_lat = _draw_latents(ref_rng, ref_sites, plist)
    moments: dict[str, dict[str, float]] = {}
    for task in TASKS:
        img_raw, ehr_raw = _raw_parts(ref_lat, task)
        moments[task] = {
            "img_mean": float(img_raw.mean()),
            "img_sd": float(img_raw.std()),
            "ehr_mean": float(ehr_raw.mean()),
            "ehr_sd": float(ehr_raw.std()),
        }
    _, ref_censor = _followup(ref_rng, REFERENCE_N)
    ref_eta = {
        t: _hazard_parts(ref_lat, t, moments[t], imbalance, interaction)["log_hazard"]
        for t in TASKS
    }
    ref_e = {t: ref_rng.exponential(size=REFERENCE_N) for t in TASKS}
    lambdas: dict[str, float] = {}
    lambdas["pe_mortality"] = _calibrate_lambda(
        ref_eta["pe_mortality"],
        WEIBULL_SHAPE["pe_mortality"],
        ref_e["pe_mortality"],
        ref_censor,
        censoring,
    )
    t_pe_ref = np.minimum(
        _event_times(
            ref_eta["pe_mortality"],
            lambdas["pe_mortality"],
            WEIBULL_SHAPE["pe_mortality"],
            ref_e["pe_mortality"],
        ),
        ref_censor,
    )
    lambdas["mace"] = _calibrate_lambda(
        ref_eta["mace"], WEIBULL_SHAPE["mace"], ref_e["mace"], t_pe_ref, censoring
    )

    # the cohort
    rng = np.random.default_rng([seed, 2])
    site_idx = rng.choice(len(sites), size=n, p=weights)
    lat = _draw_latents(rng, site_idx, plist)
    index_us, censor_days = _followup(rng, n)
    parts = {t: _hazard_parts(lat, t, moments[t], imbalance, interaction) for t in TASKS}
    unit_exp = {t: rng.exponential(size=n) for t in TASKS}
    outcomes = _outcomes({t: parts[t]["log_hazard"] for t in TASKS}, lambdas, unit_exp, censor_days)
    # snap event/censoring times to microseconds so cohort and MEDS agree exactly
    for task in TASKS:
        t_days, ev = outcomes[task]
        t_us = np.rint(t_days * US_PER_DAY).astype(np.int64)
        outcomes[task] = (t_us / US_PER_DAY, ev)
    subject_ids = FIRST_SUBJECT_ID + np.arange(n, dtype=np.int64)
    followup_end_us = index_us + np.rint(outcomes["pe_mortality"][0] * US_PER_DAY).astype(np.int64)
    return {
        "props": props,
        "plist": plist,
        "sites": sites,
        "moments": moments,
        "lambdas": lambdas,
        "site_idx": site_idx,
        "lat": lat,
        "index_us": index_us,
        "parts": parts,
        "outcomes": outcomes,
        "subject_ids": subject_ids,
        "followup_end_us": followup_end_us,
        "rng": rng,
    }


ORACLE_LATENTS = (
    "age",
    "male",
    "body_scale",
    "clot",
    "rv_lv",
    "emphysema",
    "calcium_mm3",
    "cancer",
    "heart_failure",
    "ckd",
    "prior_mi",
    "diabetes",
    "hypertension",
    "z_hf",
    "z_ckd",
    "z_anemia",
    "z_trop",
    "z_ldl",
)


def _tables(plan: dict[str, Any]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The cohort table and the oracle table of a plan."""
    outcomes, parts, lat = plan["outcomes"], plan["parts"], plan["lat"]
    pred_time = pl.Series("prediction_time", plan["index_us"]).cast(pl.Datetime("us"))
    site_names = pl.Series(
        "site", np.asarray(plan["sites"], dtype=object)[plan["site_idx"]].tolist(), pl.Utf8
    )
    cohort = pl.DataFrame(
        {
            "subject_id": plan["subject_ids"],
            "prediction_time": pred_time,
            "site": site_names,
            "time": outcomes["pe_mortality"][0],
            "event": outcomes["pe_mortality"][1],
            "pe_mortality_time": outcomes["pe_mortality"][0],
            "pe_mortality_event": outcomes["pe_mortality"][1],
            "mace_time": outcomes["mace"][0],
            "mace_event": outcomes["mace"][1],
        }
    )
    cols: dict[str, Any] = {
        "subject_id": plan["subject_ids"],
        "prediction_time": pred_time,
        "site": site_names,
    }
    for task in TASKS:
        for part in ("log_hazard", "image", "ehr", "shared", "interaction"):
            cols[f"{task}_{part}"] = parts[task][part]
    for k in ORACLE_LATENTS:
        cols[f"latent_{k}"] = lat[k]
    return cohort, pl.DataFrame(cols)


def simulate_tables(
    *,
    n: int = 3000,
    sites: tuple[str, ...] | list[str] = ("A", "B", "C"),
    external: tuple[str, ...] | list[str] = ("C",),
    seed: int = 0,
    imbalance: float = 0.5,
    interaction: float = 0.3,
    site_shift: float = 1.0,
    censoring: float = 0.6,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The (cohort, oracle) tables `simulate` writes for the same arguments, without rendering
    any CT or EHR (fast: for studying the outcome model, e.g. oracle C-indices)."""
    sites_t = tuple(str(x) for x in sites)
    external_t = tuple(str(x) for x in external)
    _check_args(n, sites_t, external_t, imbalance, interaction, site_shift, censoring, (8, 8, 8))
    return _tables(
        _plan(n, sites_t, external_t, seed, imbalance, interaction, site_shift, censoring)
    )


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
        "etl_name": "survfuse.data.simulate",
        "etl_version": __version__,
        "meds_version": "0.4.1",
    }
    (meta_dir / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _check_args(
    n: int,
    sites: tuple[str, ...],
    external: tuple[str, ...],
    imbalance: float,
    interaction: float,
    site_shift: float,
    censoring: float,
    shape: tuple[int, ...],
) -> None:
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not sites or len(set(sites)) != len(sites):
        raise ValueError(f"sites must be non-empty and unique, got {list(sites)}")
    unknown = [s for s in external if s not in sites]
    if unknown:
        raise ValueError(f"external sites {unknown} are not among sites {list(sites)}")
    if not 0.0 <= imbalance <= 1.0:
        raise ValueError(f"imbalance must lie in [0, 1], got {imbalance}")
    if not np.isfinite(interaction):
        raise ValueError(f"interaction must be finite, got {interaction}")
    if site_shift < 0:
        raise ValueError(f"site_shift must be >= 0, got {site_shift}")
    if not 0.0 < censoring < 1.0:
        raise ValueError(f"censoring must lie in (0, 1), got {censoring}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {list(shape)}")
