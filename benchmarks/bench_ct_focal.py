"""Cost of `ct_radiomics(focal=...)` on a clinical-size CT, against `hyperdensity` on the same ROI.

The focal mass needs a grey opening (separable min / max filters over a box of `focal_size_mm`)
on the region's bounding box; the hyperdensity mass is one pass over the region's voxels. On a
synthetic 512 x 512 x 300 float32 volume at 0.7 x 0.7 x 1.25 mm, for a heart-size and a
lung-size box ROI, prints the median time of each over `--repeats` calls and the ratio.

    .venv/bin/python benchmarks/bench_ct_focal.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from survfuse.encoders.ct_regions import focal_features, focal_footprint, hyperdensity_features

SPACING = (0.7, 0.7, 1.25)
ROIS = {  # name -> (start voxel, size in voxels)
    "heart-size ROI (140 x 140 x 100 mm)": ((150, 150, 100), (200, 200, 80)),
    "lung-size ROI (300 x 250 x 250 mm)": ((40, 80, 50), (430, 360, 200)),
}


def _median_s(fn: Callable[..., object], args: tuple[object, ...], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--focal-size-mm", type=float, default=18.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vol = rng.normal(40.0, 20.0, (512, 512, 300)).astype(np.float32)
    print(f"box {focal_footprint(SPACING, args.focal_size_mm)} voxels; median of {args.repeats}")
    for name, (start, size) in ROIS.items():
        roi = np.zeros(vol.shape, bool)
        roi[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))] = True
        hyper = _median_s(
            hyperdensity_features, (vol, roi, SPACING, [400, 600, 1000]), args.repeats
        )
        focal = _median_s(
            focal_features, (vol, roi, SPACING, [150, 200, 300], args.focal_size_mm), args.repeats
        )
        print(f"{name}: hyperdensity {hyper:.2f} s, focal {focal:.2f} s, ratio {focal / hyper:.1f}")


if __name__ == "__main__":
    main()
