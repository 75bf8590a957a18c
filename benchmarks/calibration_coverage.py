"""Coverage of the calibration intervals on simulated calibrated and miscalibrated predictions.

    .venv/bin/python benchmarks/calibration_coverage.py [--n 500] [--sims 500] [--boot 1000]

Exponential survival with hazard exp(0.8 x) / 500, x ~ N(0, 1), censoring U(0, 1500), horizon
365 days. A model predicts cll_pred = g0 + g1 cll_true (cll = log(-log S(365))): (0, 1) is
calibrated; others are miscalibrated in the large (g0) and in spread (g1). True values: slope
1 / g1; ICI / E50 the mean / median over x of |S_pred - S_true| (2,000,000 draws); intercept
the estimator's limit on 1,000,000 simulated subjects. For each scenario the share of `--sims`
data sets whose 95% interval covers the truth, for `calibration_intervals` (percentile for slope
and intercept; ICI / E50: percentile with the lower end 0 when calibration is not rejected) and,
for ICI, the plain percentile and the bootstrap bias-corrected (basic) intervals.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from survfuse.metrics.bootstrap import Resampler, interval
from survfuse.metrics.calibration_ci import (
    CalibrationIntercept,
    bias_corrected,
    calibration_scorers,
    calibration_test,
    error_interval,
)

LAMBDA, BETA, HORIZON = 1 / 500, 0.8, 365.0
SCENARIOS = [(0.0, 1.0), (0.1, 1.0), (-0.2, 1.2), (0.3, 0.7)]


def simulate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rng.normal(size=n)
    t_event = rng.exponential(1 / (LAMBDA * np.exp(BETA * x)))
    t_cens = rng.uniform(0, 1500, n)
    return np.minimum(t_event, t_cens), t_event <= t_cens, x


def predicted(x: np.ndarray, g0: float, g1: float) -> np.ndarray:
    """S_pred(365 | x) of a model with cll_pred = g0 + g1 cll_true."""
    return np.exp(-np.exp(g0 + g1 * (np.log(LAMBDA * HORIZON) + BETA * x)))


def truths(g0: float, g1: float) -> dict[str, float]:
    x = np.random.default_rng(123).normal(size=2_000_000)
    d = np.abs(predicted(x, g0, g1) - predicted(x, 0.0, 1.0))
    t, e, x1 = simulate(1_000_000, np.random.default_rng(321))
    icpt = CalibrationIntercept(t, e, predicted(x1, g0, g1), HORIZON).point()
    return {"cal_slope": 1 / g1, "cal_intercept": icpt, "ici": d.mean(), "e50": np.median(d)}


def one(n: int, n_boot: int, g0: float, g1: float, seed: int) -> dict[str, tuple[float, ...]]:
    t, e, x = simulate(n, np.random.default_rng(10_000 + seed))
    scorers = calibration_scorers(t, e, predicted(x, g0, g1), HORIZON)
    smooth = scorers["ici"]
    boots: dict[str, list[np.ndarray]] = {k: [] for k in scorers}
    phis = []
    for w in Resampler.build(n, None).weights(n_boot, seed):
        for k, sc in scorers.items():
            boots[k].append(sc.boot(w))
        phis.append(smooth.params(w))
    p_cal = calibration_test(smooth.params(np.ones((1, n)))[0], smooth.phi0, np.concatenate(phis))
    out: dict[str, tuple[float, ...]] = {}
    for k, sc in scorers.items():
        b = np.concatenate(boots[k])
        b = b[np.isfinite(b)]
        est = sc.point()
        if k in ("cal_slope", "cal_intercept"):
            out[k] = (est, *interval(est, b, 0.95, "percentile"))
        else:
            out[k] = (est, *error_interval(est, b, 0.95, p_cal))
            out[k + "_percentile"] = (est, *interval(est, b, 0.95, "percentile"))
            out[k + "_bias_corrected"] = bias_corrected(est, b, 0.95)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--sims", type=int, default=500)
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args()
    print(f"n = {args.n}, {args.sims} simulations, {args.boot} resamples, 95% intervals")
    for g0, g1 in SCENARIOS:
        t0 = time.perf_counter()
        truth = truths(g0, g1)
        hits: dict[str, int] = {}
        inside: dict[str, int] = {}
        for s in range(args.sims):
            for k, (est, lo, hi) in one(args.n, args.boot, g0, g1, s).items():
                tv = truth[k.split("_percentile")[0].split("_bias_corrected")[0]]
                hits[k] = hits.get(k, 0) + int(lo - 1e-12 <= tv <= hi + 1e-12)
                inside[k] = inside.get(k, 0) + int(lo <= est <= hi)
        name = "calibrated" if (g0, g1) == (0.0, 1.0) else "miscalibrated"
        print(f"\ng0 = {g0}, g1 = {g1} ({name}; {time.perf_counter() - t0:.0f} s)")
        for k, h in hits.items():
            base = k.split("_percentile")[0].split("_bias_corrected")[0]
            print(
                f"  {k:26s} truth {truth[base]:8.4f}  coverage {h / args.sims:6.3f}"
                f"  estimate inside {inside[k] / args.sims:6.3f}"
            )


if __name__ == "__main__":
    main()
