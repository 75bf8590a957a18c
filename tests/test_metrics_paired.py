"""Paired IJ tests of correlated C's: R agreement, power and family-wise error under Holm."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from survfuse.metrics import (
    compare,
    compare_concordance,
    concordance_matrix,
    holm,
    holm_family,
    paired_concordance,
    z_test,
)

# R survival::concordance(fit1, fit2, ...) on lung, pbc and gbsg, computed once by
# tests/reference/paired_concordance.R (the R call sits next to its numbers).
PAIRED_R = Path(__file__).resolve().parent / "reference" / "paired_concordance_r.json"


def _cases() -> list[dict]:
    return list(json.loads(PAIRED_R.read_text())["cases"])


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_contrasts_match_r_concordance(case: dict) -> None:
    t = np.array(case["time"], dtype=np.float64)
    e = np.array(case["event"]) == 1
    risks = {m: np.array(r) for m, r in zip(case["models"], case["risk"], strict=True)}
    cm = concordance_matrix(t, e, risks, cluster=case["cluster"])
    np.testing.assert_allclose(cm.estimates, case["concordance"], rtol=0, atol=1e-12)
    v = np.array(case["var"])
    np.testing.assert_allclose(cm.covariance, v, rtol=1e-8, atol=1e-14)
    for c in case["contrasts"]:
        a, b = case["models"][c["a"]], case["models"][c["b"]]
        d, var, z, p = cm.contrast(a, b)
        assert d == pytest.approx(c["difference"], abs=1e-12)
        assert var == pytest.approx(c["variance"], rel=1e-8)
        assert z == pytest.approx(c["z"], rel=1e-8)
        assert p == pytest.approx(c["p"], rel=1e-8, abs=1e-300)
        # the two-model test and the table of tests against a reference are the same test
        two = compare_concordance(t, e, risks[a], risks[b], cluster=case["cluster"])
        assert two.p_value == pytest.approx(c["p"], rel=1e-8, abs=1e-300)
        tab = paired_concordance(t, e, risks, reference=b, cluster=case["cluster"])
        row = tab.filter(tab["model"] == a).row(0, named=True)
        assert row["z"] == pytest.approx(c["z"], rel=1e-8) and row["p_test"] == "ij_z"


def _cohort(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rng.normal(size=n)
    t_event = rng.exponential(np.exp(-x))
    t_cens = rng.exponential(2.0, size=n)
    return np.minimum(t_event, t_cens), t_event <= t_cens, x


def test_truly_better_model_among_17_is_significant_after_holm() -> None:
    # Population C of x + s * noise here: s = 1.2 -> 0.644, s = 0.28 -> 0.724 (+0.08; 200,000
    # simulated subjects). The reference and 16 models have s = 1.2, one has s = 0.28.
    rng = np.random.default_rng(2026)
    t, e, x = _cohort(2000, rng)
    models = {"reference": x + 1.2 * rng.normal(size=x.size)}
    for k in range(16):
        models[f"same_{k}"] = x + 1.2 * rng.normal(size=x.size)
    models["better"] = x + 0.28 * rng.normal(size=x.size)
    cmp = compare(models, t, e, reference="reference", n_boot=200, seed=0)
    tab = cmp.table
    assert tab.height == 17 and (tab["family_size"] == 17).all()
    assert (tab["p_test"] == "ij_z").all()
    better = tab.filter(tab["model"] == "better").row(0, named=True)
    assert 0.05 < better["delta"] < 0.11
    assert better["p_holm"] < 1e-4
    # the bootstrap p-value read off 200 replicates could not go below 2 / 201
    assert better["p_bootstrap"] == pytest.approx(2 / 201)


def test_family_wise_error_under_the_null_with_17_exchangeable_models() -> None:
    n_sims, n, alpha = 600, 1000, 0.05
    rng = np.random.default_rng(19)
    any_reject = 0
    rejections = 0
    for _ in range(n_sims):
        t, e, x = _cohort(n, rng)
        risks = {f"m{k}": x + rng.normal(size=n) for k in range(18)}
        cm = concordance_matrix(t, e, risks)
        p = np.array([cm.contrast(f"m{k}", "m0")[3] for k in range(1, 18)])
        adj, m = holm_family(p, np.ones(17, dtype=bool))
        assert m == 17
        any_reject += int((adj < alpha).any())
        rejections += int((p < alpha).sum())
    fwer = any_reject / n_sims
    per_test = rejections / (17 * n_sims)
    assert fwer <= alpha + 0.02, fwer
    # and the unadjusted test holds its level (it is not conservative by construction)
    assert 0.03 < per_test < 0.07, per_test


def test_z_test_and_holm_family_edges() -> None:
    assert z_test(0.0, 0.0) == (0.0, 0.0, 1.0)
    se, z, p = z_test(0.1, 0.0)
    assert se == 0 and z == np.inf and p == 0.0
    assert np.isnan(z_test(np.nan, 1.0)[2])
    p = np.array([0.01, np.nan, 0.03, 0.2, 0.001])
    fam = np.array([True, True, False, True, True])
    adj, m = holm_family(p, fam)
    assert m == 3 and np.isnan(adj[1]) and np.isnan(adj[2])
    np.testing.assert_allclose(adj[[0, 3, 4]], holm(p[[0, 3, 4]]))


@pytest.mark.slow
def test_paired_reference_json_is_current(tmp_path: Path) -> None:
    """Rerun tests/reference/paired_concordance.R (needs R with the survival package)."""
    rscript = shutil.which("Rscript")
    assert rscript, "Rscript not found: apt-get install -y r-base-core r-cran-survival"
    out = tmp_path / "paired.json"
    subprocess.run(
        [rscript, str(PAIRED_R.with_name("paired_concordance.R")), str(out)],
        cwd=PAIRED_R.parents[2],
        check=True,
        capture_output=True,
        timeout=300,
    )
    new, old = json.loads(out.read_text()), json.loads(PAIRED_R.read_text())
    for a, b in zip(new["cases"], old["cases"], strict=True):
        np.testing.assert_allclose(a["var"], b["var"], rtol=1e-10)
        np.testing.assert_allclose(a["concordance"], b["concordance"], rtol=1e-12)
