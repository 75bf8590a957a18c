"""A schema-faithful miniature INSPECT release, written by the tests (nothing stored).

Layout, with the column names and value spellings of the real release (see
`survfuse.convert.inspect_tables` for the upstream files they come from):

- `labels/study_mapping_20250611.tsv` (`impression_id`, `person_id`, `image_id`,
  `procedure_DATETIME`, `note_DATETIME`), `labels/labels_20250611.tsv` (`impression_id`,
  `pe_positive_nlp`, `{1,6,12}_month_mortality`, `{1,6,12}_month_readmission`, `12_month_PH`
  as `TRUE` / `FALSE` / `Censored`), `labels/splits_20250611.tsv` (`impression_id`, `split` in
  train / valid / test); or the older single `cohort_0.2.0_master_file_anon.csv` (`True` /
  `False`);
- `CTPA/<image_id>` NIfTI volumes (20 x 20 x 16 voxels, air -1000 HU around a ~40 HU body);
- `meds/data/*.parquet`: MEDS 0.1 nested shards (`patient_id`, `static_measurements`,
  `events[].time`, `events[].measurements[]`), with `MEDS_DEATH` events.

Built in deliberately: 2 studies without a CT time, 1 duplicate (person, CT time), 1 study
without a labels row, 1 missing CT file, 1 wrong released 1-month label, 1 death recorded before
the CT, 1 NaN lab value, 1 MEDS patient outside the cohort. `build_miniature` returns the counts a
correct conversion must report.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from survfuse.simulate.ct import nifti_gz_bytes

MEAS = pa.struct(
    [
        ("code", pa.string()),
        ("text_value", pa.string()),
        ("numeric_value", pa.float32()),
        ("datetime_value", pa.timestamp("us")),
        ("metadata", pa.null()),
    ]
)
EVENT = pa.struct([("time", pa.timestamp("us")), ("measurements", pa.list_(MEAS))])
#: `meds` 0.1.x `patient_schema()` (Medical-Event-Data-Standard/meds, before the 0.2 flattening).
MEDS01 = pa.schema(
    [
        ("patient_id", pa.int64()),
        ("static_measurements", pa.list_(MEAS)),
        ("events", pa.list_(EVENT)),
    ]
)
LABELS = [
    "pe_positive_nlp",
    "1_month_mortality",
    "6_month_mortality",
    "12_month_mortality",
    "1_month_readmission",
    "6_month_readmission",
    "12_month_readmission",
    "12_month_PH",
]
HORIZONS = {"1_month_mortality": 30, "6_month_mortality": 180, "12_month_mortality": 365}
CODES = ["ICD10CM/I26.99", "ICD10CM/C34.90", "ICD10CM/I50.9", "LOINC/2160-0", "LOINC/6598-7"]


def ct_volume(rng: np.random.Generator, risk: float) -> np.ndarray:
    """A small CT in HU: air, an elliptic body of soft tissue, lungs, a denser blob with risk."""
    x, y, z = np.meshgrid(np.linspace(-1, 1, 20), np.linspace(-1, 1, 20), np.linspace(-1, 1, 16))
    vol = np.full(x.shape, -1000.0)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    vol[body] = 40.0
    lungs = ((np.abs(x) - 0.45) / 0.3) ** 2 + (y / 0.45) ** 2 < 1
    vol[lungs & body] = -850.0
    vol[(x**2 + y**2 + z**2) < 0.05 + 0.1 * risk] = 60.0 + 100.0 * risk
    vol += rng.normal(0, 10, vol.shape)
    return np.asarray(np.clip(vol, -1024, 3000), dtype=np.int16)


def _label(pt: dt.datetime, death: dt.datetime | None, last: dt.datetime, days: int) -> str:
    """femr's horizon rule, spelled out independently of survfuse."""
    if death is not None and pt + dt.timedelta(minutes=1) <= death <= pt + dt.timedelta(days=days):
        return "True"
    return "Censored" if last < pt + dt.timedelta(days=days) else "False"


