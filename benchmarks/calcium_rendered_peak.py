"""How bright the simulator renders coronary calcium on each site's scanner (generative model).

For each site of `survfuse simulate` at site shift 1 and 2, renders the same anatomy with and
without a calcium volume (150, 500, 3,000 mm^3) on that site's scanner with noise and HU offset
switched off, over 20 placements, and prints the median largest excess HU of the calcium and the
median brightest calcium voxel. Contrast-filled blood is 240 HU (LV) and 330 HU (RV): where the
calcium voxel is not brighter than that, no intensity threshold separates calcium from blood.

    .venv/bin/python benchmarks/calcium_rendered_peak.py
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from survfuse.simulate.cohort import site_properties
from survfuse.simulate.ct import Scanner, render_ct

anat = dict(
    body_scale=1.0, age=65.0, emphysema=0.05, rv_lv=1.0, clot=0.0, heart_dx=0.0, heart_dy=0.0
)
for d in (1.0, 2.0):
    props = site_properties(("A", "B", "C"), ("C",), d)
    for site, p in props.items():
        sc = replace(Scanner(**p["scanner"]), noise_sd=0.0, hu_offset=0.0)
        row = []
        for ca in (150.0, 500.0, 3000.0):
            peaks = []
            for seed in range(20):
                a, _ = render_ct(
                    {**anat, "calcium_mm3": ca}, (64, 64, 40), sc, np.random.default_rng(seed)
                )
                b, _ = render_ct(
                    {**anat, "calcium_mm3": 0.0}, (64, 64, 40), sc, np.random.default_rng(seed)
                )
                diff = a.astype(float) - b.astype(float)
                peaks.append((diff.max(), a[diff > 50].max() if (diff > 50).any() else np.nan))
            pk = np.array(peaks)
            row.append(
                f"{ca:>5.0f} mm3: excess {np.median(pk[:, 0]):5.0f} HU, voxel {np.nanmedian(pk[:, 1]):5.0f} HU"
            )
        print(
            f"shift {d:g} site {site} ({'ext' if p['external'] else 'dev'}; noise {p['scanner']['noise_sd']:.0f}, blur {p['scanner']['blur_xy']:.2f}/{p['scanner']['blur_z']:.2f}, scale {p['scanner']['spacing_scale']:.2f}): "
            + "; ".join(row)
        )
