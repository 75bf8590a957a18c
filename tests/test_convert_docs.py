"""Every snippet of docs/own-data.md runs, in order, on data written here.

The guide starts from what a hospital export looks like, written by this test into a temp
folder: `own/dicom/` (one folder per DICOM series: CT volumes, a 2-slice localizer and an MR
series), `own/omop/` (OMOP CDM 5.4 CSVs: person, death, observation_period,
condition_occurrence, measurement, concept), `own/id_map.csv` (MRN -> OMOP person_id) and
`inspect/` (a miniature INSPECT release). Fenced blocks run as follows: ```python blocks in one
namespace, ```bash blocks with `bash -euo pipefail` (the venv's `survfuse` on PATH), and a
```yaml title="PATH" block is written to PATH.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_convert_miniature import build_miniature, ct_volume

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-data.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)


def snippets(text: str) -> list[tuple[str, str, str]]:
    """(language, info string, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(text)]


def write_series(
    folder: Path, mrn: str, when: dt.datetime, vol: np.ndarray, modality: str = "CT"
) -> None:
    """A DICOM series (one file per axial slice) of the HU volume `vol` [X, Y, Z]."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    seed = [mrn, when.isoformat(), modality, str(vol.shape)]
    study, series = (
        generate_uid(entropy_srcs=[*seed, "study"]),
        generate_uid(entropy_srcs=[*seed, "s"]),
    )
    for z in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[*seed, str(z)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality = mrn, modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
        ds.StudyTime = ds.AcquisitionTime = when.strftime("%H%M%S")
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.5, 1.5], 2.5
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(vol[:, :, z].T).astype("<i2").tobytes()
        ds.save_as(folder / f"{z:03d}.dcm", enforce_file_format=True)


def write_export(root: Path, n: int = 30, seed: int = 0) -> None:
    """A hospital export: DICOM series, OMOP CSVs and an MRN map (see module docs)."""
    rng = np.random.default_rng(seed)
    omop = root / "omop"
    omop.mkdir(parents=True)
    concept = [(1, "Pulmonary embolism", "SNOMED", "59282003"), (2, "Heart failure", "SNOMED", "84114007"),
               (3, "Creatinine", "LOINC", "2160-0"), (8507, "MALE", "Gender", "M"), (8532, "FEMALE", "Gender", "F")]  # fmt: skip
    tables: dict[str, list[list[Any]]] = {k: [] for k in ("person", "death", "observation_period",
                                                           "condition_occurrence", "measurement")}  # fmt: skip
    ids = ["mrn,person_id"]
    for k in range(n):
        pid, mrn = 5000 + 3 * k, f"MRN{k:05d}"
        ids.append(f"{mrn},{pid}")
        risk = float(rng.random())
        ct = dt.datetime(2016, 1, 1, 7) + dt.timedelta(
            days=int(rng.integers(0, 1500)), minutes=int(rng.integers(0, 600))
        )
        birth = dt.date(1940 + int(rng.integers(0, 40)), 1 + int(rng.integers(0, 12)), 1)
        tables["person"].append(
            [pid, 8532 if k % 2 else 8507, birth.year, birth.month, 1, f"{birth} 00:00:00"]
        )
        end = ct.date() + dt.timedelta(days=int(rng.integers(20, 900)))
        if risk > 0.5:
            end = ct.date() + dt.timedelta(days=int(rng.integers(1, 400)))
            tables["death"].append([pid, str(end), ""])
        tables["observation_period"].append(
            [pid, str(ct.date() - dt.timedelta(days=2000)), str(end)]
        )
        for d in sorted(rng.integers(3, 700, 3)):
            day = ct.date() - dt.timedelta(days=int(d))
            tables["condition_occurrence"].append([pid, 2 if risk > 0.6 else 1, str(day), ""])
            tables["measurement"].append(
                [pid, 3, str(day), f"{day} 10:15:00", round(0.7 + risk, 2)]
            )
        tables["condition_occurrence"].append(
            [pid, 1, str(ct.date()), ""]
        )  # the PE diagnosis that day
        vol = ct_volume(np.random.default_rng([seed, k]), risk)
        write_series(root / "dicom" / f"{mrn}_{k}_ctpa", mrn, ct, vol)
        if k % 10 == 0:  # a localizer (2 slices) and an MR series in the same export
            write_series(
                root / "dicom" / f"{mrn}_{k}_scout",
                mrn,
                ct - dt.timedelta(minutes=5),
                vol[:, :, :2],
            )
            write_series(
                root / "dicom" / f"{mrn}_{k}_mr", mrn, ct + dt.timedelta(days=3), vol, modality="MR"
            )
    heads = {
        "person": "person_id,gender_concept_id,year_of_birth,month_of_birth,day_of_birth,birth_datetime",
        "death": "person_id,death_date,death_datetime",
        "observation_period": "person_id,observation_period_start_date,observation_period_end_date",
        "condition_occurrence": "person_id,condition_concept_id,condition_start_date,condition_start_datetime",
        "measurement": "person_id,measurement_concept_id,measurement_date,measurement_datetime,value_as_number",
    }
    for name, rows in tables.items():
        lines = [heads[name]] + [",".join(str(v) for v in r) for r in rows]
        (omop / f"{name}.csv").write_text("\n".join(lines) + "\n")
    lines = ["concept_id,concept_name,vocabulary_id,concept_code"] + [
        ",".join(map(str, c)) for c in concept
    ]
    (omop / "concept.csv").write_text("\n".join(lines) + "\n")
    (root / "id_map.csv").write_text("\n".join(ids) + "\n")


def test_every_snippet_of_the_guide_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_export(tmp_path / "own")
    build_miniature(tmp_path / "inspect")
    blocks = snippets(DOC.read_text())
    assert sum(lang == "python" for lang, _, _ in blocks) >= 4
    assert any(lang == "bash" and "survfuse run" in body for lang, _, body in blocks)
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    namespace: dict[str, Any] = {"__name__": "own_data_guide"}
    for i, (lang, info, body) in enumerate(blocks):
        if lang == "python":
            exec(compile(body, f"{DOC.name}[{i}]", "exec"), namespace)
        elif lang == "bash":
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", body], env=env,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
            assert res.returncode == 0, (
                f"block {i}:\n{body}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
        elif lang == "yaml":
            m = re.search(r'title="([^"]+)"', info)
            assert m, f'block {i}: a yaml block needs title="PATH"'
            Path(m.group(1)).parent.mkdir(parents=True, exist_ok=True)
            Path(m.group(1)).write_text(body)
        else:
            pytest.fail(f"block {i}: ```{lang} is not a runnable snippet")
    # what the guide promises at the end
    assert (tmp_path / "own" / "run" / "metrics.parquet").is_file()
    assert (tmp_path / "data" / "inspect" / "conversion_report.md").is_file()
