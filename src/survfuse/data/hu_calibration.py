"""CT intensity calibration before encoding: an HU landmark per volume (the lung parenchyma peak).

A scanner whose HU scale is offset (calibration drift, a site's reconstruction) moves every tissue
by the same number of HU, and intensity features (histogram, tissue fractions) move with it.
`hu_calibration: landmarks` (`survfuse.data.imaging.CTPreprocessing`) estimates that offset from
one landmark of the volume itself: the mode of the voxels in [-1000, -600) HU (4 HU bins,
Gaussian-smoothed with sd 3 bins, refined to sub-bin by a parabola through the maximum), i.e. aerated lung parenchyma, is moved to -850 HU by
subtracting `shift = mode + 850` from every voxel above `floor_hu` (padding stays at the floor).

It uses only the volume being loaded: no outcome, no site label, no other patient's volume. It is
therefore **not transductive**: an external site's volumes are calibrated exactly as they would be
one at a time at prediction time, and outcome permutation cannot change a feature.

When no landmark can be trusted, the volume is used as stored (shift 0) with a
`CTCalibrationWarning` naming the file and the reason: too few voxels (a tiny volume or one
without lung in the field of view, all padding), a histogram maximum at the edge of the search
range (all air, or soft tissue only), no clear peak (a plateau of partial-volume voxels), or a
shift larger than `MAX_SHIFT_HU`.
The estimate is never NaN.

Limits: lung density depends on inspiration and disease (emphysema, consolidation), so the
landmark carries some physiology; the simulator's lungs are at -850 HU with emphysema clusters at
-975 HU, outside the smoothed peak. On coarse, noisy volumes (32 x 32 x 20 simulated) the peak is
lost in noise and blur; the checks above then fall back rather than shift by noise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "HU_CALIBRATIONS",
    "LUNG_HU",
    "CTCalibrationWarning",
    "Landmark",
    "apply_shift",
    "calibration_shift",
    "lung_peak_landmark",
]

HU_CALIBRATIONS = ("none", "landmarks")
#: where the lung parenchyma peak is moved to (HU)
LUNG_HU = -850.0
#: the landmark's search range [lo, hi) HU and histogram bin width
SEARCH_HU = (-1000.0, -600.0)
BIN_HU = 4.0
#: smoothing kernel: Gaussian, sd 3 bins, +-6 bins
_KERNEL = np.exp(-0.5 * (np.arange(-6, 7) / 3.0) ** 2)
_KERNEL /= _KERNEL.sum()
#: a maximum closer than this (HU) to the search range's edges is an edge (air, soft tissue)
EDGE_HU = 48.0
#: a peak: the smoothed histogram falls to <= PEAK_DROP x its maximum within PEAK_WIDTH_HU on
#: both sides (as far as the search range goes)
PEAK_DROP = 0.7
PEAK_WIDTH_HU = 100.0
#: at least this many voxels, and this fraction of the non-padding voxels, in the search range
#: (lungs fill ~25% of a chest CT's body; a partial-volume rim of the body alone holds ~5-8%)
MIN_VOXELS = 500
MIN_FRACTION = 0.10
#: larger estimated shifts are treated as a failed landmark, not as a scanner offset
MAX_SHIFT_HU = 150.0
#: volumes above this many voxels are sampled (every k-th voxel in C order) for the histogram
MAX_SAMPLE = 8_000_000


class CTCalibrationWarning(UserWarning):
    """A volume's HU landmark could not be found; it was used without calibration."""


@dataclass(frozen=True)
class Landmark:
    """The lung-peak landmark of one volume.

    `shift` (HU) is subtracted from the non-padding voxels; None when no landmark was found, with
    `reason` saying why. `peak_hu` is the smoothed histogram's mode (None when not found).
    """

    shift: float | None
    peak_hu: float | None = None
    reason: str = ""


