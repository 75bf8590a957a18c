"""Per-site harmonisation of encoder outputs: remove scanner / coding offsets between sites.

Each site's features are adjusted with location/scale estimates computed from that site's
feature values only: never outcomes, splits or labels. Rows whose modality is missing
(`present=False`) and padded tokens (`mask=False`) are neither used nor changed. Features are
adjusted column by column: the pooled vector, and each token position's dense features.

Methods (`HARMONISE_METHODS`), for a feature column x, site s with n_s rows:

- `none`: features as encoded.
- `site_standardise`: x' = (x - m_s) / sd_s, the site's mean and standard deviation (ddof 0);
  a column constant within a site becomes x - m_s.
- `combat`: the empirical-Bayes location/scale model of Johnson, Li & Rabinovic (2007) as in
  neuroCombat (Fortin et al. 2018), without covariates. With grand mean m, pooled variance
  v = mean_i (x_i - m_{s(i)})^2 and z = (x - m) / sqrt(v): gamma_s = mean_s z, delta_s =
  var_s z (ddof 1) are shrunk to gamma*_s, delta*_s with normal / inverse-gamma priors fitted
  across the columns of a block (the pooled vector, or one token position), and
  x' = (z - gamma*_s) / sqrt(delta*_s) * sqrt(v) + m. Columns with v = 0 are left as they are.

Reference (`reference_sites`, config `reference: development`): the rows of the reference
sites (the development sites) are left exactly as encoded and every other site is mapped onto
them: `site_standardise` gives x' = (x - m_s) / sd_s * sd_ref + m_ref, `combat` uses m = m_ref
and v = the reference rows' variance (neuroCombat's `ref_batch`, with the development sites as
one batch). Training and internal-test features are then unchanged; only external sites move.
With `reference: all` every site is adjusted as above.

Transductive: when the cohort contains an external site, that site's (unlabelled) features
determine its own adjustment, so the external evaluation uses the external site's feature
distribution. `HarmoniseConfig.transductive` says so for a run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from survfuse.features import Modality, ModalityFeatures
from survfuse.registry import look_up_option

__all__ = [
    "DEFAULT_HARMONISE",
    "HARMONISE_METHODS",
    "HarmoniseConfig",
    "combat",
    "harmonise_features",
    "site_standardise",
]

HARMONISE_METHODS = ("none", "site_standardise", "combat")
#: Defaults chosen by measurement (docs/benchmarks.md, "External sites"): harmonisation raised
#: the external CT-only C a little but left the best model's external C within noise, and
#: it makes the external evaluation transductive, so it is opt-in; with `reference: all` the
#: development sites move too and the internal-test CT-only C fell, hence `development`.
DEFAULT_HARMONISE = "none"
DEFAULT_REFERENCE: Literal["development", "all"] = "development"
_CONV = 1e-4  # relative change at which the EB iteration stops (neuroCombat's value)


class HarmoniseConfig(BaseModel):
    """`harmonise:` of an experiment config: the method and the modalities it adjusts."""

    model_config = ConfigDict(extra="forbid")

    method: str = DEFAULT_HARMONISE
    modalities: list[Modality] = Field(default_factory=lambda: list[Modality](["ct"]))
    # "development": development sites are the reference (unchanged); "all": every site moves
    reference: Literal["development", "all"] = DEFAULT_REFERENCE

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return look_up_option(v, HARMONISE_METHODS, kind="harmonise method")

    def applies(self, modality: str) -> bool:
        return self.method != "none" and modality in self.modalities

    def transductive(self, external_sites: list[str]) -> bool:
        """Return True when the external sites' own (unlabelled) features set their adjustment.

        That is when harmonisation is on and the cohort holds external sites.
        """
        return self.method != "none" and bool(external_sites)


def _site_codes(site: ArrayLike, n: int) -> tuple[NDArray[np.int64], list[str]]:
    s = np.asarray(site).astype(str).reshape(-1)
    if s.shape[0] != n:
        raise ValueError(f"harmonise: {s.shape[0]} site labels for {n} feature rows")
    names, codes = np.unique(s, return_inverse=True)
    return codes.astype(np.int64), [str(v) for v in names]


def _rows(use: ArrayLike | None, n: int) -> NDArray[np.bool_]:
    return np.ones(n, bool) if use is None else np.asarray(use, dtype=bool).reshape(-1)


def _check_sites(codes: NDArray[np.int64], names: list[str], used: NDArray[np.bool_]) -> None:
    counts = np.bincount(codes[used], minlength=len(names))
    for name, k in zip(names, counts, strict=True):
        if 0 < k < 2:
            raise ValueError(f"harmonise: site {name!r} has {k} usable row; at least 2 are needed")


def _reference(
    codes: NDArray[np.int64],
    names: list[str],
    used: NDArray[np.bool_],
    reference_sites: list[str] | None,
) -> tuple[NDArray[np.bool_], list[int]]:
    """Rows of the reference sites among `used`, and the codes of the sites to adjust."""
    ref_codes = [names.index(s) for s in reference_sites or () if s in names]
    ref = used & np.isin(codes, ref_codes)
    if reference_sites is not None and not ref.any():
        raise ValueError(f"harmonise: no usable row of the reference sites {reference_sites}")
    todo = [k for k in range(len(names)) if k not in ref_codes and (used & (codes == k)).any()]
    return ref, todo


def site_standardise(
    x: ArrayLike,
    site: ArrayLike,
    use: ArrayLike | None = None,
    *,
    reference_sites: list[str] | None = None,
) -> NDArray[np.float64]:
    """Standardise x [N, D] per site.

    x' = (x - mean_s) / sd_s over the rows `use` [N] (default all) of each site s, or onto the
    reference sites' pooled rows, x' = (x - mean_s) / sd_s * sd_ref + mean_ref (reference rows
    unchanged). Rows not in `use` are returned unchanged.
    """
    a = np.array(x, dtype=np.float64, copy=True)
    codes, names = _site_codes(site, a.shape[0])
    used = _rows(use, a.shape[0])
    _check_sites(codes, names, used)
    ref, todo = _reference(codes, names, used, reference_sites)
    m_ref, sd_ref = (a[ref].mean(axis=0), a[ref].std(axis=0)) if ref.any() else (0.0, 1.0)
    for k in todo:
        rows = used & (codes == k)
        m = a[rows].mean(axis=0)
        sd = a[rows].std(axis=0)
        a[rows] = (a[rows] - m) / np.where(sd > 0, sd, 1.0) * sd_ref + m_ref
    return a


def _postmean(g_hat: Any, g_bar: float, n: Any, d_star: Any, t2: float) -> Any:
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _postvar(sum2: Any, n: Any, a: float, b: float) -> Any:
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def _eb(
    z: NDArray[np.float64], g_hat: NDArray[np.float64], d_hat: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Parametric EB shrinkage of one site's gamma/delta over the columns of z [n_s, P]."""
    p = g_hat.shape[0]
    m, s2 = float(d_hat.mean()), float(d_hat.var(ddof=1)) if p > 1 else 0.0
    t2 = float(g_hat.var(ddof=1)) if p > 1 else 0.0
    if not (s2 > 0 and t2 > 0):  # no spread across columns to fit a prior: plain estimates
        return g_hat, d_hat
    a_prior = (2 * s2 + m**2) / s2
    b_prior = (m * s2 + m**3) / s2
    g_bar = float(g_hat.mean())
    n = float(z.shape[0])
    g_old, d_old = g_hat.copy(), d_hat.copy()
    for _ in range(1000):
        g_new = _postmean(g_hat, g_bar, n, d_old, t2)
        sum2 = ((z - g_new[None, :]) ** 2).sum(axis=0)
        d_new = _postvar(sum2, n, a_prior, b_prior)
        with np.errstate(divide="ignore", invalid="ignore"):
            dg = np.abs(g_new - g_old) / np.abs(g_old)
            dd = np.abs(d_new - d_old) / np.abs(d_old)
        change = max(float(np.nanmax(dg, initial=0.0)), float(np.nanmax(dd, initial=0.0)))
        g_old, d_old = g_new, d_new
        if change <= _CONV:
            break
    return g_old, d_old


