"""Vectorised bootstrap and paired comparison: weighted kernels equal explicit resamples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from survfuse.metrics import (
    Resampler,
    bootstrap,
    brier_score,
    compare,
    concordance_index,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    holm,
    integrated_brier_score,
    make_scorer,
)
from survfuse.metrics.bootstrap import acceleration, interval


def _data(n: int, seed: int, ties: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t = rng.exponential(np.exp(-x)) * 100
    c = rng.exponential(150, n)
    time, event = np.minimum(t, c), t <= c
    if ties:
        time = np.ceil(time / 5) * 5
        x = np.round(x, 1)
    return time, event, x


def _explicit(metric_fn, t, e, pred, w):  # type: ignore[no-untyped-def]
    idx = np.repeat(np.arange(t.shape[0]), w.astype(int))
    return metric_fn(t[idx], e[idx], pred[idx])


def test_weighted_kernels_equal_metrics_on_explicit_resamples() -> None:
    t, e, x = _data(150, 0)
    tr_t, tr_e, _ = _data(300, 1)
    times = np.array([20.0, 50.0, 90.0])
    surv = np.exp(-np.outer(np.exp(x), times / 100))
    kw = dict(train_time=tr_t, train_event=tr_e)
    w = next(Resampler.build(150, None).weights(6, seed=3))
    checks = {
        "harrell_c": (x, None, lambda a, b, r: concordance_index(a, b, r).estimate),
        "uno_c": (
            x,
            None,
            lambda a, b, r: concordance_index_ipcw(a, b, r, tau=80.0, **kw).estimate,
        ),
        "td_auc": (
            x,
            times[1:2],
            lambda a, b, r: cumulative_dynamic_auc(a, b, r, times[1:2], **kw).auc[0],
        ),
        "mean_auc": (
            x,
            times,
            lambda a, b, r: cumulative_dynamic_auc(a, b, r, times, **kw).mean_auc,
        ),
        "brier": (
            surv[:, 1:2],
            times[1:2],
            lambda a, b, s: brier_score(a, b, s, times[1:2], **kw)[0],
        ),
        "ibs": (surv, times, lambda a, b, s: integrated_brier_score(a, b, s, times, **kw)),
    }
    for name, (pred, tm, fn) in checks.items():
        sc = make_scorer(name, t, e, pred, tau=80.0, times=tm, **kw)
        got = sc.boot(w)
        want = [_explicit(fn, t, e, pred, w[b]) for b in range(w.shape[0])]
        np.testing.assert_allclose(got, want, atol=1e-12, err_msg=name)
        assert sc.point() == pytest.approx(fn(t, e, pred), abs=1e-12)


def test_cluster_resampling_keeps_subjects_together() -> None:
    _t, _e, _x = _data(120, 2)
    cluster = np.repeat(np.arange(40), 3)
    res = Resampler.build(120, cluster)
    w = next(res.weights(5, seed=0))
    assert res.n_clusters == 40
    for row in w:
        per_cluster = row.reshape(40, 3)
        assert (per_cluster == per_cluster[:, :1]).all()
        assert per_cluster[:, 0].sum() == 40


def test_ij_influence_matches_numerical_derivative() -> None:
    t, e, x = _data(80, 3)
    tr_t, tr_e, _ = _data(200, 4)
    times = np.array([60.0])
    for name, kw in [("harrell_c", {}), ("uno_c", dict(tau=90.0)), ("td_auc", dict(times=times))]:
        sc = make_scorer(name, t, e, x, train_time=tr_t, train_event=tr_e, **kw)
        infl = sc.influence()
        assert infl is not None
        eps = 1e-6
        w = np.ones((6, 80))
        for k in range(6):
            w[k, 10 * k] += eps
        num = (sc.boot(w) - sc.point()) / eps
        np.testing.assert_allclose(infl[[0, 10, 20, 30, 40, 50]], num, rtol=1e-4, atol=1e-8)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["percentile", "bca"]))
def test_same_seed_bit_identical(seed: int, method: str) -> None:
    t, e, x = _data(60, seed % 97)
    a = bootstrap("harrell_c", t, e, x, n_boot=50, seed=seed, method=method)
    b = bootstrap("harrell_c", t, e, x, n_boot=50, seed=seed, method=method)
    assert a == b
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)


def test_bootstrap_percentile_equals_explicit_loop() -> None:
    t, e, x = _data(200, 5)
    res = Resampler.build(200, None)
    w = np.concatenate(list(res.weights(300, seed=11)))
    reps = np.array(
        [_explicit(lambda a, b, r: concordance_index(a, b, r).estimate, t, e, x, wb) for wb in w]
    )
    out = bootstrap("harrell_c", t, e, x, n_boot=300, seed=11, level=0.9)
    lo, hi = np.quantile(reps, [0.05, 0.95])
    assert (out.ci_low, out.ci_high) == pytest.approx((lo, hi), abs=1e-12)
    assert out.estimate == concordance_index(t, e, x).estimate
    assert out.n_subjects == 200 and out.n_events == int(e.sum()) and out.n_boot == 300
    # a callable metric takes the slow path with the same resamples and gives the same CI
    slow = bootstrap(
        lambda a, b, r: concordance_index(a, b, r).estimate, t, e, x, n_boot=300, seed=11, level=0.9
    )
    assert (slow.ci_low, slow.ci_high) == pytest.approx((lo, hi), abs=1e-12)


def test_bca_uses_ij_acceleration_close_to_jackknife() -> None:
    t, e, x = _data(150, 6)
    sc = make_scorer("harrell_c", t, e, x)
    ij = sc.influence()
    assert ij is not None
    jack = np.array(
        [
            concordance_index(np.delete(t, i), np.delete(e, i), np.delete(x, i)).estimate
            for i in range(150)
        ]
    )
    a_jack = acceleration(jack.mean() - jack)
    assert acceleration(ij) == pytest.approx(a_jack, abs=2e-3)
    # with a = 0 and symmetric replicates BCa reduces to the percentile interval
    reps = np.linspace(-1, 1, 1001)
    assert interval(0.0, reps, 0.9, "bca", 0.0) == pytest.approx(
        interval(0.0, reps, 0.9, "percentile")
    )


def test_compare_table_and_holm() -> None:
    t, e, x = _data(300, 7, ties=False)
    rng = np.random.default_rng(0)
    models = {"ref": x, "noisy": x + rng.normal(size=300), "same": x * 2 + 1, "bad": -x}
    cmp = compare(models, t, e, reference="ref", n_boot=200, seed=3)
    tab = cmp.table
    assert tab["model"].to_list() == ["noisy", "same", "bad"]
    same = tab.filter(tab["model"] == "same")
    assert same["delta"][0] == 0 and same["p_value"][0] == 1.0
    bad = tab.filter(tab["model"] == "bad")
    assert bad["p_value"][0] < 1e-6 and bad["delta_upper"][0] < 0 and bad["p_test"][0] == "ij_z"
    # the p-value read off 200 replicates is floored at 2 / 201; the IJ z-test is not
    assert bad["p_bootstrap"][0] == pytest.approx(2 / 201)
    # same resamples for every model: replicates of a monotone transform are identical
    np.testing.assert_array_equal(cmp.replicates["same"], cmp.replicates["ref"])
    assert [r.name for r in cmp.results] == [f"harrell_c[{k}]" for k in models]
    # Holm by its definition
    p = np.array([0.01, 0.04, 0.03, 0.2])
    m = len(p)
    srt = np.sort(p)
    adj_sorted = np.minimum(1, np.maximum.accumulate([(m - k) * srt[k] for k in range(m)]))
    np.testing.assert_allclose(np.sort(holm(p)), adj_sorted)
    np.testing.assert_allclose(tab["p_holm"].to_numpy(), holm(tab["p_value"].to_numpy()))
    assert (tab["family_size"] == 3).all()
    # a metric without an influence function is tested with the bootstrap SD of the difference
    auc = compare(
        models,
        t,
        e,
        reference="ref",
        metric="mean_auc",
        n_boot=100,
        seed=3,
        train_time=t,
        train_event=e,
        times=np.quantile(t, [0.3, 0.6]),
    ).table
    assert (auc["p_test"] == "bootstrap_z").all()
    bad_auc = auc.filter(auc["model"] == "bad").row(0, named=True)
    assert bad_auc["std_error"] > 0 and bad_auc["p_value"] < 1e-6


def test_bootstrap_many_models_and_bad_options() -> None:
    t, e, x = _data(100, 8)
    out = bootstrap("harrell_c", t, e, {"a": x, "b": -x}, n_boot=20, seed=0)
    assert [r.name for r in out] == ["harrell_c[a]", "harrell_c[b]"]
    with pytest.raises(ValueError, match="did you mean"):
        bootstrap("harell_c", t, e, x, n_boot=20)
    with pytest.raises(ValueError, match="train_time"):
        bootstrap("uno_c", t, e, x, n_boot=20)
    with pytest.raises(ValueError, match="reference"):
        compare({"a": x, "b": x}, t, e, reference="c")
    with pytest.raises(ValueError, match="cluster"):
        bootstrap("harrell_c", t, e, x, n_boot=20, cluster=np.arange(5))
