"""CT loading on real data (TotalSegmentator NIfTI/DICOM, dicom-numpy edge cases), preprocessing,
study selection and the per-subject failure manifest."""

from __future__ import annotations

import shutil
import warnings
import zipfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pydicom
import pytest
import SimpleITK as sitk
from pydantic import ValidationError
from scipy import ndimage

from survfuse.data.ct_index import (
    MANIFEST_SCHEMA,
    CTIndex,
    load_ct_batch,
    load_ct_index,
    select_studies,
)
from survfuse.data.imaging import CTLoadError, CTLoadWarning, CTPreprocessing, load_ct

RAW = CTPreprocessing(hu_window=None, floor_hu=-5000.0)  # HU exactly as stored
TS = ("ct", "totalsegmentator")  # under ../shared/data


# Real files from ../shared/data: each test that uses one skips when it is missing (fails in CI).
@pytest.fixture(scope="module")
def ct_sm(shared_path: Callable[..., Path]) -> Path:
    return shared_path(*TS, "example_ct_sm.nii.gz")


@pytest.fixture(scope="module")
def chest_lps(shared_path: Callable[..., Path]) -> Path:
    return shared_path(*TS, "pulmonary_report__models__ct_cropped.nii.gz")


@pytest.fixture(scope="module")
def mr_sm(shared_path: Callable[..., Path]) -> Path:
    return shared_path(*TS, "example_mr_sm.nii.gz")


@pytest.fixture(scope="module")
def dicom(shared_path: Callable[..., Path]) -> Path:
    return shared_path(*TS, "example_ct_dicom")


@pytest.fixture(scope="module")
def dupe_zip(shared_path: Callable[..., Path]) -> Path:
    return shared_path("ct", "dicom_edge_cases", "dupe-positions.zip")


# ----------------------------------------------------------------------------- real volumes
def test_nifti_shape_spacing_hu(ct_sm: Path) -> None:
    # data README: 122x101x30 voxels, 3 mm isotropic, int16 HU -1100..1207, RAS
    v = load_ct(ct_sm, RAW)
    assert v.shape == (122, 101, 30)
    np.testing.assert_allclose(v.spacing, [3.0, 3.0, 3.0])
    assert v.orientation == "RAS"
    assert v.array.dtype == np.float32
    assert (float(v.array.min()), float(v.array.max())) == (-1100.0, 1207.0)
    np.testing.assert_array_equal(v.array, np.asarray(nib.load(ct_sm).dataobj, dtype=np.float32))
    assert v.meta["format"] == "nifti"
    # default preprocessing: outside-FOV floor -1024 and window (-1000, 1000)
    d = load_ct(ct_sm)
    assert (float(d.array.min()), float(d.array.max())) == (-1000.0, 1000.0)


def _sitk_reference(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The series read by SimpleITK (GDCM sorting, rescale applied): [x, y, z] in LPS, affine RAS."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).astype(np.float32).transpose(2, 1, 0)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_dicom_series_matches_simpleitk(dicom: Path) -> None:
    # data README: 20 slices 512x512, 0.977x0.977x2.0 mm, Siemens
    v = load_ct(dicom, RAW)
    assert v.shape == (512, 512, 20)
    np.testing.assert_allclose(v.spacing, [0.9765625, 0.9765625, 2.0])
    assert v.orientation == "RAS" and v.meta["native_orientation"] == "LPS"
    assert v.meta["modality"] == "CT" and v.meta["manufacturer"] == "SIEMENS"
    ref, ref_affine = _sitk_reference(dicom)
    # DICOM is LPS: our RAS output is SimpleITK's array flipped on x and y, same world geometry
    np.testing.assert_array_equal(v.array, ref[::-1, ::-1, :])
    for ours, theirs in (([0, 0, 0], [511, 511, 0]), ([511, 511, 19], [0, 0, 19])):
        np.testing.assert_allclose(
            v.affine @ np.array([*ours, 1.0]), ref_affine @ np.array([*theirs, 1.0])
        )
    # HU via rescale slope/intercept (1, -1024): air at -1024, bone up to 1839
    assert float(v.array.min()) == -1024.0
    assert float(v.array.max()) == float(ref.max()) == 1839.0
    ds = pydicom.dcmread(sorted(dicom.iterdir())[0])
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)