def build_miniature(
    root: Path, n: int = 40, seed: int = 0, layout: str = "split"
) -> dict[str, Any]:
    """Write the miniature under `root`; return the expected conversion counts and paths."""
    rng = np.random.default_rng(seed)
    (root / "CTPA").mkdir(parents=True, exist_ok=True)
    (root / "meds" / "data").mkdir(parents=True, exist_ok=True)
    pids = [1000 + 7 * k for k in range(n)]
    split_of = {p: ("train", "valid", "test")[0 if k % 5 < 3 else 1 if k % 5 == 3 else 2]
                for k, p in enumerate(pids)}  # fmt: skip
    studies: list[dict[str, Any]] = []
    patients: list[dict[str, Any]] = []
    n_death_before = 0
    deaths_total = 0
    for k, pid in enumerate(pids):
        risk = float(rng.random())
        t0 = dt.datetime(2010, 1, 1) + dt.timedelta(
            days=int(rng.integers(0, 2500)), minutes=int(rng.integers(0, 1440))
        )
        t0 = t0.replace(second=0)
        times = [t0] + ([t0 + dt.timedelta(days=int(rng.integers(40, 200)))] if k % 7 == 0 else [])
        dies = risk > 0.45
        death = (
            times[-1] + dt.timedelta(days=int(rng.choice([3, 12, 25, 70, 150, 300, 500])))
            if dies
            else None
        )
        last = (
            death
            if death is not None
            else times[-1] + dt.timedelta(days=int(rng.choice([10, 20, 120, 400, 800])))
        )
        death_before = k == 5  # a death recorded two days before the (only) CT: a data error
        events = [
            {"time": t0 - dt.timedelta(days=int(d)), "measurements": [
                {"code": CODES[int(rng.integers(0, 3))]},
                {"code": "LOINC/2160-0", "numeric_value": float(np.float32(0.8 + risk + rng.normal(0, 0.1)))},
            ]}
            for d in sorted(rng.integers(5, 900, 4), reverse=True)
        ]  # fmt: skip
        if k == 3:  # a NaN lab value (MEDS: null means "no value")
            events[0]["measurements"].append(
                {"code": "LOINC/6598-7", "numeric_value": float("nan")}
            )
        if death_before:
            events.append(
                {"time": t0 - dt.timedelta(days=2), "measurements": [{"code": "MEDS_DEATH"}]}
            )
            deaths_total += 1
            n_death_before += 1
        for t in times:
            events.append({"time": t, "measurements": [{"code": "ICD10CM/I26.99"}]})
        events.append(
            {"time": last, "measurements": [{"code": "MEDS_DEATH" if dies else CODES[2]}]}
        )
        deaths_total += int(dies)
        events.sort(key=lambda e: e["time"])
        static = [{"code": "Gender/F" if k % 2 else "Gender/M"}]
        patients.append({"patient_id": pid, "static_measurements": static, "events": events})
        for j, t in enumerate(times):
            iid = 5_000_000 + 10 * k + j
            lab = {c: _label(t, death, last, d) for c, d in HORIZONS.items()}
            lab["pe_positive_nlp"] = "True" if risk > 0.6 else "False"
            for c in (
                "1_month_readmission",
                "6_month_readmission",
                "12_month_readmission",
                "12_month_PH",
            ):
                lab[c] = ("True", "False", "Censored")[int(rng.integers(0, 3))]
            studies.append({"impression_id": iid, "person_id": pid, "time": t, "risk": risk,
                            "image_id": f"{iid:x}_{pid}.nii.gz", "labels": lab,
                            "death": death, "last": last})  # fmt: skip
    exp: dict[str, Any] = {"deaths": deaths_total, "death_before_rows": n_death_before}
    # the deliberate problems
    wrong = next(s for s in studies if s["labels"]["1_month_mortality"] == "False")
    wrong["labels"]["1_month_mortality"] = "True"  # released TRUE without a death in 30 days
    exp["mismatches"] = {"1_month_mortality": 1, "6_month_mortality": 0, "12_month_mortality": 0}
    extra = [
        {**studies[1], "impression_id": 6_000_001, "time": None, "image_id": "nulltime1.nii.gz",
         "note": studies[1]["time"] + dt.timedelta(hours=3)},  # only the report time is known
        {**studies[2], "impression_id": 6_000_002, "time": None, "image_id": "nulltime2.nii.gz"},
        {**studies[4], "impression_id": 6_000_003, "image_id": "dup.nii.gz"},  # same person, time
        {**studies[6], "impression_id": 6_000_004, "time": studies[6]["time"] + dt.timedelta(days=1),
         "image_id": "nolabels.nii.gz", "no_labels": True},
    ]  # fmt: skip
    if layout == "master":  # one file: a study cannot lack its labels row
        extra = extra[:3]
    missing_ct = studies[8]["image_id"]
    rows = studies + extra
    for s in rows:
        if s["time"] is not None and s["image_id"] != missing_ct:
            arr = ct_volume(np.random.default_rng([seed, s["impression_id"]]), s["risk"])
            (root / "CTPA" / s["image_id"]).write_bytes(nifti_gz_bytes(arr, (1.5, 1.5, 2.5)))
    patients.append({"patient_id": 99_999, "static_measurements": [], "events": [
        {"time": dt.datetime(2015, 1, 1), "measurements": [{"code": CODES[0]}]}]})  # fmt: skip
    half = len(patients) // 2
    for i, part in enumerate((patients[:half], patients[half:])):
        pq.write_table(
            pa.Table.from_pylist(part, schema=MEDS01), root / "meds" / "data" / f"{i}.parquet"
        )
    _write_labels(root, rows, split_of, layout)
    n_out = len(studies)  # + extras: 2 null time, 1 duplicate, 1 without labels -> all dropped
    exp.update(
        rows_in=len(rows),
        no_labels_row_dropped=1 if layout == "split" else 0,
        null_time_dropped=2,
        duplicate_keys_dropped=1,
        rows_out=n_out,
        subjects=n,
        ct_found=n_out - 1,
        ct_not_found=1,
        meds_patients=n + 1,
        nan=1,
        studies=studies,
    )
    return exp


