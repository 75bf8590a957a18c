"""CT studies: the CT index, study selection without leakage, and volume loading/preprocessing.

A CT index is a table `(subject_id, study_time, path)`; `path` is a NIfTI file (`.nii`,
`.nii.gz`), another single-file volume SimpleITK reads (`.mha`, `.nrrd`), or a DICOM series
folder. For each prediction the study used is the latest one at or before `prediction_time`
(optionally within a look-back), never a later one.

`load_ct(path, preprocessing)` returns a `CTVolume` (`array` float32 [X, Y, Z]) after, in order:
HU (DICOM: stored value x RescaleSlope + RescaleIntercept; NIfTI: scl_slope/scl_inter), checks that
the volume is a CT in Hounsfield units, optional HU calibration from a landmark of the volume
itself (`hu_calibration`, `survfuse.data.hu_calibration`), values below `floor_hu` (outside-FOV
padding) raised to it, reorientation to `orientation` (axis codes, RAS+ world like NIfTI), trilinear resampling to
`spacing`, crop/pad to `target_shape` (centre of the volume or of the body foreground), clipping
to `hu_window` and optional scaling to [0, 1]. Failures raise `CTLoadError(path, reason)`;
`load_ct_batch` turns them into per-subject "failed" rows of a manifest (`ct_manifest.parquet`)
and one warning that counts them, or raises with `strict=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from survfuse.data.dicom import DicomSeriesError, read_dicom_series
from survfuse.data.hu_calibration import HU_CALIBRATIONS, apply_shift, calibration_shift
from survfuse.data.nifti_stored import read_stored
from survfuse.data.voxel_copy import bounded_copy
from survfuse.registry import look_up_option

__all__ = [
    "CROP_MODES",
    "CTLoadError",
    "CTLoadWarning",
    "CTPreprocessing",
    "CTVolume",
    "check_ct_array",
    "load_ct",
]

CROP_MODES = ("center", "foreground")
INTERPOLATIONS = ("linear", "nearest")
_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


class CTLoadError(Exception):
    """A CT that cannot be used; `path` is the file/folder and `reason` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Ray, multiprocessing)
        return (type(self), (self.path, self.reason))


class CTLoadWarning(UserWarning):
    """Some subjects' CTs failed to load and were marked missing (see the manifest)."""