def combat(
    x: ArrayLike,
    site: ArrayLike,
    use: ArrayLike | None = None,
    *,
    eb: bool = True,
    reference_sites: list[str] | None = None,
) -> NDArray[np.float64]:
    """Harmonise x [N, D] with ComBat location/scale (module docstring).

    Fitted over the rows `use` [N] (default all); other rows, the reference sites' rows and
    zero-variance columns are returned unchanged. `eb=False` uses the per-site estimates without
    shrinkage.
    """
    a = np.array(x, dtype=np.float64, copy=True)
    codes, names = _site_codes(site, a.shape[0])
    used = _rows(use, a.shape[0])
    _check_sites(codes, names, used)
    if not used.any():
        return a
    ref, todo = _reference(codes, names, used, reference_sites)
    if ref.any():
        grand = a[ref].mean(axis=0)
        var = a[ref].var(axis=0)
    else:
        xs, cs = a[used], codes[used]
        means = np.stack(
            [xs[cs == k].mean(axis=0) if (cs == k).any() else xs[0] for k in range(len(names))]
        )
        grand = xs.mean(axis=0)  # = sum_s n_s/n mean_s (neuroCombat's, without covariates)
        var = ((xs - means[cs]) ** 2).mean(axis=0)
    cols = var > 0
    if not cols.any():
        return a
    sd = np.sqrt(var[cols])
    for k in todo:
        rows = used & (codes == k)
        zk = (a[rows][:, cols] - grand[cols]) / sd
        g_hat = zk.mean(axis=0)
        d_hat = zk.var(axis=0, ddof=1)
        d_hat[d_hat == 0] = 1.0
        g, d = _eb(zk, g_hat, d_hat) if eb else (g_hat, d_hat)
        block = a[rows]
        block[:, cols] = (zk - g) / np.sqrt(d) * sd + grand[cols]
        a[rows] = block
    return a


