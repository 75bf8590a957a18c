"""Synthetic MEDS event streams for the cohort simulator.

One subject's timeline is rendered from its latent EHR factors: birth, sex, several years of
visits with diagnosis codes (signal concepts plus Zipf-distributed noise codes), lab values whose
trajectories follow the latent factors, medications, the index ED visit just before the CT, and the
events after the index (follow-up visits, outcome diagnoses, death) that a correct pipeline must
never read. Codes follow the MIMIC-IV MEDS style (`DIAGNOSIS//ICD//10//I50.9`, `LAB//name//unit`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: emit(times_us, code or code ids, value=nan): append rows to a subject's event list
Emit = Callable[..., None]

US_PER_DAY = 86_400_000_000
DAYS_PER_YEAR = 365.25

# signal diagnoses: concept -> (development-site code, external-site alternative code)
DIAGNOSES: dict[str, tuple[str, str]] = {
    "heart_failure": ("DIAGNOSIS//ICD//10//I50.9", "DIAGNOSIS//ICD//9//428.0"),
    "cancer": ("DIAGNOSIS//ICD//10//C34.90", "DIAGNOSIS//ICD//9//162.9"),
    "ckd": ("DIAGNOSIS//ICD//10//N18.3", "DIAGNOSIS//ICD//9//585.3"),
    "prior_mi": ("DIAGNOSIS//ICD//10//I25.2", "DIAGNOSIS//ICD//10//I25.2"),
    "diabetes": ("DIAGNOSIS//ICD//10//E11.9", "DIAGNOSIS//ICD//9//250.00"),
    "hypertension": ("DIAGNOSIS//ICD//10//I10", "DIAGNOSIS//ICD//10//I10"),
}
MEDICATIONS: dict[str, str] = {
    "heart_failure": "MEDICATION//furosemide",
    "cancer": "MEDICATION//carboplatin",
    "ckd": "MEDICATION//sevelamer",
    "prior_mi": "MEDICATION//aspirin",
    "diabetes": "MEDICATION//metformin",
    "hypertension": "MEDICATION//lisinopril",
    "statin": "MEDICATION//atorvastatin",
}
# labs: name -> (code, log-normal measurement noise sd)
LABS: dict[str, tuple[str, float]] = {
    "creatinine": ("LAB//creatinine//mg/dL", 0.08),
    "nt_probnp": ("LAB//NT-proBNP//pg/mL", 0.30),
    "troponin": ("LAB//troponin_T//ng/L", 0.25),
    "hemoglobin": ("LAB//hemoglobin//g/dL", 0.05),
    "ldl": ("LAB//LDL//mg/dL", 0.10),
    "glucose": ("LAB//glucose//mg/dL", 0.12),
    "sodium": ("LAB//sodium//mmol/L", 0.015),
    "potassium": ("LAB//potassium//mmol/L", 0.06),
}
#: creatinine as reported at a site that uses SI units (value x 88.4)
CREATININE_SI = "LAB//creatinine//umol/L"
CREATININE_SI_FACTOR = 88.4
VISITS = ("VISIT//OUTPATIENT", "HOSPITAL_ADMISSION", "ED_REGISTRATION")
INDEX_PROCEDURE = "PROCEDURE//CT_PULMONARY_ANGIOGRAM"
#: outcome codes: only ever written after prediction_time
MACE_CODES = ("DIAGNOSIS//ICD//10//I21.4", "DIAGNOSIS//ICD//10//I63.9")
DEATH_CODE = "MEDS_DEATH"
BIRTH_CODE = "MEDS_BIRTH"
N_NOISE_DIAGNOSES = 400
P_CODED = 0.6  # a known chronic condition is coded at a given visit with this probability
P_CODED_AT_INDEX = 0.8
N_NOISE_MEDICATIONS = 60
ZIPF_EXPONENT = 1.1


def _noise_codes() -> tuple[list[str], list[str]]:
    """Deterministic noise vocabularies (ICD-10-like and drug-like), disjoint from signal codes."""
    letters = "DFGHJKLMRZ"  # chapters not used by the signal concepts
    diag = [
        f"DIAGNOSIS//ICD//10//{letters[i % len(letters)]}{(i * 7) % 100:02d}.{i // 100}"
        for i in range(N_NOISE_DIAGNOSES)
    ]
    meds = [f"MEDICATION//drug_{i:03d}" for i in range(N_NOISE_MEDICATIONS)]
    return diag, meds


NOISE_DIAGNOSES, NOISE_MEDICATIONS = _noise_codes()


def _zipf_p(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT
    return p / p.sum()


_P_NOISE_DX = _zipf_p(N_NOISE_DIAGNOSES)
_P_NOISE_RX = _zipf_p(N_NOISE_MEDICATIONS)


def vocabulary() -> list[str]:
    """Every code the simulator can emit (fixed order): the code table for ids."""
    codes = [BIRTH_CODE, DEATH_CODE, "GENDER//F", "GENDER//M", INDEX_PROCEDURE, *VISITS]
    for dev, ext in DIAGNOSES.values():
        codes += [dev, ext]
    codes += list(MEDICATIONS.values())
    codes += [c for c, _ in LABS.values()] + [CREATININE_SI]
    codes += list(MACE_CODES) + NOISE_DIAGNOSES + NOISE_MEDICATIONS
    return list(dict.fromkeys(codes))  # unique, order kept


VOCAB = vocabulary()
CODE_ID = {c: i for i, c in enumerate(VOCAB)}


def code_descriptions() -> dict[str, str]:
    """Human-readable descriptions for `meds/metadata/codes.parquet`."""
    desc = {
        BIRTH_CODE: "birth",
        DEATH_CODE: "death",
        "GENDER//F": "sex female",
        "GENDER//M": "sex male",
        INDEX_PROCEDURE: "index CT pulmonary angiogram",
        "VISIT//OUTPATIENT": "outpatient visit",
        "HOSPITAL_ADMISSION": "hospital admission",
        "ED_REGISTRATION": "emergency department registration",
        CREATININE_SI: "creatinine (SI units)",
        MACE_CODES[0]: "acute myocardial infarction (outcome)",
        MACE_CODES[1]: "cerebral infarction (outcome)",
    }
    for concept, (dev, ext) in DIAGNOSES.items():
        desc[dev] = concept.replace("_", " ")
        desc.setdefault(ext, concept.replace("_", " "))
    for concept, code in MEDICATIONS.items():
        desc[code] = f"medication for {concept.replace('_', ' ')}"
    for name, (code, _) in LABS.items():
        desc[code] = f"lab {name}"
    for c in NOISE_DIAGNOSES:
        desc[c] = "unrelated diagnosis"
    for c in NOISE_MEDICATIONS:
        desc[c] = "unrelated medication"
    return {c: desc[c] for c in VOCAB}


def lab_level(name: str, lat: dict[str, float], years_before: np.ndarray) -> np.ndarray:
    """Noise-free lab value at `years_before` index; disease makes values drift toward the index."""
    prog = 1.0 - 0.08 * years_before  # progression: strongest at the index
    if name == "creatinine":
        return 0.85 * (1.0 + 0.15 * lat["male"]) * np.exp(0.38 * lat["z_ckd"] * prog)
    if name == "nt_probnp":
        return np.exp(
            np.log(90.0) + 1.1 * lat["z_hf"] * prog + 0.25 * lat["z_ckd"] + 0.02 * lat["age_c"]
        )
    if name == "troponin":
        return np.exp(np.log(9.0) + 0.55 * lat["z_trop"] * prog + 0.5 * lat["prior_mi"])
    if name == "hemoglobin":
        return 13.8 + 1.0 * lat["male"] - 1.2 * lat["z_anemia"] * prog - 0.9 * lat["cancer"]
    stable = {  # no trend over the history
        "ldl": max(40.0, 115.0 + 32.0 * lat["z_ldl"] - 35.0 * lat["statin"]),  # statins lower it
        "glucose": 98.0 + 55.0 * lat["diabetes"],
        "sodium": 139.0 - 1.5 * max(lat["z_hf"], 0.0),
        "potassium": 4.2 + 0.25 * lat["z_ckd"],
    }
    if name not in stable:
        raise KeyError(f"unknown lab {name!r}")
    return np.full(years_before.shape, stable[name])


def render_ehr(
    lat: dict[str, float],
    index_us: int,
    followup_end_us: int,
    pe_death_us: int | None,
    mace_us: int | None,
    coding: dict[str, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One subject's MEDS rows as (time_us int64 with INT64_MIN = static, code_id int32, value f32).

    `coding`: {"recode_p": probability a recodable concept uses the site's alternative code,
    "creatinine_si": 1.0 if the site reports creatinine in umol/L}. Rows are unsorted.
    """
    times: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    vals: list[np.ndarray] = []

    def emit(t: np.ndarray | int, code: str | np.ndarray, val: np.ndarray | float = np.nan) -> None:
        t_arr = np.atleast_1d(np.asarray(t, dtype=np.int64))
        c_arr = (
            np.full(t_arr.shape, CODE_ID[code], dtype=np.int32)
            if isinstance(code, str)
            else np.asarray(code, dtype=np.int32)
        )
        times.append(t_arr)
        codes.append(c_arr)
        vals.append(np.broadcast_to(np.asarray(val, dtype=np.float32), t_arr.shape))

    static = np.iinfo(np.int64).min
    emit(static, "GENDER//M" if lat["male"] > 0.5 else "GENDER//F")
    age_days = lat["age"] * DAYS_PER_YEAR
    birth_us = index_us - int(age_days * US_PER_DAY)
    emit(birth_us - birth_us % US_PER_DAY, BIRTH_CODE)  # a date: midnight

    # visits before the index: a Poisson process over the history window, denser when sicker
    history_years = lat["history_years"]
    burden = lat["heart_failure"] + lat["cancer"] + lat["ckd"] + lat["prior_mi"] + lat["diabetes"]
    rate = 3.0 + 1.5 * burden  # visits per year
    n_vis = int(rng.poisson(rate * history_years))
    yb = np.sort(rng.uniform(2.0 / DAYS_PER_YEAR, history_years, size=n_vis))[::-1]
    vis_t = index_us - (yb * DAYS_PER_YEAR * US_PER_DAY).astype(np.int64)
    vis_t -= vis_t % (US_PER_DAY // 24)  # whole hours
    kind = rng.choice(3, size=n_vis, p=[0.82, 0.09, 0.09])
    for k in range(3):
        sel = kind == k
        emit(vis_t[sel], VISITS[k])
    _visit_content(emit, lat, vis_t, yb, kind, coding, rng)

    # the index ED visit a few hours before the CT, with its labs; the CT itself at the index
    ed_t = index_us - int(rng.uniform(2.0, 8.0) * US_PER_DAY / 24)
    emit(ed_t, "ED_REGISTRATION")
    lab_t = ed_t + int(0.5 * US_PER_DAY / 24)
    for name in ("creatinine", "hemoglobin", "troponin", "nt_probnp", "sodium", "potassium"):
        _emit_lab(emit, name, lat, np.array([lab_t]), np.zeros(1), coding, rng)
    # the ED encounter's problem list: known chronic conditions, coded with the site's practice
    for concept, (dev, ext) in DIAGNOSES.items():
        if lat[concept] > 0.5 and rng.random() < P_CODED_AT_INDEX:
            emit(ed_t + 60_000_000, ext if rng.random() < coding["recode_p"] else dev)
    emit(index_us, INDEX_PROCEDURE)

    # after the index: follow-up visits, outcome diagnoses and death (never usable as features)
    # visit content lies up to 30 minutes after the visit: keep it before the end of follow-up
    span_days = (followup_end_us - index_us - US_PER_DAY // 24) / US_PER_DAY
    n_fu = int(rng.poisson(2.5 * span_days / DAYS_PER_YEAR)) if span_days > 1.0 else 0
    if n_fu:
        fu_t = (index_us + rng.uniform(1.0, span_days, n_fu) * US_PER_DAY).astype(np.int64)
        emit(fu_t, "VISIT//OUTPATIENT")
        _visit_content(emit, lat, fu_t, np.zeros(n_fu), np.zeros(n_fu, dtype=int), coding, rng)
    if mace_us is not None:
        emit(mace_us, "HOSPITAL_ADMISSION")
        emit(mace_us, MACE_CODES[int(rng.random() < 0.3)])
        _emit_lab(emit, "troponin", lat, np.array([mace_us]), np.zeros(1), coding, rng, scale=30.0)
    if pe_death_us is not None:
        emit(pe_death_us, DEATH_CODE)

    return np.concatenate(times), np.concatenate(codes), np.concatenate(vals)


def _emit_lab(
    emit: Emit,
    name: str,
    lat: dict[str, float],
    t: np.ndarray,
    years_before: np.ndarray,
    coding: dict[str, float],
    rng: np.random.Generator,
    scale: float = 1.0,
) -> None:
    if t.size == 0:
        return
    code, sd = LABS[name]
    val = lab_level(name, lat, years_before) * scale * np.exp(rng.normal(0.0, sd, size=t.size))
    if name == "creatinine" and coding["creatinine_si"] > 0.5:
        code, val = CREATININE_SI, val * CREATININE_SI_FACTOR
    emit(t, code, np.round(val, 2))


def _visit_content(
    emit: Emit,
    lat: dict[str, float],
    vis_t: np.ndarray,
    years_before: np.ndarray,
    kind: np.ndarray,
    coding: dict[str, float],
    rng: np.random.Generator,
) -> None:
    """Diagnoses, medications, labs and noise codes of a set of visits (vectorised)."""
    n = vis_t.size
    if n == 0:
        return
    # chronic conditions: coded at visits after their onset, not at every visit
    for concept, (dev, ext) in DIAGNOSES.items():
        if lat[concept] < 0.5:
            continue
        coded = (years_before <= lat[f"onset_{concept}"]) & (rng.random(n) < P_CODED)
        if coded.any():
            alt = rng.random(int(coded.sum())) < coding["recode_p"]
            ids = np.where(alt, CODE_ID[ext], CODE_ID[dev])
            emit(vis_t[coded] + 60_000_000, ids)
            rx = coded & (rng.random(n) < 0.6)
            emit(vis_t[rx] + 120_000_000, MEDICATIONS[concept])
    if lat["statin"] > 0.5:
        rx = rng.random(n) < 0.5
        emit(vis_t[rx] + 120_000_000, MEDICATIONS["statin"])
    # labs: a basic panel at most visits; cardiac markers mostly at acute visits
    acute = kind > 0
    panel = acute | (rng.random(n) < 0.5)
    t_lab = vis_t + 30 * 60_000_000
    for name in ("creatinine", "hemoglobin", "sodium", "potassium", "glucose"):
        _emit_lab(emit, name, lat, t_lab[panel], years_before[panel], coding, rng)
    bnp = panel & (acute | (lat["heart_failure"] > 0.5) | (rng.random(n) < 0.1))
    _emit_lab(emit, "nt_probnp", lat, t_lab[bnp], years_before[bnp], coding, rng)
    trop = panel & (acute | (rng.random(n) < 0.05))
    _emit_lab(emit, "troponin", lat, t_lab[trop], years_before[trop], coding, rng)
    ldl = (~acute) & (rng.random(n) < 0.25)
    _emit_lab(emit, "ldl", lat, t_lab[ldl], years_before[ldl], coding, rng)
    # noise: Zipf-distributed unrelated diagnoses and medications
    n_dx = rng.poisson(1.8, size=n)
    if n_dx.sum():
        ids = rng.choice(N_NOISE_DIAGNOSES, size=int(n_dx.sum()), p=_P_NOISE_DX)
        emit(np.repeat(vis_t, n_dx) + 60_000_000, ids + CODE_ID[NOISE_DIAGNOSES[0]])
    n_rx = rng.poisson(0.6, size=n)
    if n_rx.sum():
        ids = rng.choice(N_NOISE_MEDICATIONS, size=int(n_rx.sum()), p=_P_NOISE_RX)
        emit(np.repeat(vis_t, n_rx) + 120_000_000, ids + CODE_ID[NOISE_MEDICATIONS[0]])