def test_lps_chest_crop_is_reoriented(chest_lps: Path) -> None:
    raw = nib.load(chest_lps)
    assert nib.aff2axcodes(raw.affine) == ("L", "P", "S")
    data = np.asarray(raw.dataobj, dtype=np.float32)
    v = load_ct(chest_lps, RAW)
    assert v.orientation == "RAS" and v.meta["native_orientation"] == "LPS"
    assert v.shape == (122, 102, 112)
    np.testing.assert_allclose(v.spacing, [1.5, 1.5, 1.5])
    np.testing.assert_array_equal(v.array, data[::-1, ::-1, :])
    # every voxel keeps its world position: voxel i of the output is voxel (n-1-i) of the input
    for idx in ([0, 0, 0], [10, 20, 30], [121, 101, 111]):
        src = [121 - idx[0], 101 - idx[1], idx[2]]
        np.testing.assert_allclose(
            v.affine @ np.array([*idx, 1.0]), raw.affine @ np.array([*src, 1.0]), atol=1e-4
        )
    back = load_ct(chest_lps, RAW.model_copy(update={"orientation": "LPS"}))
    np.testing.assert_array_equal(back.array, data)


def test_mr_volume_is_rejected_as_non_ct(mr_sm: Path) -> None:
    with pytest.raises(CTLoadError, match="not a CT in Hounsfield units") as info:
        load_ct(mr_sm)
    assert info.value.path == str(mr_sm)
    assert "1st percentile" in info.value.reason


def test_dupe_positions_series_is_refused(tmp_path: Path, dupe_zip: Path) -> None:
    with zipfile.ZipFile(dupe_zip) as z:
        z.extractall(tmp_path / "dupe")
    with pytest.raises(CTLoadError) as info:
        load_ct(tmp_path / "dupe")
    reason = info.value.reason
    # slice z positions (ImagePositionPatient[2]) in the zip: -42.5, -90 (CT26 and CT28), -122.5,
    # -237.5, -245, -352.5, -365, -382.5, -400, -512.5: one duplicate, large gaps
    assert "duplicate slice positions: -90 mm (CT26.dcm, CT28.dcm)" in reason
    assert "missing slice positions (expected uniform spacing 7.5 mm)" in reason
    assert "14 between -512.5 and -400 mm" in reason
    assert "115 mm between -237.5 and -122.5 mm" in reason


def _copy_series(dicom: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(dicom, dst)
    return dst


def test_dicom_missing_and_duplicate_slice(tmp_path: Path, dicom: Path) -> None:
    files = sorted(dicom.iterdir())
    z = {
        f.name: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        for f in files
    }
    # drop one inner slice: its position is named as missing
    gap = _copy_series(dicom, tmp_path, "gap")
    victim = sorted(z, key=z.get)[7]
    (gap / victim).unlink()
    with pytest.raises(
        CTLoadError, match=rf"missing slice positions .*: 1 between .*\({z[victim]:g}\)"
    ):
        load_ct(gap)
    # a slice exported twice under another name
    dup = _copy_series(dicom, tmp_path, "dup")
    shutil.copy(dup / files[3].name, dup / "copy.dcm")
    with pytest.raises(CTLoadError, match=rf"duplicate slice positions: {z[files[3].name]:g} mm"):
        load_ct(dup)


def test_dicom_mr_modality_is_rejected(tmp_path: Path, dicom: Path) -> None:
    mr = _copy_series(dicom, tmp_path, "mr")
    for f in mr.iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    with pytest.raises(CTLoadError, match="non-CT modality MR"):
        load_ct(mr)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CTLoadError, match="unreadable"):
        load_ct(bad)
    with pytest.raises(CTLoadError, match="file not found"):
        load_ct(tmp_path / "nope.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTLoadError, match="no DICOM files"):
        load_ct(tmp_path / "empty")


def test_implausible_hu_range(tmp_path: Path, ct_sm: Path) -> None:
    img = nib.load(ct_sm)
    data = np.asarray(img.dataobj).astype(np.float32)
    # percentiles of example_ct_sm (numpy): 1st -1013 HU, 99th 188 HU
    x10 = tmp_path / "x10.nii.gz"  # e.g. a wrong rescale slope
    nib.save(nib.Nifti1Image(data * 10, img.affine), x10)
    with pytest.raises(CTLoadError, match=r"implausible HU range: 1st percentile -10130 < -2000"):
        load_ct(x10)
    assert load_ct(x10, CTPreprocessing(check_hu=False)).shape == (122, 101, 30)
    hot = data.copy()
    hot.reshape(-1)[::25] = 9000.0  # 4% of voxels far above bone
    path = tmp_path / "hot.nii.gz"
    nib.save(nib.Nifti1Image(hot, img.affine), path)
    with pytest.raises(CTLoadError, match=r"implausible HU range: 99th percentile 9000 > 4000"):
        load_ct(path)
    # scanner padding (-3024 outside a circular field of view) is not a failure
    padded = data.copy()
    padded[:10] = -3024.0
    nib.save(nib.Nifti1Image(padded, img.affine), tmp_path / "pad.nii.gz")
    v = load_ct(tmp_path / "pad.nii.gz", CTPreprocessing(hu_window=None))
    assert float(v.array.min()) == -1024.0  # raised to floor_hu
    assert v.meta["hu_p01"] == pytest.approx(-1012.0, abs=5)


# ----------------------------------------------------------------------------- preprocessing
def test_resampling_matches_affine_interpolation(ct_sm: Path) -> None:
    prep = CTPreprocessing(spacing=(2.0, 2.5, 1.5), hu_window=None, floor_hu=-5000.0)
    v = load_ct(ct_sm, prep)
    np.testing.assert_allclose(v.spacing, [2.0, 2.5, 1.5])
    assert v.shape == (183, 121, 60)  # floor(n * 3 / target)
    # Independent reference: map each output voxel to input voxel coordinates through the two
    # affines and interpolate linearly there (scipy). Edges differ only by border handling.
    raw = np.asarray(nib.load(ct_sm).dataobj, dtype=np.float32)
    in_aff = nib.load(ct_sm).affine
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in v.shape], indexing="ij"), 0).reshape(3, -1)
    src = (np.linalg.inv(in_aff) @ v.affine @ np.vstack([grid, np.ones(grid.shape[1])]))[:3]
    ref = ndimage.map_coordinates(raw, src, order=1, mode="nearest").reshape(v.shape)
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(v.array[inner], ref[inner], atol=1e-2)
    # the world extent of the volume is preserved (centre of the field of view)
    centre_in = in_aff @ np.array([*(np.array(raw.shape) - 1) / 2, 1])
    centre_out = v.affine @ np.array([*(np.array(v.shape) - 1) / 2, 1])
    np.testing.assert_allclose(centre_in[:3], centre_out[:3], atol=3.0)