def lung_peak_landmark(arr: NDArray[np.floating], floor_hu: float) -> Landmark:
    """Estimate the lung parenchyma peak of a HU volume and the shift that moves it to -850 HU.

    Parameters
    ----------
    arr : ndarray
        HU values, any shape and memory order (not modified).
    floor_hu : float
        Voxels at or below it are padding (outside the field of view or masked) and ignored.

    Returns
    -------
    Landmark
        `shift` None with a `reason` when the peak is not trustworthy (see the module docs).
    """
    step = max(1, arr.size // MAX_SAMPLE)
    if step > 1:  # an index gather: no copy of a Fortran-ordered volume
        sample = arr[np.unravel_index(np.arange(0, arr.size, step), arr.shape)]
    else:
        sample = np.asarray(arr).ravel()
    if not np.isfinite(sample).all():
        return Landmark(None, reason="non-finite voxel values")
    n_tissue = int(np.count_nonzero(sample > floor_hu))
    lo, hi = SEARCH_HU
    vals = sample[(sample > lo) & (sample < hi)]
    if n_tissue == 0:
        return Landmark(None, reason=f"no voxel above the floor ({floor_hu:g} HU)")
    if vals.size < MIN_VOXELS or vals.size < MIN_FRACTION * n_tissue:
        return Landmark(
            None,
            reason=f"no lung in the field of view: {vals.size} of {n_tissue} voxels in "
            f"[{lo:g}, {hi:g}) HU",
        )
    n_bins = round((hi - lo) / BIN_HU)
    hist, edges = np.histogram(vals, bins=n_bins, range=(lo, hi))
    smooth = np.convolve(hist.astype(np.float64), _KERNEL, mode="same")
    i = int(np.argmax(smooth))
    peak = float((edges[i] + edges[i + 1]) / 2.0)
    edge = round(EDGE_HU / BIN_HU)
    if i < edge or i >= n_bins - edge:
        return Landmark(
            None,
            reason=f"no lung peak: the histogram's maximum ({peak:g} HU) is at the edge of "
            f"[{lo:g}, {hi:g}) HU (air or soft tissue only?)",
        )
    # sub-bin position: the vertex of the parabola through the maximum and its two neighbours
    left, mid, right = smooth[i - 1], smooth[i], smooth[i + 1]
    if left - 2.0 * mid + right < 0:
        peak += BIN_HU * 0.5 * float((left - right) / (left - 2.0 * mid + right))
    width = round(PEAK_WIDTH_HU / BIN_HU)
    sides = (smooth[max(0, i - width) : i], smooth[i + 1 : i + 1 + width])
    if max(float(side.min()) for side in sides) > PEAK_DROP * float(smooth[i]):
        return Landmark(
            None, reason=f"no clear lung peak in [{lo:g}, {hi:g}) HU (a plateau at {peak:g} HU)"
        )
    shift = peak - LUNG_HU
    if abs(shift) > MAX_SHIFT_HU:
        return Landmark(
            None, reason=f"lung peak at {peak:g} HU implies a shift beyond {MAX_SHIFT_HU:g} HU"
        )
    return Landmark(shift, peak)


def calibration_shift(
    arr: NDArray[np.floating], floor_hu: float, *, path: str | Path = "<array>"
) -> float:
    """Return the landmark shift of `arr`, or 0.0 with a `CTCalibrationWarning` naming `path`."""
    mark = lung_peak_landmark(arr, floor_hu)
    if mark.shift is None:
        warnings.warn(
            f"{path}: HU calibration skipped, volume used as stored: {mark.reason}",
            CTCalibrationWarning,
            stacklevel=3,
        )
        return 0.0
    return mark.shift


def apply_shift(arr: NDArray[np.floating], shift: float, floor_hu: float) -> NDArray[np.float32]:
    """Return a new C-contiguous float32 `arr - shift`, padding (<= floor) and results at the floor.

    Voxels at or below `floor_hu` stay at `floor_hu` (padding is not tissue and has no HU scale);
    shifted voxels are raised to `floor_hu`.
    """
    floor = np.float32(floor_hu)
    out = np.empty(arr.shape, np.float32)
    np.subtract(arr, np.float32(shift), out=out, casting="unsafe")
    np.maximum(out, floor, out=out)
    out[arr <= floor] = floor
    return out
