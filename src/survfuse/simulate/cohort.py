"""The generative model of the simulated cohort (`survfuse.simulate`), without file writing.

Sites, latent factors, log-hazards, outcomes and the cohort / oracle tables.

Per task the log-hazard is

    eta = S * (sqrt(w) * img + sqrt(1 - w) * ehr) + a * age_z + g * 2 sqrt(w (1 - w)) * img * ehr

with img, ehr standardised on a fixed reference sample (see `survfuse.simulate` for the
whole model). Latent factors and outcomes are drawn from `seed` alone (`plan_cohort`);
`simulate_tables` gives the (cohort, oracle) tables `simulate` writes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy.special import ndtr

from survfuse.simulate import ehr
from survfuse.simulate.ct import Scanner

__all__ = [
    "TASKS",
    "CohortArgs",
    "check_shape",
    "cohort_tables",
    "plan_cohort",
    "simulate_tables",
    "site_properties",
]

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
FIRST_SUBJECT_ID = 10_001

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
    """Compute the log-hazard of `task` and its image, EHR, shared (age) and interaction parts."""
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
# the cohort: plan (latents, hazards, outcomes) and tables


@dataclass(frozen=True)
class CohortArgs:
    """The arguments of the generative model, those `simulate` and `simulate_tables` share.

    Site names are made str; checked on creation with a message naming the argument.
    """

    n: int
    sites: tuple[str, ...]
    external: tuple[str, ...]
    seed: int
    imbalance: float
    interaction: float
    site_shift: float
    censoring: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(str(s) for s in self.sites))
        object.__setattr__(self, "external", tuple(str(s) for s in self.external))
        n, sites, external = self.n, self.sites, self.external
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"sites must be non-empty and unique, got {list(sites)}")
        unknown = [s for s in external if s not in sites]
        if unknown:
            raise ValueError(f"external sites {unknown} are not among sites {list(sites)}")
        if not 0.0 <= self.imbalance <= 1.0:
            raise ValueError(f"imbalance must lie in [0, 1], got {self.imbalance}")
        if not np.isfinite(self.interaction):
            raise ValueError(f"interaction must be finite, got {self.interaction}")
        if self.site_shift < 0:
            raise ValueError(f"site_shift must be >= 0, got {self.site_shift}")
        if not 0.0 < self.censoring < 1.0:
            raise ValueError(f"censoring must lie in (0, 1), got {self.censoring}")


def plan_cohort(args: CohortArgs) -> dict[str, Any]:
    """Latent factors, hazards and outcomes of the cohort (everything but the rendering)."""
    n, sites, seed = args.n, args.sites, args.seed
    imbalance, interaction, censoring = args.imbalance, args.interaction, args.censoring
    props = site_properties(sites, args.external, args.site_shift)
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


def cohort_tables(plan: dict[str, Any]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Build the cohort table and the oracle table of a plan."""
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
    """Return the (cohort, oracle) tables `simulate` writes for the same arguments.

    Without rendering any CT or EHR (fast: for studying the outcome model, e.g. oracle
    C-indices).
    """
    args = CohortArgs(
        n, tuple(sites), tuple(external), seed, imbalance, interaction, site_shift, censoring
    )
    return cohort_tables(plan_cohort(args))


def check_shape(shape: tuple[int, ...]) -> None:
    """Reject a CT volume `shape` of `simulate` that is not 3 sizes >= 8."""
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {list(shape)}")