def test_window_scale_and_crop(ct_sm: Path) -> None:
    prep = CTPreprocessing(hu_window=(-160, 240), scale_to_unit=True, target_shape=(96, 96, 40))
    v = load_ct(ct_sm, prep)
    assert v.shape == (96, 96, 40)
    assert float(v.array.min()) == 0.0 and float(v.array.max()) == 1.0
    raw = load_ct(ct_sm, CTPreprocessing(hu_window=None))
    # centre crop in x/y (122 -> 96 starts at 13, 101 -> 96 starts at 2), pad z 30 -> 40 by 5
    expected = np.clip((raw.array[13:109, 2:98, :] + 160) / 400, 0, 1)
    np.testing.assert_allclose(v.array[:, :, 5:35], expected, atol=1e-6)
    assert (v.array[:, :, :5] == 0).all() and (v.array[:, :, 35:] == 0).all()  # air padding
    # the affine follows the crop: output voxel (0, 0, 5) is input voxel (13, 2, 0)
    np.testing.assert_allclose(
        v.affine @ np.array([0, 0, 5, 1.0]), raw.affine @ np.array([13, 2, 0, 1.0])
    )


def test_foreground_crop_centres_on_the_body(ct_sm: Path) -> None:
    prep = CTPreprocessing(hu_window=None, target_shape=(40, 40, 30), crop="foreground")
    v = load_ct(ct_sm, prep)
    raw = load_ct(ct_sm, CTPreprocessing(hu_window=None)).array
    fg = np.argwhere(raw > -500)
    centre = (fg.min(0) + fg.max(0) + 1) / 2
    start = np.round(centre - np.array([20, 20, 15])).astype(int)
    start[2] = 0  # z fits exactly
    np.testing.assert_array_equal(
        v.array, raw[start[0] : start[0] + 40, start[1] : start[1] + 40, :]
    )


def test_preprocessing_validation() -> None:
    with pytest.raises(ValidationError, match="did you mean 'foreground'"):
        CTPreprocessing(crop="forground")
    with pytest.raises(ValidationError, match="axis codes"):
        CTPreprocessing(orientation="RRS")
    with pytest.raises(ValidationError, match="lo < hi"):
        CTPreprocessing(hu_window=(100, -100))
    with pytest.raises(ValidationError, match="scale_to_unit needs a hu_window"):
        CTPreprocessing(hu_window=None, scale_to_unit=True)
    with pytest.raises(ValidationError):
        CTPreprocessing(spacing=(1.0, 0.0, 1.0))