def _fmt(t: dt.datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


def _write_labels(
    root: Path, rows: list[dict[str, Any]], split_of: dict[int, str], layout: str
) -> None:
    if layout == "master":
        head = ["impression_id", "person_id", "image_id", "procedure_DATETIME", "split", *LABELS]
        lines = [",".join(head)]
        for s in rows:
            lines.append(",".join([str(s["impression_id"]), str(s["person_id"]), s["image_id"],
                                   _fmt(s["time"]), split_of[s["person_id"]],
                                   *[s["labels"][c] for c in LABELS]]))  # fmt: skip
        (root / "cohort_0.2.0_master_file_anon.csv").write_text("\n".join(lines) + "\n")
        return
    (root / "labels").mkdir(exist_ok=True)
    mapping = ["impression_id\tperson_id\timage_id\tprocedure_DATETIME\tnote_DATETIME"]
    labels = ["impression_id\t" + "\t".join(LABELS)]
    splits = ["impression_id\tsplit"]
    for i, s in enumerate(rows):
        note = _fmt(s.get("note")) if s["time"] is None else _fmt(s["time"] + dt.timedelta(hours=2))
        mapping.append(
            f"{s['impression_id']}\t{s['person_id']}\t{s['image_id']}\t{_fmt(s['time'])}\t{note}"
        )
        if not s.get("no_labels"):
            # the 2025 files write TRUE / FALSE; vary the capitalisation as releases do
            vals = [s["labels"][c].upper() if (i + j) % 3 else s["labels"][c]
                    for j, c in enumerate(LABELS)]  # fmt: skip
            vals = [v if v != "CENSORED" else "Censored" for v in vals]
            labels.append(f"{s['impression_id']}\t" + "\t".join(vals))
        splits.append(f"{s['impression_id']}\t{split_of[s['person_id']]}")
    for name, lines in (("study_mapping", mapping), ("labels", labels), ("splits", splits)):
        (root / "labels" / f"{name}_20250611.tsv").write_text("\n".join(lines) + "\n")


def test_miniature_has_the_release_layout(tmp_path: Path) -> None:
    exp = build_miniature(tmp_path)
    names = sorted(p.name for p in (tmp_path / "labels").iterdir())
    assert names == ["labels_20250611.tsv", "splits_20250611.tsv", "study_mapping_20250611.tsv"]
    head = (tmp_path / "labels" / "study_mapping_20250611.tsv").read_text().splitlines()[0]
    assert head.split("\t")[:4] == ["impression_id", "person_id", "image_id", "procedure_DATETIME"]
    assert pq.read_schema(tmp_path / "meds" / "data" / "0.parquet").equals(MEDS01)
    # + the duplicate's and the unlabelled study's files
    assert len(list((tmp_path / "CTPA").glob("*.nii.gz"))) == exp["ct_found"] + 2