class CTPreprocessing(BaseModel):
    """How a CT volume is brought to a model's input convention (one preset per encoder).

    orientation: target axis codes (world RAS+ as in NIfTI), e.g. "RAS" or "LPS".
    spacing: target voxel size (mm) along the output axes; None keeps the native spacing.
    hu_window: (lo, hi) HU; values are clipped to it (None: no clipping).
    scale_to_unit: map the window linearly to [0, 1] (requires hu_window).
    target_shape: crop/pad to this shape [X, Y, Z]; None keeps the (resampled) shape.
    crop: "center" (of the volume) or "foreground" (of the voxels above `foreground_hu`).
    pad_hu: value used for padding (air), before windowing.
    floor_hu: values below it (scanner padding outside the field of view, e.g. -3024) are raised
        to it.
    check_hu: refuse volumes whose intensities are not plausible CT HU: 1st percentile above
        `max_p01_hu` (no air or lung: MR or unscaled data) or below `min_p01_hu`, or 99th
        percentile above `max_p99_hu`. A constant padding value below `floor_hu` is ignored.
    min_slices: refuse volumes with fewer voxels than this along any axis (a localiser, a single
        slice or a 2-D image saved as 3-D is not a CT volume; its statistics are noise). 16 is
        below any diagnostic chest CT (>= ~40 slices at 5 mm) and above scout series.
    hu_calibration: "none" (default) or "landmarks": before any other value change, shift the
        volume's non-padding voxels so that its lung parenchyma peak sits at -850 HU
        (`survfuse.data.hu_calibration`; undoes a scanner's HU offset). It uses the volume alone
        (no outcome, no site label, no other patient), so it is not transductive; a volume without
        a trustworthy landmark (no lung in view, tiny, all air) is used as stored, with a
        `CTCalibrationWarning` naming the file. The shift is in `CTVolume.meta`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    hu_window: tuple[float, float] | None = (-1000.0, 1000.0)
    scale_to_unit: bool = False
    target_shape: tuple[int, int, int] | None = None
    crop: str = "center"
    foreground_hu: float = -500.0
    pad_hu: float = -1024.0
    floor_hu: float = -1024.0
    interpolation: str = "linear"
    check_hu: bool = True
    min_slices: int = Field(default=16, ge=1)
    max_p01_hu: float = -500.0
    min_p01_hu: float = -2000.0
    max_p99_hu: float = 4000.0
    hu_calibration: str = "none"

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str) -> str:
        codes = v.upper()
        if len(codes) != 3 or not all(sum(c in pair for c in codes) == 1 for pair in _AXIS_PAIRS):
            raise ValueError(
                f"orientation must be 3 axis codes, one of L/R, A/P, S/I each (e.g. 'RAS'), got {v!r}"
            )
        return codes

    @field_validator("crop")
    @classmethod
    def _crop(cls, v: str) -> str:
        return look_up_option(v, CROP_MODES, kind="crop mode")

    @field_validator("hu_calibration")
    @classmethod
    def _calibration(cls, v: str) -> str:
        return look_up_option(v, HU_CALIBRATIONS, kind="hu_calibration")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the default "none" is left out of dumps, so that encoder configs and feature-store
        # fingerprints written before the option existed stay the same
        out: dict[str, Any] = handler(self)
        if out.get("hu_calibration") == "none":
            del out["hu_calibration"]
        return out

    @field_validator("interpolation")
    @classmethod
    def _interp(cls, v: str) -> str:
        return look_up_option(v, INTERPOLATIONS, kind="interpolation")

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and not all(s > 0 for s in v):
            raise ValueError(f"spacing must be > 0 mm on every axis, got {v}")
        return v

    @field_validator("target_shape")
    @classmethod
    def _shape(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and not all(s > 0 for s in v):
            raise ValueError(f"target_shape must be positive on every axis, got {v}")
        return v

    @model_validator(mode="after")
    def _window(self) -> CTPreprocessing:
        if self.hu_window is not None and not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"hu_window must be (lo, hi) with lo < hi, got {self.hu_window}")
        if self.scale_to_unit and self.hu_window is None:
            raise ValueError("scale_to_unit needs a hu_window to scale")
        return self


@dataclass
class CTVolume:
    """A preprocessed CT volume with its geometry.

    `array` float32 [X, Y, Z] (HU, or [0, 1] when scaled), `spacing` (3,) mm, `affine` (4, 4)
    voxel -> world (RAS+ mm), `meta` (source path, format, native geometry ...).
    """

    array: NDArray[np.float32]
    spacing: NDArray[np.float64]
    affine: NDArray[np.float64]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def orientation(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))


# ----------------------------------------------------------------------------- reading
def _read_nifti(
    path: Path, stored: bool
) -> tuple[NDArray[Any], NDArray[np.float64], dict[str, Any]]:
    import nibabel as nib

    if stored and (found := read_stored(path)) is not None:
        return found[0], found[1], {"format": "nifti"}
    img: Any = nib.load(str(path))
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise CTLoadError(path, f"expected a 3-d volume, got shape {tuple(img.shape)}")
    # get_fdata applies scl_slope / scl_inter
    arr = np.asarray(img.get_fdata(dtype=np.float32))
    return arr, np.asarray(img.affine, dtype=np.float64), {"format": "nifti"}


def _read_sitk(path: Path) -> tuple[NDArray[np.float32], NDArray[np.float64], dict[str, Any]]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    if img.GetDimension() != 3:
        raise CTLoadError(path, f"expected a 3-d volume, got {img.GetDimension()} dimensions")
    modality = img.GetMetaData("0008|0060").strip() if img.HasMetaDataKey("0008|0060") else None
    if modality is not None and modality != "CT":
        raise CTLoadError(path, f"non-CT modality {modality} (DICOM Modality tag)")
    arr = sitk.GetArrayFromImage(img).astype(np.float32).transpose(2, 1, 0)  # [z,y,x] -> [x,y,z]
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(img.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # ITK is LPS, our world is RAS
    return arr, affine, {"format": "sitk", "modality": modality}


def _read_dicom(path: Path) -> tuple[NDArray[np.float32], NDArray[np.float64], dict[str, Any]]:

    try:
        series = read_dicom_series(path)
    except DicomSeriesError as exc:
        raise CTLoadError(path, str(exc)) from exc
    return series.hu, series.affine, series.meta


def read_ct_hu(
    path: str | Path, *, stored: bool = False
) -> tuple[NDArray[Any], NDArray[np.float64], dict[str, Any]]:
    """Read a CT in HU without preprocessing: (array [X, Y, Z] float32, RAS+ affine, meta).

    `stored=True`: a NIfTI-1 file whose stored integers are the HU (no scaling, a type exact in
    float32) comes back as those integers, a read-only view (`survfuse.data.nifti_stored`);
    `load_ct` converts them once, in its first value change. Same values either way.
    """
    path = Path(path)
    if not path.exists():
        raise CTLoadError(path, "file not found")
    try:
        if path.is_dir():
            return _read_dicom(path)
        if path.name.endswith((".nii", ".nii.gz")):
            return _read_nifti(path, stored)
        return _read_sitk(path)
    except CTLoadError:
        raise
    except Exception as exc:  # any reader failure is a per-subject failure, with its cause
        raise CTLoadError(path, f"unreadable: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- checks & geometry
def _check_hu(path: Path, arr: NDArray[np.float32], prep: CTPreprocessing) -> dict[str, float]:
    step = max(1, arr.size // 2_000_000)  # a strided sample keeps percentiles cheap
    # every step-th voxel in C order, gathered without reshaping (a NIfTI array is in Fortran
    # order, and reshape(-1) would copy the whole volume to sample 1 voxel in `step`)
    sample = arr[np.unravel_index(np.arange(0, arr.size, step), arr.shape)]
    sample = sample.astype(np.float32, copy=False)  # stored integers: the float32 HU values
    # min and max are NaN or infinite exactly when some voxel is: two reads, no [X, Y, Z] mask
    if not (np.isfinite(sample).all() and np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise CTLoadError(path, "volume contains NaN or infinite values")
    lowest = float(sample.min())
    if lowest < prep.floor_hu and float(np.mean(sample == lowest)) > 1e-3:
        # a constant value below the floor filling many voxels is outside-FOV padding
        # (e.g. -3024, -2048), not tissue: leave it out of the distribution checks
        sample = sample[sample != lowest]
        if sample.size == 0:
            raise CTLoadError(path, f"volume holds only the padding value {lowest:.0f}")
    p01, p50, p99 = (float(x) for x in np.percentile(sample, [1, 50, 99]))
    stats = {"hu_p01": p01, "hu_p50": p50, "hu_p99": p99}
    if prep.check_hu:
        if p01 > prep.max_p01_hu:
            raise CTLoadError(
                path,
                f"implausible HU distribution for CT: 1st percentile {p01:.0f} > "
                f"{prep.max_p01_hu:.0f} HU (no air or lung voxels); not a CT in Hounsfield "
                "units (MR or unscaled intensities?)",
            )
        if p01 < prep.min_p01_hu:
            raise CTLoadError(
                path,
                f"implausible HU range: 1st percentile {p01:.0f} < {prep.min_p01_hu:.0f} HU "
                "(air is -1000 HU; wrong rescale slope?)",
            )
        if p99 > prep.max_p99_hu:
            raise CTLoadError(
                path,
                f"implausible HU range: 99th percentile {p99:.0f} > {prep.max_p99_hu:.0f} HU "
                "(missing rescale slope/intercept?)",
            )
    return stats


def _reorient(
    arr: NDArray[np.float32], affine: NDArray[np.float64], codes: str
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """`arr` as a view (flipped / transposed axes, no copy) in orientation `codes`."""
    import nibabel.orientations as nio

    current = nio.io_orientation(affine)
    target = nio.axcodes2ornt(tuple(codes))
    transform = nio.ornt_transform(current, target)
    out = nio.apply_orientation(arr, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, arr.shape)
    return out, new_affine


def _bounded(arr: NDArray[Any], lo: float, hi: float | None) -> NDArray[np.float32]:
    """Return a new C-contiguous float32 copy of `arr` raised to `lo` and clipped to `hi`.

    `arr` may have any strides; `hi` None means no upper clip; done in one pass, blocked when it
    transposes (`survfuse.data.voxel_copy`). Why: a flipped or transposed view is copied once, by
    this pass, not first by a reorientation and again by each value change.
    """
    return bounded_copy(arr, lo, hi)


def _spacing(affine: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def _resample(
    arr: NDArray[np.float32],
    affine: NDArray[np.float64],
    target: tuple[float, float, float],
    mode: str,
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    import torch

    old = _spacing(affine)
    new = np.asarray(target, dtype=np.float64)
    scale = old / new
    if np.allclose(scale, 1.0):
        return arr, affine
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    # An explicit scale factor (not recomputed from the sizes): output voxel j samples input
    # coordinate (j + 0.5) / scale - 0.5, so the output voxel size is exactly `target`.
    out = torch.nn.functional.interpolate(
        t,
        scale_factor=tuple(float(x) for x in scale),
        mode="trilinear" if mode == "linear" else "nearest-exact",
        align_corners=False if mode == "linear" else None,
        recompute_scale_factor=False,
    )
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / scale
    shift = 0.5 / scale - 0.5  # input index of output voxel 0's centre
    new_affine[:3, 3] = affine[:3, :3] @ shift + affine[:3, 3]
    return out[0, 0].numpy().astype(np.float32, copy=False), new_affine


def _crop_or_pad(
    arr: NDArray[np.float32],
    affine: NDArray[np.float64],
    shape: tuple[int, int, int],
    centre: NDArray[np.float64],
    pad_value: float,
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Window of `shape` centred on voxel `centre` (clamped inside the volume when it fits)."""
    out = np.full(shape, pad_value, dtype=np.float32)
    starts = []
    src_sl, dst_sl = [], []
    for n, want, c in zip(arr.shape, shape, centre, strict=True):
        start = round(float(c) - want / 2.0)
        if want <= n:
            start = min(max(start, 0), n - want)
        else:
            start = -((want - n) // 2)  # pad symmetrically around the whole axis
        starts.append(start)
        lo, hi = max(start, 0), min(start + want, n)
        src_sl.append(slice(lo, hi))
        dst_sl.append(slice(lo - start, hi - start))
    out[tuple(dst_sl)] = arr[tuple(src_sl)]
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ np.asarray(starts, dtype=np.float64) + affine[:3, 3]
    return out, new_affine


def check_ct_array(
    arr: NDArray[np.float32], preprocessing: CTPreprocessing, *, path: str | Path = "<array>"
) -> dict[str, float]:
    """Make the checks done before any value changes.

    A non-empty 3-d volume with at least `min_slices` voxels along every axis and (`check_hu`) a
    plausible CT HU distribution.

    Returns the HU percentiles {hu_p01, hu_p50, hu_p99}; raises `CTLoadError(path, reason)`.
    Shared by `preprocess_ct` and the published MONAI pipelines (`survfuse.encoders.fm_transforms`).
    """
    path = Path(path)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise CTLoadError(path, f"expected a non-empty 3-d volume, got shape {arr.shape}")
    if min(arr.shape) < preprocessing.min_slices:
        raise CTLoadError(
            path,
            f"too few slices: shape {tuple(int(s) for s in arr.shape)} has fewer than "
            f"min_slices={preprocessing.min_slices} voxels along an axis (a localiser or single "
            "slice, not a CT volume)",
        )
    return _check_hu(path, arr, preprocessing)


def preprocess_ct(
    arr: NDArray[np.float32],
    affine: NDArray[np.float64],
    preprocessing: CTPreprocessing,
    *,
    path: str | Path = "<array>",
    meta: dict[str, Any] | None = None,
) -> CTVolume:
    """Apply `preprocessing` to a HU array [X, Y, Z] with its RAS+ affine (see module docs)."""
    import nibabel as nib

    prep = preprocessing
    path = Path(path)
    meta = dict(meta or {})
    meta.update(
        path=str(path),
        native_shape=tuple(int(s) for s in arr.shape),
        native_spacing=tuple(float(s) for s in _spacing(affine)),
        native_orientation="".join(nib.aff2axcodes(affine)),
    )
    meta.update(check_ct_array(arr, prep, path=path))
    if prep.hu_calibration == "landmarks":
        shift = calibration_shift(arr, prep.floor_hu, path=path)
        meta["hu_calibration_shift"] = shift
        if shift != 0.0:  # a calibrated copy (opt-in: one more pass than without)
            arr = apply_shift(arr, shift, prep.floor_hu)
    # Memory: the input is never written; one float32 copy is made, by the first value change
    # (floor, or floor + window together when nothing geometric follows: max(x, f) clipped to
    # [lo, hi] equals x clipped to [max(f, lo), hi]), reading the reoriented view directly.
    arr, affine = _reorient(arr, affine, prep.orientation)
    geometric = prep.spacing is not None or prep.target_shape is not None
    if prep.hu_window is not None and not geometric:
        arr = _bounded(arr, max(prep.floor_hu, prep.hu_window[0]), prep.hu_window[1])
    else:
        arr = _bounded(arr, prep.floor_hu, None)
    if prep.spacing is not None:
        arr, affine = _resample(arr, affine, prep.spacing, prep.interpolation)
    if prep.target_shape is not None:
        if prep.crop == "foreground":
            fg = np.argwhere(arr > prep.foreground_hu)
            if fg.size == 0:
                raise CTLoadError(path, f"no foreground voxels above {prep.foreground_hu} HU")
            centre = (fg.min(axis=0) + fg.max(axis=0) + 1) / 2.0
        else:
            centre = np.asarray(arr.shape, dtype=np.float64) / 2.0
        arr, affine = _crop_or_pad(arr, affine, prep.target_shape, centre, prep.pad_hu)
    if prep.hu_window is not None:
        lo, hi = prep.hu_window
        if geometric:  # else clipped above
            arr = np.clip(arr, lo, hi, out=arr)
        if prep.scale_to_unit:
            arr -= np.float32(lo)
            arr /= np.float32(hi - lo)
    return CTVolume(
        array=np.ascontiguousarray(arr, dtype=np.float32),
        spacing=_spacing(affine),
        affine=affine,
        meta=meta,
    )


def load_ct(path: str | Path, preprocessing: CTPreprocessing | None = None) -> CTVolume:
    """Load a NIfTI file / DICOM series folder / SimpleITK-readable file and preprocess it.

    Raises CTLoadError(path, reason) for unreadable files, non-CT modalities (DICOM Modality tag
    or, without one, an implausible HU distribution), broken DICOM series (duplicate or missing
    slice positions) and implausible HU ranges.
    """
    prep = preprocessing or CTPreprocessing()
    arr, affine, meta = read_ct_hu(path, stored=True)
    return preprocess_ct(arr, affine, prep, path=path, meta=meta)
