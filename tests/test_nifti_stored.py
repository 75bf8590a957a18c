"""NIfTI voxels as stored (`survfuse.data.nifti_stored`) against nibabel's get_fdata, and
`load_ct` with and without the stored path (reference: nibabel's float32 read)."""

from __future__ import annotations

import builtins
import gzip
import itertools
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from survfuse.data import imaging
from survfuse.data.hu_calibration import CTCalibrationWarning
from survfuse.data.imaging import CTPreprocessing, load_ct, preprocess_ct
from survfuse.data.nifti_stored import inflate, read_stored

AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 10.0], [0.0, -0.8, 0.0, -5.0], [0.0, 0.0, 2.0, 3.0], [0, 0, 0, 1.0]]
)


def _base() -> np.ndarray:
    rng = np.random.default_rng(0)
    v = np.clip(rng.normal(-300, 500, (40, 36, 24)), -1024, 3071)
    v[:2] = -3024  # outside-FOV padding
    return v


def _save(folder: Path, name: str, arr: np.ndarray, **kw: Any) -> Path:
    img = (kw.pop("klass", nib.Nifti1Image))(arr, AFFINE)
    if "scale" in kw:
        img.header.set_slope_inter(*kw["scale"])
    path = folder / name
    nib.save(img, path)
    return path


CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    # name: (dtype, save options, read as stored)
    "int16": ("<i2", {}, True),
    "int16_big_endian": (">i2", {}, True),
    "uint8": ("u1", {}, True),
    "int16_unit_scale": ("<i2", {"scale": (1.0, 0.0)}, True),
    "uint16_offset": ("<u2", {"scale": (1.0, -1024.0)}, False),  # stored != HU
    "int16_scaled": ("<i2", {"scale": (2.0, -10.0)}, False),
    "int32": ("<i4", {}, False),  # not every value exact in float32
    "float32": ("<f4", {}, False),
    "nifti2": ("<i2", {"klass": nib.Nifti2Image}, False),
}


@pytest.mark.parametrize(("case", "ext"), list(itertools.product(CASES, (".nii.gz", ".nii"))))
def test_stored_voxels_are_nibabels_hu(tmp_path: Path, case: str, ext: str) -> None:
    dtype, kw, stored = CASES[case]
    base = _base() + (1024.0 if dtype == "<u2" else 0.0)
    if dtype == "u1":
        base = np.clip(base, 0, 255)
    path = _save(tmp_path, case + ext, base.astype(dtype), **kw)
    found = read_stored(path)
    assert (found is not None) == stored
    if found is None:
        return
    arr, affine = found
    ref = nib.load(str(path))
    want = ref.get_fdata(dtype=np.float32)
    assert arr.dtype.kind in "iu"
    np.testing.assert_array_equal(arr.astype(np.float32), want)
    np.testing.assert_array_equal(affine, ref.affine)


def test_four_d_with_one_frame(tmp_path: Path) -> None:
    path = _save(tmp_path, "four_d.nii.gz", _base().astype(np.int16)[..., None])
    found = read_stored(path)
    assert found is not None and found[0].shape == (40, 36, 24)
    np.testing.assert_array_equal(found[0], _base().astype(np.int16))


def test_truncated_gzip_file_is_left_to_nibabel(tmp_path: Path) -> None:
    path = _save(tmp_path, "v.nii.gz", _base().astype(np.int16))
    raw = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    assert read_stored(cut) is None
    with pytest.raises(imaging.CTLoadError, match="unreadable"):
        load_ct(cut)


def test_inflate_without_isal_gives_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    data = gzip.compress(np.arange(100_000, dtype=np.int16).tobytes(), compresslevel=1)
    fast = inflate(data)
    real_import = builtins.__import__

    def no_isal(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("isal"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_isal)
    assert inflate(data) == fast == np.arange(100_000, dtype=np.int16).tobytes()


@pytest.mark.parametrize(
    "prep",
    [
        CTPreprocessing(),
        CTPreprocessing(orientation="LPS", hu_window=(-1000.0, 500.0), scale_to_unit=True),
        CTPreprocessing(spacing=(1.5, 1.5, 2.5), target_shape=(30, 30, 20), crop="foreground"),
        CTPreprocessing(hu_window=None, floor_hu=-2000.0),
        CTPreprocessing(hu_calibration="landmarks"),
    ],
)
def test_load_ct_from_stored_voxels_is_bit_identical(tmp_path: Path, prep: CTPreprocessing) -> None:
    """load_ct (stored int16 voxels) == preprocess_ct of nibabel's float32 HU, byte for byte."""
    path = _save(tmp_path, "ct.nii.gz", _base().astype(np.int16))
    img = nib.load(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CTCalibrationWarning)  # noise: no lung peak
        got = load_ct(path, prep)
        want = preprocess_ct(img.get_fdata(dtype=np.float32), img.affine, prep, path=path)
    assert got.array.dtype == want.array.dtype == np.float32
    assert got.array.tobytes() == want.array.tobytes()
    np.testing.assert_array_equal(got.affine, want.affine)
    assert {k: v for k, v in got.meta.items() if k != "format"} == {
        k: v for k, v in want.meta.items() if k != "format"
    }
