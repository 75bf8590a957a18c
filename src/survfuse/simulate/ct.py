"""Vectorised rendering of synthetic chest CT angiograms (int16 HU) from latent patient factors.

Every latent factor the hazards use is drawn into the pixels, with partial-volume (soft) edges so
that region statistics are proportional to the simulated quantity:

- body (fat ring + soft tissue), ribs, sternum, a vertebral body whose trabecular density falls
  with age (the shared age signal is visible in CT too);
- lungs at about -850 HU with an emphysema fraction rendered as low-attenuation clusters
  (about -975 HU, below the usual -950 HU emphysema threshold);
- a heart with contrast-filled chambers: right ventricle (RV) and left ventricle (LV) with an RV/LV
  size ratio;
- pulmonary arteries filled with contrast whose central filling defects (clot, about 45 HU) occupy
  the clot-burden fraction of the lumen;
- coronary calcium spots (1200 HU, far above the 130 HU calcium threshold) whose total volume is
  the calcium latent (spots are at least ~0.7 voxel in radius, so fewer, larger spots at coarse
  resolution);
- a descending aorta.

Scanner effects per site: voxel spacing (field of view), a blur (resolution), additive noise and a
HU offset. Voxels outside the body are exported as -1024 (background masked, as after table
removal), which keeps the gzip files small.

`render_ct(..., labels=...)` also paints a region label map (`REGION_LABELS`: heart with its
chambers and coronary calcium, lungs, pulmonary arteries, aorta; a voxel gets a region's label
when the region covers more than half of it), the masks a segmentation model (TotalSegmentator)
gives a real CT, without touching the random stream: the HU volume is the same with or without.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

#: nominal field of view in mm (x, y, z) at spacing scale 1.0
BASE_FOV_MM = (400.0, 400.0, 260.0)
AIR_HU = -1024.0
#: zlib level: noisy int16 voxels compress almost as well at 1 as at 9, and 5x faster
GZIP_LEVEL = 1
EMPHYSEMA_CLUSTER_MM = 12.0
HEART, LUNGS, PULMONARY_ARTERIES, AORTA = 1, 2, 3, 4
#: region name -> label value of the simulator's segmentation masks (0 = none of them)
REGION_LABELS = {
    "heart": HEART,
    "lungs": LUNGS,
    "pulmonary_arteries": PULMONARY_ARTERIES,
    "aorta": AORTA,
}


@dataclass(frozen=True)
class Scanner:
    """Acquisition properties of one site's scanner."""

    spacing_scale: float = 1.0  # multiplies the nominal voxel spacing (larger = wider FOV)
    hu_offset: float = 0.0  # calibration offset added to every in-body voxel
    noise_sd: float = 10.0  # additive Gaussian noise, HU
    blur_xy: float = 0.5  # Gaussian PSF sigma in voxels, in-plane
    blur_z: float = 0.6  # Gaussian PSF sigma in voxels, along z (slice thickness)


def spacing_for(shape: tuple[int, int, int], scanner: Scanner) -> tuple[float, float, float]:
    """Voxel spacing (mm) so that `shape` covers the nominal FOV times the scanner's scale."""
    return tuple(  # type: ignore[return-value]
        round(BASE_FOV_MM[i] / shape[i] * scanner.spacing_scale, 4) for i in range(3)
    )


