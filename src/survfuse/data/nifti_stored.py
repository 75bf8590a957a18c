"""A NIfTI-1 CT's voxels exactly as stored, without nibabel's float copy.

`read_stored(path)` returns the stored integer voxels (int8/uint8/int16/uint16, every value exact
in float32) as a read-only view, and the RAS+ affine, when the header has no intensity scaling
(scl_slope unset or 1, scl_inter unset or 0): then those integers *are* the HU that
`nibabel.get_fdata(dtype=float32)` would return, and `survfuse.data.imaging.preprocess_ct` makes
its one float32 copy in its first value change instead of nibabel making one more before it.

A `.nii.gz` file is inflated in one call, with ISA-L (`isal`, the `imaging` extra) when it is
installed (about 2-3x zlib's speed) and the standard library's zlib otherwise, and the voxels are
a view into the inflated bytes. A `.nii` file is memory-mapped by nibabel. Anything else (NIfTI-2,
scaled or floating-point voxels, 32-bit integers) returns None and the caller reads it with
nibabel as before.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["inflate", "read_stored"]

#: stored types whose every value is exact in float32 (so float32(stored) == get_fdata)
_EXACT = {np.dtype(t).str[1:] for t in ("i1", "u1", "i2", "u2")}


def inflate(data: bytes) -> bytes:
    """Gunzip `data` (all members) with ISA-L when installed, else zlib; same bytes either way."""
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - depends on the environment
        return gzip.decompress(data)
    return bytes(igzip.decompress(data))


def _unscaled(slope: float | None, inter: float | None) -> bool:
    return slope in (None, 1.0) and inter in (None, 0.0)


def read_stored(path: Path) -> tuple[NDArray[Any], NDArray[np.float64]] | None:
    """Return (stored voxels [X, Y, Z] read-only, RAS+ affine), or None (see the module docs)."""
    import nibabel as nib

    raw: bytes | None = None
    if path.name.endswith(".nii.gz"):
        raw = inflate(path.read_bytes())
        if len(raw) < 348 or int.from_bytes(raw[:4], "little") not in (348, 348 << 24):
            return None  # not NIfTI-1 (NIfTI-2 has a 540-byte header)
        # the header as stored (an image's header copy has its vox_offset reset)
        header: Any = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=True)
        affine = header.get_best_affine()
        slope, inter = header.get_slope_inter()
    else:
        img: Any = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image) or isinstance(img, nib.Nifti2Image):
            return None
        # a loaded image's header has its scaling moved to the data proxy
        header, affine = img.header, img.affine
        proxy: Any = img.dataobj
        slope, inter = float(proxy.slope), float(proxy.inter)
    dtype = np.dtype(header.get_data_dtype())
    shape = tuple(int(s) for s in header.get_data_shape())
    if dtype.str[1:] not in _EXACT or not _unscaled(slope, inter):
        return None
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        return None  # the caller reports the shape
    if raw is None:
        arr = np.asarray(proxy.get_unscaled())
    else:
        offset = int(header.get_data_offset())
        count = int(np.prod(shape))
        if len(raw) < offset + count * dtype.itemsize:
            return None  # truncated: nibabel says so
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    if arr.ndim == 4:
        arr = arr[..., 0]
    return arr, np.asarray(affine, dtype=np.float64)
