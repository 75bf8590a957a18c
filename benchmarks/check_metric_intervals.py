"""Count the intervals of a run's metrics.parquet that exclude their own estimate.

    .venv/bin/python benchmarks/check_metric_intervals.py RUN_DIR

Prints, per metric, how many rows have an estimate outside [lower, upper] (rows without an
interval are skipped), the comparisons' p-value tests and the Holm family size. Exits 1 when a
calibration interval (slope, intercept, ICI, E50, or the grouped error of older runs) excludes
its estimate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

CALIBRATION = ("cal_slope", "cal_intercept", "ici", "e50", "calibration")


def main(run_dir: str) -> int:
    m = pl.read_parquet(Path(run_dir) / "metrics.parquet")
    rows = m.filter(pl.col("lower").is_not_nan() & pl.col("upper").is_not_nan())
    out = rows.with_columns(
        ((pl.col("estimate") < pl.col("lower")) | (pl.col("estimate") > pl.col("upper"))).alias(
            "excludes"
        )
    )
    summary = (
        out.group_by("metric", maintain_order=True)
        .agg(pl.len().alias("intervals"), pl.col("excludes").sum().alias("excluding estimate"))
        .sort("metric")
    )
    with pl.Config(tbl_rows=50):
        print(summary)
    if "p_test" in m.columns:
        tests = m.filter(pl.col("p_test").is_not_null()).group_by("metric", "p_test").len()
        print(tests.sort("metric"))
        fam = m.filter(pl.col("in_family"))
        print(
            f"Holm family: {fam.height} comparisons (family_size {fam['family_size'].max()}), "
            f"splits {sorted(set(fam['split']))}, metrics {sorted(set(fam['metric']))}; "
            f"smallest Holm p {fam['p_holm'].min()}"
        )
    bad = out.filter(pl.col("metric").is_in(CALIBRATION) & pl.col("excludes"))
    print(f"calibration intervals excluding their estimate: {bad.height}")
    return 1 if bad.height else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
