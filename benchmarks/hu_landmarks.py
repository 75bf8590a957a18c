"""How well does the lung-peak HU landmark recover each simulated site's scanner offset?

The calibration itself is a preprocessing option of the CT pipeline
(`CTPreprocessing.hu_calibration: landmarks`, `survfuse.data.hu_calibration`; compare studies with
`benchmarks/external_sites.py --hu-calibration none,landmarks`). This script reads every CT of
simulated folders (`survfuse simulate` layout) as stored, estimates the landmark shift
(`lung_peak_landmark`, each volume alone) and prints per folder and site: the simulator's true
HU offset (dataset.json), the mean, sd and mean absolute error of the estimated shift, and how many
volumes fell back (no trustworthy landmark: calibrated by 0).

    .venv/bin/python benchmarks/hu_landmarks.py SIM_FOLDER [SIM_FOLDER ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from survfuse.data.hu_calibration import lung_peak_landmark
from survfuse.data.imaging import CTPreprocessing, read_ct_hu


def site_shifts(folder: Path) -> pl.DataFrame:
    """One row per CT of `folder`: site, true offset, estimated shift (null = fallback)."""
    floor = CTPreprocessing().floor_hu
    sites = json.loads((folder / "dataset.json").read_text())["sites"]
    index = pl.read_parquet(folder / "ct_index.parquet").join(
        pl.read_parquet(folder / "cohort.parquet").select("subject_id", "site").unique(),
        on="subject_id",
    )
    rows = []
    for rel, site in index.select("path", "site").iter_rows():
        path = Path(rel) if Path(rel).is_absolute() else folder / rel
        arr, _, _ = read_ct_hu(path)
        mark = lung_peak_landmark(arr, floor)
        rows.append(
            {
                "site": site,
                "true_offset": float(sites[site]["scanner"]["hu_offset"]),
                "shift": mark.shift,
            }
        )
    return pl.DataFrame(
        rows, schema={"site": pl.String, "true_offset": pl.Float64, "shift": pl.Float64}
    )


def main() -> None:
    for folder in (Path(a) for a in sys.argv[1:]):
        t = site_shifts(folder)
        err = (pl.col("shift") - pl.col("true_offset")).abs()
        table = (
            t.group_by("site")
            .agg(
                pl.len().alias("volumes"),
                pl.col("true_offset").first(),
                pl.col("shift").mean().alias("mean_shift"),
                pl.col("shift").std().alias("sd_shift"),
                err.mean().alias("mean_abs_error"),
                pl.col("shift").is_null().sum().alias("fallbacks"),
            )
            .sort("site")
        )
        print(folder.name)
        with pl.Config(float_precision=1, tbl_hide_dataframe_shape=True):
            print(table)
        print(f"  landmark estimates: {np.isfinite(t['shift'].drop_nulls().to_numpy()).all()}")


if __name__ == "__main__":
    main()