# ----------------------------------------------------------------------------- index & selection
def test_index_and_study_selection(tmp_path: Path) -> None:
    (tmp_path / "ct").mkdir()
    pl.DataFrame(
        {
            "subject_id": [1, 1, 1, 2, 3],
            "study_time": [
                "2020-01-01T10:00:00",
                "2020-03-01T10:00:00",
                "2020-06-01T10:00:00",
                "2021-01-01T00:00:00",
                "2019-01-01T00:00:00",
            ],
            "path": ["ct/a.nii.gz", "ct/b.nii.gz", "ct/c.nii.gz", "/abs/d.nii.gz", "ct/e.nii.gz"],
        }
    ).write_csv(tmp_path / "ct_index.csv")
    index = load_ct_index(tmp_path / "ct_index.csv")
    assert index.schema["study_time"] == pl.Datetime("us")
    assert index["path"][0] == str(tmp_path / "ct" / "a.nii.gz")  # relative to the index file
    assert index["path"][3] == "/abs/d.nii.gz"
    cohort = pl.DataFrame(
        {
            "subject_id": [1, 1, 2, 3, 4, 1],
            "prediction_time": [
                datetime(2020, 3, 1, 10),  # exactly at study b -> b
                datetime(2020, 5, 31),  # b (c is later)
                datetime(2020, 12, 31),  # d is after prediction -> none
                datetime(2019, 6, 1),  # e, 151 days before
                datetime(2020, 1, 1),  # no study at all
                datetime(2019, 12, 31),  # before every study of subject 1
            ],
        }
    )
    sel = select_studies(cohort, index)
    assert sel.columns == ["subject_id", "prediction_time", "study_time", "path"]
    names = [None if p is None else Path(p).name for p in sel["path"].to_list()]
    assert names == ["b.nii.gz", "b.nii.gz", None, "e.nii.gz", None, None]
    assert (
        sel["study_time"].drop_nulls()
        <= sel.filter(pl.col("path").is_not_null())["prediction_time"]
    ).all()
    sel90 = CTIndex(index).select(cohort, lookback_days=91)  # 2020-05-31 is 90.6 days after b
    names90 = [None if p is None else Path(p).name for p in sel90["path"].to_list()]
    assert names90 == ["b.nii.gz", "b.nii.gz", None, None, None, None]


def test_index_errors(tmp_path: Path) -> None:
    pl.DataFrame({"subject_id": [1], "path": ["x"]}).write_parquet(tmp_path / "i.parquet")
    with pytest.raises(ValueError, match="missing column 'study_time'"):
        load_ct_index(tmp_path / "i.parquet")
    pl.DataFrame(
        {"subject_id": [1, 2], "study_time": ["2020-01-01", "soon"], "path": ["a", "b"]}
    ).write_csv(tmp_path / "j.csv")
    with pytest.raises(ValueError, match=r"column 'study_time': 'soon' is not an ISO 8601.*row 1"):
        load_ct_index(tmp_path / "j.csv")
    # a day/month date is never guessed (10/09/2016: September or October?)
    pl.DataFrame({"subject_id": [1], "study_time": ["10/09/2016"], "path": ["a"]}).write_csv(
        tmp_path / "k.csv"
    )
    with pytest.raises(ValueError, match=r"k\.csv: column 'study_time': '10/09/2016'"):
        load_ct_index(tmp_path / "k.csv")


# ----------------------------------------------------------------------------- batch & manifest
def test_batch_marks_failures_per_subject(tmp_path: Path, ct_sm: Path, mr_sm: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    selection = pl.DataFrame(
        {
            "subject_id": [1, 2, 3, 4],
            "prediction_time": [datetime(2020, 1, 1)] * 4,
            "path": [str(ct_sm), str(mr_sm), str(tmp_path / "broken.nii.gz"), None],
        }
    )
    prep = CTPreprocessing(target_shape=(32, 32, 16))
    manifest_path = tmp_path / "run" / "ct_manifest.parquet"
    with pytest.warns(CTLoadWarning, match=r"2 of 4 CT studies failed to load .* subject 2"):
        vols, manifest = load_ct_batch(selection, prep, manifest_path=manifest_path)
    assert [v is not None for v in vols] == [True, False, False, False]
    assert vols[0] is not None and vols[0].shape == (32, 32, 16)
    assert manifest["status"].to_list() == ["ok", "failed", "failed", "no_study"]
    assert "not a CT" in manifest["reason"][1]
    assert "unreadable" in manifest["reason"][2]
    stored = pl.read_parquet(manifest_path)
    assert stored.schema == pl.Schema(MANIFEST_SCHEMA)
    assert stored.equals(manifest)

    with pytest.raises(CTLoadError, match="subject 2 at 2020-01-01 00:00:00: implausible HU"):
        load_ct_batch(selection, prep, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing failed
        _, ok = load_ct_batch(selection.head(1), prep)
    assert ok["status"].to_list() == ["ok"]


def test_dicom_falls_back_to_simpleitk_decoding(
    monkeypatch: pytest.MonkeyPatch, dicom: Path
) -> None:
    # pixel data pydicom cannot decode (e.g. a JPEG 2000 series without the pylibjpeg plugin) is
    # decoded by SimpleITK/GDCM instead; the HU volume must be identical
    ref = load_ct(dicom, RAW)

    def no_codec(self: pydicom.Dataset) -> np.ndarray:
        raise RuntimeError("no pixel data handler available for this transfer syntax")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_codec))
    got = load_ct(dicom, RAW)
    np.testing.assert_array_equal(got.array, ref.array)
    np.testing.assert_allclose(got.affine, ref.affine)
