"""DICOM series assembly with pydicom: slice geometry checks, HU from rescale slope/intercept.

A series folder is read into a HU volume `[X, Y, Z]` (X = column index, Y = row index, Z = slice)
with a NIfTI-style RAS+ affine. Series with duplicated or missing slice positions, mixed
geometry or a non-CT modality are refused: reading them as if whole would silently distort the
volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["DicomSeries", "DicomSeriesError", "read_dicom_series"]

# Slice positions closer than this (mm) are the same position; gaps larger than
# GAP_FACTOR x the nominal spacing are missing slices.
POSITION_TOL_MM = 1e-3
GAP_FACTOR = 1.5
_MAX_LISTED = 20


class DicomSeriesError(ValueError):
    """A DICOM folder that cannot be assembled into one CT volume; the message says why."""


@dataclass
class DicomSeries:
    """An assembled series: `hu` float32 [X, Y, Z], RAS+ `affine` (4, 4), `meta` (header facts)."""

    hu: NDArray[np.float32]
    affine: NDArray[np.float64]
    meta: dict[str, Any] = field(default_factory=dict)


def _fmt(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")


def _read_headers(folder: Path) -> list[tuple[Path, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    out = []
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue  # DICOMDIR-less exports often hold non-DICOM files (README, thumbnails)
        if "ImagePositionPatient" in ds or "Modality" in ds:
            out.append((p, ds))
    return out


def check_slice_positions(positions: NDArray[np.float64], names: list[str]) -> float:
    """Check slice positions along the slice normal (sorted ascending) form a uniform grid.

    Returns the slice spacing in mm. Raises DicomSeriesError naming the duplicated positions
    (with their files) and the missing positions (or irregular gaps).
    """
    order = np.argsort(positions, kind="stable")
    pos = positions[order]
    problems = []
    diffs = np.diff(pos)
    dup_idx = np.flatnonzero(diffs < POSITION_TOL_MM)
    if dup_idx.size:
        groups: dict[str, list[str]] = {}
        for i in dup_idx:
            key = _fmt(float(pos[i]))
            for j in (i, i + 1):
                name = names[order[j]]
                if name not in groups.setdefault(key, []):
                    groups[key].append(name)
        listed = "; ".join(f"{k} mm ({', '.join(v)})" for k, v in groups.items())
        problems.append(f"duplicate slice positions: {listed}")
    unique = pos[np.concatenate([[True], diffs >= POSITION_TOL_MM])]
    gaps = np.diff(unique)
    if gaps.size == 0:
        if problems:
            raise DicomSeriesError("; ".join(problems))
        return 1.0
    # The finest spacing seen is the grid a complete series would have.
    nominal = float(gaps.min())
    missing: list[str] = []
    irregular: list[str] = []
    for a, b, gap in zip(unique[:-1], unique[1:], gaps, strict=True):
        if gap <= GAP_FACTOR * nominal:
            continue
        k = gap / nominal
        between = f"between {_fmt(float(a))} and {_fmt(float(b))} mm"
        if abs(k - round(k)) < 0.1:
            expected = [float(a) + nominal * m for m in range(1, round(k))]
            listed = ", ".join(_fmt(x) for x in expected[:4])
            if len(expected) > 4:
                listed += f", ..., {_fmt(expected[-1])}"
            missing.append(f"{len(expected)} {between} ({listed})")
        else:
            irregular.append(f"{_fmt(float(gap))} mm {between}")
    if missing or irregular:
        text = f"missing slice positions (expected uniform spacing {_fmt(nominal)} mm): "
        text += "; ".join(missing[:_MAX_LISTED])
        if irregular:
            text += (
                ("; " if missing else "")
                + "irregular gaps of "
                + "; ".join(irregular[:_MAX_LISTED])
            )
        problems.append(text)
    if problems:
        raise DicomSeriesError("; ".join(problems))
    return nominal


def _decode_with_sitk(path: Path, cause: Exception) -> NDArray[np.float32]:
    """Decode one slice with SimpleITK (GDCM codecs: JPEG 2000, JPEG-LS ...) in HU, [row, col]."""
    try:
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
    except Exception as exc:
        raise DicomSeriesError(
            f"cannot decode pixel data of {path.name}: {cause} (SimpleITK: {exc})"
        ) from exc
    return arr.reshape(arr.shape[-2:])


def read_dicom_series(folder: str | Path, *, require_modality: str | None = "CT") -> DicomSeries:
    """Assemble the largest series in `folder` into a HU volume with an RAS+ affine.

    HU = stored value x RescaleSlope + RescaleIntercept (per slice). Raises DicomSeriesError for:
    no DICOM files, a modality other than `require_modality`, mixed orientation / pixel spacing /
    matrix size, duplicated or missing slice positions.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder} is not a folder")
    headers = _read_headers(folder)
    if not headers:
        raise DicomSeriesError(f"no DICOM files in {folder}")
    series: dict[str, list[tuple[Path, Any]]] = {}
    for p, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
    uid, items = max(series.items(), key=lambda kv: (len(kv[1]), kv[0]))
    modalities = sorted({str(ds.get("Modality", "")) for _, ds in items})
    if require_modality is not None and modalities != [require_modality]:
        raise DicomSeriesError(
            f"non-{require_modality} modality {'/'.join(modalities) or 'missing'} "
            f"(DICOM Modality tag) in {folder}"
        )
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        lacking = [p.name for p, ds in items if tag not in ds]
        if lacking:
            raise DicomSeriesError(f"{len(lacking)} slices lack {tag} (e.g. {lacking[0]})")
    iop = np.array([float(v) for v in items[0][1].ImageOrientationPatient], dtype=np.float64)
    spacing_rc = np.array([float(v) for v in items[0][1].PixelSpacing], dtype=np.float64)
    shape = (int(items[0][1].Rows), int(items[0][1].Columns))
    for p, ds in items[1:]:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise DicomSeriesError(f"slice {p.name} has a different ImageOrientationPatient")
        if not np.allclose([float(v) for v in ds.PixelSpacing], spacing_rc, atol=1e-4):
            raise DicomSeriesError(f"slice {p.name} has a different PixelSpacing")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DicomSeriesError(f"slice {p.name} has a different matrix size")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    positions = ipp @ normal
    names = [p.name for p, _ in items]
    check_slice_positions(positions, names)
    order = np.argsort(positions, kind="stable")

    import pydicom

    slices = []
    for i in order:
        p = items[i][0]
        ds = pydicom.dcmread(p)
        try:
            px = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # no codec for this transfer syntax, truncated pixel data
            px = _decode_with_sitk(p, exc)
            slices.append(px)  # SimpleITK/GDCM has already applied slope and intercept
            continue
        slope = float(ds.get("RescaleSlope", 1.0))
        inter = float(ds.get("RescaleIntercept", 0.0))
        slices.append(px * np.float32(slope) + np.float32(inter))
    # pixel_array is [row, col]; x (column index) runs along row_cos, y (row index) along col_cos
    hu = np.ascontiguousarray(np.stack(slices, axis=-1).transpose(1, 0, 2), dtype=np.float32)
    first, last = ipp[order[0]], ipp[order[-1]]
    n = len(order)
    step = (
        (last - first) / (n - 1) if n > 1 else normal * float(items[0][1].get("SliceThickness", 1))
    )
    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing_rc[1]
    lps[:3, 1] = col_cos * spacing_rc[0]
    lps[:3, 2] = step
    lps[:3, 3] = first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS -> NIfTI RAS
    ds0 = items[order[0]][1]
    meta = {
        "format": "dicom",
        "modality": modalities[0] if modalities else None,
        "series_instance_uid": uid,
        "n_slices": n,
        "ignored_series": len(series) - 1,
        "manufacturer": str(ds0.get("Manufacturer", "")),
        "study_date": str(ds0.get("StudyDate", "")),
    }
    return DicomSeries(hu=hu, affine=affine, meta=meta)