def affine_for(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine with the volume centre at the origin."""
    aff = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [-(shape[i] - 1) / 2.0 * spacing[i] for i in range(3)]
    return aff


@lru_cache(maxsize=16)
def _grid(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable voxel-centre coordinates in mm: x [X,1,1], y [1,Y,1], z [1,1,Z]."""
    axes = [
        ((np.arange(shape[i], dtype=np.float32) - (shape[i] - 1) / 2.0) * spacing[i]).astype(
            np.float32
        )
        for i in range(3)
    ]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _soft(signed_dist_mm: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Partial-volume weight in [0, 1] from a signed distance (negative inside)."""
    return np.clip(0.5 - signed_dist_mm / voxel_mm, 0.0, 1.0)


class _Canvas:
    """A float32 HU volume plus its coordinate axes; paints shapes inside their bounding box."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.vox = float(min(spacing))
        self.x, self.y, self.z = _grid(shape, spacing)
        self.axes1d = (self.x.ravel(), self.y.ravel(), self.z.ravel())
        self.vol = np.full(shape, AIR_HU, dtype=np.float32)
        self.labels: np.ndarray | None = None  # uint8 region labels, painted when set

    def box(
        self, lo: tuple[float, float, float], hi: tuple[float, float, float]
    ) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in [lo - 1 voxel, hi + 1 voxel]."""
        out = []
        for ax, a, b in zip(self.axes1d, lo, hi, strict=True):
            i0 = int(np.searchsorted(ax, a - self.vox, side="left"))
            i1 = int(np.searchsorted(ax, b + self.vox, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x[sl[0]], self.y[:, sl[1]], self.z[:, :, sl[2]]

    def paint(
        self, sl: tuple[slice, slice, slice], weight: np.ndarray, hu: object, label: int = 0
    ) -> None:
        """Composite `hu` with partial-volume `weight` over the box `sl` (in place).

        With `labels` set and `label` > 0, voxels more than half covered get that region label.
        """
        view = self.vol[sl]
        view += np.broadcast_to(weight, view.shape) * (hu - view)  # type: ignore[operator]
        if self.labels is not None and label:
            lab = self.labels[sl]
            lab[np.broadcast_to(weight, lab.shape) > 0.5] = label

    def ellipsoid(
        self,
        centre: tuple[float, float, float],
        axes: tuple[float, float, float],
        hu: float,
        label: int = 0,
    ) -> None:
        sl = self.box(
            tuple(c - a for c, a in zip(centre, axes, strict=True)),  # type: ignore[arg-type]
            tuple(c + a for c, a in zip(centre, axes, strict=True)),  # type: ignore[arg-type]
        )
        if sl is None:
            return
        x, y, z = self.coords(sl)
        rho = np.sqrt(
            ((x - centre[0]) / axes[0]) ** 2
            + ((y - centre[1]) / axes[1]) ** 2
            + ((z - centre[2]) / axes[2]) ** 2
        )
        self.paint(sl, _soft((rho - 1.0) * min(axes), self.vox), hu, label)


def render_ct(
    anatomy: dict[str, float],
    shape: tuple[int, int, int],
    scanner: Scanner,
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Render one CT angiogram.

    anatomy keys: body_scale, age, emphysema (fraction of lung), rv_lv (RV/LV size ratio),
    clot (fraction of pulmonary-artery lumen occluded), calcium_mm3 (total coronary calcium
    volume), heart_dx/heart_dy (mm jitter). Returns (int16 HU array [X, Y, Z], spacing mm).
    `labels`: a zeroed uint8 array of `shape`, filled in place with `REGION_LABELS`.
    """
    spacing = spacing_for(shape, scanner)
    cv = _Canvas(shape, spacing)
    if labels is not None:
        if labels.shape != tuple(shape) or labels.dtype != np.uint8:
            raise ValueError(
                f"labels must be uint8 {tuple(shape)}, got {labels.dtype} {labels.shape}"
            )
        cv.labels = labels
    vox = cv.vox
    x, y, z = cv.x, cv.y, cv.z
    s = float(anatomy["body_scale"])

    # z-independent anatomy is composed on one 2-D slice [X, Y] and broadcast along z:
    # body (subcutaneous fat, soft tissue), sternum; ribs in periodic z bands
    bx, by = 165.0 * s, 115.0 * s
    x2, y2 = x[:, :, 0], y[:, :, 0]
    rho_body = np.sqrt((x2 / bx) ** 2 + (y2 / by) ** 2)
    body_w = _soft((rho_body - 1.0) * by, vox)
    inner = 1.0 - 18.0 / by
    base = np.full(shape[:2], AIR_HU, dtype=np.float32)
    base += body_w * (-100.0 - base)
    base += _soft((rho_body - inner) * by, vox) * (45.0 - base)
    sternum = _soft(np.maximum(np.abs(x2) - 14.0, np.abs(y2 - (by * inner - 12.0)) - 6.0), vox)
    base += sternum * (450.0 - base)
    rib_shell = _soft(np.abs(rho_body - (inner - 0.05)) * by - 4.0, vox) * (np.abs(y2) < 0.8 * by)
    with_rib = base + rib_shell * (650.0 - base)
    rib_band = np.cos(z.ravel() * (2 * np.pi / 32.0)) > 0.35
    cv.vol[...] = np.where(rib_band[None, None, :], with_rib[:, :, None], base[:, :, None])

    # lungs with emphysema: voxels at about -960 HU, more often in the upper lobes
    lung_axes = (62.0 * s, 82.0 * s, 105.0)
    lc_x, lc_y, lc_z = 75.0 * s, -8.0 * s, 15.0
    sl = cv.box(
        (-lc_x - lung_axes[0], lc_y - lung_axes[1], lc_z - lung_axes[2]),
        (lc_x + lung_axes[0], lc_y + lung_axes[1], lc_z + lung_axes[2]),
    )
    if sl is not None:
        lx, ly, lz = cv.coords(sl)
        ryz = ((ly - lc_y) / lung_axes[1]) ** 2 + ((lz - lc_z) / lung_axes[2]) ** 2
        rho = np.sqrt(((np.abs(lx) - lc_x) / lung_axes[0]) ** 2 + ryz)  # mirror-symmetric pair
        lung_w = _soft((rho - 1.0) * min(lung_axes), vox)
        zr = (lz - z.min()) / max(float(z.max() - z.min()), 1e-6)
        p_emph = np.clip(float(anatomy["emphysema"]) * (0.5 + zr), 0.0, 1.0)
        # clusters of about 12 mm (whole voxels) so that emphysema survives the scanner blur
        k = max(1, round(EMPHYSEMA_CLUSTER_MM / vox))
        bshape = tuple((n + k - 1) // k for n in lung_w.shape)
        blocks = rng.random(bshape, dtype=np.float32)
        u = (
            blocks.repeat(k, 0)
            .repeat(k, 1)
            .repeat(k, 2)[: lung_w.shape[0], : lung_w.shape[1], : lung_w.shape[2]]
        )
        emph = u < p_emph
        cv.paint(sl, lung_w, np.where(emph, np.float32(-975.0), np.float32(-850.0)), LUNGS)

    # descending aorta, posterior-left in the mediastinum (a column through every slice)
    ao_c, ao_r = (-20.0 * s, -60.0 * s), 11.0 * s
    sl = cv.box((ao_c[0] - ao_r, ao_c[1] - ao_r, -1e4), (ao_c[0] + ao_r, ao_c[1] + ao_r, 1e4))
    if sl is not None:
        ax_, ay_, _ = cv.coords(sl)
        ao_d = np.sqrt((ax_ - ao_c[0]) ** 2 + (ay_ - ao_c[1]) ** 2)
        cv.paint(sl, _soft(ao_d - ao_r, vox), 210.0, AORTA)

    # heart (myocardium), then its contrast-filled chambers
    hc = (-22.0 * s + anatomy.get("heart_dx", 0.0), 30.0 * s + anatomy.get("heart_dy", 0.0), -45.0)
    heart_axes = (62.0 * s, 52.0 * s, 50.0)
    cv.ellipsoid(hc, heart_axes, 45.0, HEART)
    lv_r = 22.0 * s
    ratio = float(anatomy["rv_lv"])
    lv_c = (hc[0] - 20.0 * s, hc[1] - 8.0 * s, hc[2] - 4.0)
    rv_c = (hc[0] + 22.0 * s, hc[1] + 14.0 * s, hc[2])
    cv.ellipsoid(lv_c, (lv_r, lv_r * 0.9, lv_r * 1.1), 240.0, HEART)
    rv_r = lv_r * ratio
    cv.ellipsoid(rv_c, (rv_r, rv_r * 0.8, rv_r * 1.1), 330.0, HEART)

    # pulmonary arteries: trunk, left/right main, lower lobar branches; central filling defects
    clot = float(anatomy["clot"])
    phase = float(rng.random())
    trunk_a = (rv_c[0] - 5.0 * s, rv_c[1], rv_c[2] + 30.0)
    bif = (0.0, 10.0 * s, 35.0)
    hil_r, hil_l = (70.0 * s, 0.0, 45.0), (-70.0 * s, 0.0, 45.0)
    segments = [
        (trunk_a, bif, 15.0 * s),
        (bif, hil_r, 12.0 * s),
        (bif, hil_l, 12.0 * s),
        (hil_r, (80.0 * s, -15.0 * s, -30.0), 9.0 * s),
        (hil_l, (-80.0 * s, -15.0 * s, -30.0), 9.0 * s),
    ]
    for k, (a, b, r) in enumerate(segments):
        sl = cv.box(
            tuple(min(p, q) - r for p, q in zip(a, b, strict=True)),  # type: ignore[arg-type]
            tuple(max(p, q) + r for p, q in zip(a, b, strict=True)),  # type: ignore[arg-type]
        )
        if sl is None:
            continue
        px, py, pz = cv.coords(sl)
        ab = np.subtract(b, a)
        ab2 = float(ab @ ab)
        px, py, pz = px - a[0], py - a[1], pz - a[2]
        sa = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / ab2, 0.0, 1.0)
        dist = np.sqrt((px - sa * ab[0]) ** 2 + (py - sa * ab[1]) ** 2 + (pz - sa * ab[2]) ** 2)
        lumen = _soft(dist - r, vox)
        cv.paint(sl, lumen, 320.0, PULMONARY_ARTERIES)
        if clot > 0:
            # a central core occupying `clot` of the lumen cross-section on average, irregular
            # along the axis but never wider than the lumen
            wave = np.sin(2 * np.pi * (2.0 * sa + phase + k / 5))
            core = r * np.sqrt(clot * (1.0 + 0.5 * (1.0 - clot) * wave))
            cv.paint(sl, _soft(dist - np.minimum(core, r), vox) * lumen, 45.0)

    # vertebral body: cortical rim and trabecular bone losing density with age; discs
    sp_y = -by + 38.0 * s
    sl2 = cv.box((-25.0 * s, sp_y - 25.0 * s, -1e4), (25.0 * s, sp_y + 25.0 * s, 1e4))
    if sl2 is not None:
        sx, sy, sz = cv.coords(sl2)
        sp_d = np.sqrt(sx**2 + (sy - sp_y) ** 2)
        trab = 230.0 - 2.5 * (float(anatomy["age"]) - 60.0)
        disc = (np.cos(sz * (2 * np.pi / 30.0)) > 0.85).astype(np.float32)
        cv.paint(sl2, _soft(sp_d - 19.0 * s, vox), 650.0)
        cv.paint(sl2, _soft(sp_d - 15.0 * s, vox) * (1.0 - disc), trab)
        cv.paint(sl2, _soft(sp_d - 19.0 * s, vox) * disc, 80.0)

    # coronary calcium: spots along the atrioventricular groove with total volume calcium_mm3
    vol_ca = float(anatomy["calcium_mm3"])
    if vol_ca > 0:
        v_min = 4.0 / 3.0 * np.pi * (0.7 * vox) ** 3  # smallest spot the scanner resolves
        n_spots = int(np.clip(np.floor(vol_ca / v_min), 1, 6))
        r_spot = (3.0 * vol_ca / (4.0 * np.pi * n_spots)) ** (1.0 / 3.0)
        angles = rng.uniform(0, 2 * np.pi, size=n_spots)
        dz = rng.uniform(-15.0, 25.0, size=n_spots)
        for ang, zz in zip(angles, dz, strict=True):
            c = (
                hc[0] + 0.8 * heart_axes[0] * float(np.cos(ang)),
                hc[1] + 0.8 * heart_axes[1] * float(np.sin(ang)),
                hc[2] + float(zz),
            )
            sl = cv.box(
                (c[0] - r_spot, c[1] - r_spot, c[2] - r_spot),
                (c[0] + r_spot, c[1] + r_spot, c[2] + r_spot),
            )
            if sl is None:
                continue
            cx, cy, cz = cv.coords(sl)
            d = np.sqrt((cx - c[0]) ** 2 + (cy - c[1]) ** 2 + (cz - c[2]) ** 2)
            cv.paint(sl, _soft(d - r_spot, vox), 1200.0, HEART)

    # scanner: PSF blur, noise, calibration offset; background stays masked at -1024
    vol = gaussian_filter(
        cv.vol,
        sigma=(scanner.blur_xy, scanner.blur_xy, scanner.blur_z),
        mode="nearest",
        truncate=2.5,
    )
    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(scanner.noise_sd)
    vol += np.float32(scanner.hu_offset)
    np.clip(vol, -1024.0, 3071.0, out=vol)
    out = np.rint(vol).astype(np.int16)
    out[body_w <= 0.02] = int(AIR_HU)
    return out, spacing


@lru_cache(maxsize=16)
def _nifti_header(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> bytes:
    """Return the 352 header bytes (header + empty extension flag) nibabel writes, int16 RAS+."""
    img = nib.Nifti1Image(np.zeros(shape, dtype=np.int16), affine_for(shape, spacing))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    img.header["descrip"] = b"survfuse simulated CTPA"
    raw = img.to_bytes()
    return raw[: raw.__len__() - int(np.prod(shape)) * 2]


def label_nifti_gz_bytes(labels: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    """Deterministic .nii.gz bytes of a uint8 label map (same geometry as `nifti_gz_bytes`)."""
    if labels.dtype != np.uint8 or labels.ndim != 3:
        raise ValueError(f"expected a 3-D uint8 array, got {labels.dtype} {labels.shape}")
    img = nib.Nifti1Image(labels, affine_for(labels.shape, spacing))  # type: ignore[arg-type]
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    img.header["descrip"] = b"survfuse simulated regions"
    return gzip.compress(img.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)


def nifti_bytes(array: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    """Uncompressed .nii bytes: the cached header then the voxels in Fortran order."""
    if array.dtype != np.int16 or array.ndim != 3:
        raise ValueError(f"expected a 3-D int16 array, got {array.dtype} {array.shape}")
    shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
    return _nifti_header(shape, spacing) + array.astype("<i2").tobytes(order="F")


def nifti_gz_bytes(array: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    """Deterministic .nii.gz bytes (RAS+ affine, mm units, gzip mtime 0, no file name)."""
    return gzip.compress(nifti_bytes(array, spacing), compresslevel=GZIP_LEVEL, mtime=0)