_METHODS = {"site_standardise": site_standardise, "combat": combat}


def harmonise_features(
    feats: ModalityFeatures,
    site: ArrayLike,
    method: str,
    *,
    reference_sites: list[str] | None = None,
) -> ModalityFeatures:
    """`feats` with pooled and dense token features harmonised across `site` [N] by `method`.

    Uses only the feature values (present rows; real tokens). Sparse code tokens are kept as
    they are. `reference_sites`: see the module docstring. `meta["harmonise"]` records the
    method, the reference sites and each site's number of rows used.
    """
    method = look_up_option(method, HARMONISE_METHODS, kind="harmonise method")
    if method == "none":
        return feats
    method_fn = _METHODS[method]

    def fn(x: Any, site: Any, use: Any) -> NDArray[np.float64]:
        return method_fn(x, site, use, reference_sites=reference_sites)

    present = np.asarray(feats.present, dtype=bool)
    codes, names = _site_codes(site, len(feats))
    pooled = fn(feats.pooled, site, present).astype(np.float32)
    tokens = None
    if feats.tokens is not None:
        mask = np.asarray(feats.mask, dtype=bool)
        tokens = np.array(feats.tokens, dtype=np.float32, copy=True)
        for t in range(tokens.shape[1]):
            rows = present & mask[:, t]
            tokens[:, t, :] = fn(tokens[:, t, :], site, rows).astype(np.float32)
    counts = np.bincount(codes[present], minlength=len(names))
    meta = {
        **feats.meta,
        "harmonise": {
            "method": method,
            "reference_sites": reference_sites,
            "rows_per_site": {n: int(c) for n, c in zip(names, counts, strict=True)},
        },
    }
    return replace(feats, pooled=pooled, tokens=tokens, meta=meta)
