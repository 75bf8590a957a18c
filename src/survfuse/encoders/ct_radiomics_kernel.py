"""The compiled one-pass voxel loop of `ct_radiomics`: per-cell histograms, moments, texture."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

__all__ = ["radiomics_sums"]


@numba.njit(cache=True, nogil=True)
def radiomics_sums(
    x: Any,
    ix: Any,
    iy: Any,
    iz: Any,
    gy: int,
    gz: int,
    roi: Any,
    n_cells: int,
    nb: int,
    lo: float,
    inv_step: float,
    n_uniform: int,
    splits: Any,
    isx: float,
    isy: float,
    isz: float,
) -> Any:  # pragma: no cover - compiled
    """Accumulate per-cell histograms, moments and texture sums in one pass over the voxels.

    Cell n_cells is outside the ROI; `roi` is [X, Y, Z] bool, or [1, 1, 1] for no ROI. Per cell:
    fine histogram [C+1, nb]; count, Σz, Σz², Σz³, Σz⁴ [C+1, 5] (z = HU/1000); texture sums
    [C+1, 9]: (n, Σ|dx|), (n, Σ|dy|), (n, Σ|dz|), (n, Σg, Σg²) of forward differences
    (per mm) whose voxels are all inside the ROI, g = gradient magnitude.

    Fine bin = uniform bin floor((x - lo) * inv_step) + number of split points <= x.
    """
    nx, ny, nz = x.shape
    has_roi = roi.shape[0] == nx and roi.shape[1] == ny and roi.shape[2] == nz
    hist = np.zeros((n_cells + 1, nb))
    sums = np.zeros((n_cells + 1, 5))
    tex = np.zeros((n_cells + 1, 9))
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                c = (ix[i] * gy + iy[j]) * gz + iz[k]
                if has_roi and not roi[i, j, k]:
                    c = n_cells
                v = x[i, j, k]
                b = int((v - lo) * inv_step)
                b = min(max(b, 0), n_uniform - 1)
                for t in splits:
                    if v >= t:
                        b += 1
                hist[c, b] += 1.0
                z = v / 1000.0
                z2 = z * z
                sums[c, 0] += 1.0
                sums[c, 1] += z
                sums[c, 2] += z2
                sums[c, 3] += z2 * z
                sums[c, 4] += z2 * z2
                if c == n_cells:
                    continue
                okx = i + 1 < nx and (not has_roi or roi[i + 1, j, k])
                oky = j + 1 < ny and (not has_roi or roi[i, j + 1, k])
                okz = k + 1 < nz and (not has_roi or roi[i, j, k + 1])
                dx = dy = dz = 0.0
                if okx:
                    dx = abs(x[i + 1, j, k] - v) / 1000.0 * isx
                    tex[c, 0] += 1.0
                    tex[c, 1] += dx
                if oky:
                    dy = abs(x[i, j + 1, k] - v) / 1000.0 * isy
                    tex[c, 2] += 1.0
                    tex[c, 3] += dy
                if okz:
                    dz = abs(x[i, j, k + 1] - v) / 1000.0 * isz
                    tex[c, 4] += 1.0
                    tex[c, 5] += dz
                if okx and oky and okz:
                    g2 = dx * dx + dy * dy + dz * dz
                    tex[c, 6] += 1.0
                    tex[c, 7] += np.sqrt(g2)
                    tex[c, 8] += g2
    return hist[:n_cells], sums[:n_cells], tex[:n_cells]
