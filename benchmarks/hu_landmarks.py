"""Experiment: CT intensity calibration by an HU landmark before encoding.

Copies a simulated folder (`survfuse simulate` layout) with every CT shifted so that its lung
parenchyma peak sits at -850 HU: the mode of the in-body voxels in [-1000, -600) HU (4 HU bins,
Gaussian-smoothed with sd 3 bins) is the landmark, and the in-body voxels move by
-850 - mode. It uses each volume alone (no site label, no outcome), so it is not transductive.
Then run `benchmarks/external_sites.py --out OUT` on the copy (same folder name under
OUT/data/) to compare with the uncalibrated run.

    .venv/bin/python benchmarks/hu_landmarks.py SIM_FOLDER OUT/data/NAME

Prints the mean and sd of the applied shift per site (the simulator's true offsets are in
SIM_FOLDER/dataset.json).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

LUNG_HU = -850.0
BINS = np.arange(-1000.0, -599.0, 4.0)
KERNEL = np.exp(-0.5 * (np.arange(-6, 7) / 3.0) ** 2)


def lung_offset(volume: np.ndarray) -> float:
    """Mode of in-body voxels in [-1000, -600) HU minus -850 (the shift to remove)."""
    vals = volume[(volume > -1000) & (volume < -600)]
    hist, edges = np.histogram(vals, bins=BINS)
    smooth = np.convolve(hist, KERNEL / KERNEL.sum(), mode="same")
    centres = (edges[:-1] + edges[1:]) / 2
    return float(centres[int(np.argmax(smooth))] - LUNG_HU)


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("cohort.parquet", "oracle.parquet", "dataset.json", "ct_index.parquet"):
        shutil.copy(src / name, dst / name)
    if not (dst / "meds").exists():
        shutil.copytree(src / "meds", dst / "meds")
    index = pl.read_parquet(src / "ct_index.parquet")
    shifts = []
    for rel in index["path"].to_list():
        img = nib.load(src / rel)
        vol = np.asarray(img.dataobj).astype(np.float32)
        body = vol > -1000  # the simulator exports outside-body voxels as -1024
        off = lung_offset(vol)
        vol[body] -= off
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        out = np.rint(np.clip(vol, -1024, 3071)).astype(np.int16)
        nib.save(nib.Nifti1Image(out, img.affine), dst / rel)
        shifts.append(off)
    sites = pl.read_parquet(src / "cohort.parquet").select("subject_id", "site")
    table = pl.DataFrame({"subject_id": index["subject_id"], "shift": shifts}).join(
        sites, on="subject_id"
    )
    print(
        table.group_by("site")
        .agg(pl.col("shift").mean().alias("mean"), pl.col("shift").std().alias("sd"))
        .sort("site")
    )


if __name__ == "__main__":
    main()
