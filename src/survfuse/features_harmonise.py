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

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from survfuse.features import Modality, ModalityFeatures
from survfuse.registry import look_up_option

__all__ = [
    "DEFAULT_HARMONISE",
    "HARMONISE_METHODS",
    "FeatureMaps",
    "HarmoniseConfig",
    "SiteMaps",
    "combat",
    "fit_combat",
    "fit_feature_maps",
    "fit_site_standardise",
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


def _prepare(
    x: ArrayLike, site: ArrayLike, use: ArrayLike | None
) -> tuple[NDArray[np.float64], NDArray[np.int64], list[str], NDArray[np.bool_]]:
    """Return x as float64 [N, D], site codes [N], site names and the rows used [N]."""
    a = np.asarray(x, dtype=np.float64)
    codes, names = _site_codes(site, a.shape[0])
    used = _rows(use, a.shape[0])
    _check_sites(codes, names, used)
    return a, codes, names, used


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


@dataclass(frozen=True)
class SiteMaps:
    """Per-site, per-column affine maps x' = x * scale + shift of one feature block [N, D].

    `sites`: site -> (scale [D], shift [D]) for every adjusted site (reference sites and
    unknown sites are absent: reference rows stay as encoded). `method`, `eb` and the reference
    statistics (`ref_mean` [D], `ref_scale` [D]: the reference sd for `site_standardise`, the
    pooled sd of `combat`; `ref_cols` [D] the columns `combat` adjusts) let `fit_new_site`
    map a site that was not in the data the maps were fitted on.
    """

    method: str
    sites: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]]
    ref_mean: NDArray[np.float64]
    ref_scale: NDArray[np.float64]
    ref_cols: NDArray[np.bool_]
    eb: bool = True

    def apply(self, x: ArrayLike, site: ArrayLike, use: ArrayLike | None = None) -> NDArray:
        """X [N, D] with each mapped site's rows among `use` mapped (other rows unchanged)."""
        a = np.array(x, dtype=np.float64, copy=True)
        s = np.asarray(site).astype(str).reshape(-1)
        used = _rows(use, a.shape[0])
        for name, (scale, shift) in self.sites.items():
            rows = used & (s == name)
            a[rows] = a[rows] * scale + shift
        return a

    def fit_new_site(self, x_site: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(scale, shift) of a site from its own rows x_site [n, D], onto the same reference."""
        xs = np.asarray(x_site, dtype=np.float64)
        if xs.shape[0] < 2:
            raise ValueError(f"harmonise: a site needs at least 2 usable rows, got {xs.shape[0]}")
        if self.method == "site_standardise":
            return _standardise_map(xs, self.ref_mean, self.ref_scale)
        return _combat_map(xs, self.ref_mean, self.ref_scale, self.ref_cols, self.eb)


def _standardise_map(
    xs: NDArray[np.float64], m_ref: NDArray[np.float64], sd_ref: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    m, sd = xs.mean(axis=0), xs.std(axis=0)
    scale = sd_ref / np.where(sd > 0, sd, 1.0)
    return scale, m_ref - m * scale


def fit_site_standardise(
    x: ArrayLike,
    site: ArrayLike,
    use: ArrayLike | None = None,
    *,
    reference_sites: list[str] | None = None,
) -> SiteMaps:
    """Fit the maps of `site_standardise` on the rows `use` of each site."""
    a, codes, names, used = _prepare(x, site, use)
    ref, todo = _reference(codes, names, used, reference_sites)
    d = a.shape[1]
    m_ref, sd_ref = np.zeros(d), np.ones(d)
    if ref.any():
        m_ref, sd_ref = a[ref].mean(axis=0), a[ref].std(axis=0)
    maps = {names[k]: _standardise_map(a[used & (codes == k)], m_ref, sd_ref) for k in todo}
    return SiteMaps("site_standardise", maps, m_ref, sd_ref, np.ones(d, bool))


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
    maps = fit_site_standardise(x, site, use, reference_sites=reference_sites)
    return maps.apply(x, site, use)


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


def _combat_map(
    xs: NDArray[np.float64],
    grand: NDArray[np.float64],
    sd: NDArray[np.float64],
    cols: NDArray[np.bool_],
    eb: bool,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(scale, shift) of one site: x' = (z - gamma*) / sqrt(delta*) * sd + grand on `cols`."""
    d = xs.shape[1]
    scale, shift = np.ones(d), np.zeros(d)
    if not cols.any():
        return scale, shift
    zk = (xs[:, cols] - grand[cols]) / sd[cols]
    g_hat = zk.mean(axis=0)
    d_hat = zk.var(axis=0, ddof=1)
    d_hat[d_hat == 0] = 1.0
    g, dd = _eb(zk, g_hat, d_hat) if eb else (g_hat, d_hat)
    root = np.sqrt(dd)
    scale[cols] = 1.0 / root
    shift[cols] = grand[cols] - (grand[cols] / sd[cols] + g) / root * sd[cols]
    return scale, shift


def fit_combat(
    x: ArrayLike,
    site: ArrayLike,
    use: ArrayLike | None = None,
    *,
    eb: bool = True,
    reference_sites: list[str] | None = None,
) -> SiteMaps:
    """Fit the maps of `combat` on the rows `use`."""
    a, codes, names, used = _prepare(x, site, use)
    d = a.shape[1]
    if not used.any():
        return SiteMaps("combat", {}, np.zeros(d), np.ones(d), np.zeros(d, bool), eb)
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
    sd = np.where(cols, np.sqrt(var), 1.0)
    maps = {names[k]: _combat_map(a[used & (codes == k)], grand, sd, cols, eb) for k in todo}
    return SiteMaps("combat", maps, grand, sd, cols, eb)


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
    maps = fit_combat(x, site, use, eb=eb, reference_sites=reference_sites)
    return maps.apply(x, site, use)


_FITS = {"site_standardise": fit_site_standardise, "combat": fit_combat}


@dataclass(frozen=True)
class FeatureMaps:
    """The fitted harmonisation of a modality's features.

    `pooled` maps and one per token position (`tokens`, empty without dense tokens); saved
    beside the harmonised features so that `survfuse predict` maps new patients exactly as the
    run mapped its cohort.
    """

    method: str
    reference_sites: list[str] | None
    pooled: SiteMaps
    tokens: list[SiteMaps]

    def apply(self, feats: ModalityFeatures, site: ArrayLike) -> ModalityFeatures:
        """`feats` with every mapped site's present rows (and real tokens) mapped."""
        blocks = _blocks(feats)
        if len(blocks) != 1 + len(self.tokens):
            raise ValueError(
                f"harmonise: maps for {len(self.tokens)} token positions, features have "
                f"{len(blocks) - 1}"
            )
        mapped = [
            maps.apply(x, site, use).astype(np.float32)
            for maps, (x, use) in zip([self.pooled, *self.tokens], blocks, strict=True)
        ]
        tokens = None
        if feats.tokens is not None:
            tokens = np.stack(mapped[1:], axis=1) if mapped[1:] else feats.tokens.copy()
        return replace(feats, pooled=mapped[0], tokens=tokens)

    def with_new_sites(
        self, feats: ModalityFeatures, site: ArrayLike, *, min_rows: int = 2
    ) -> FeatureMaps:
        """Return these maps plus one for each new site of `site` [N], fitted on its own rows.

        A new site is neither mapped nor a reference site; its map uses its unlabelled features
        in `feats` only (at least `min_rows` present rows, else ValueError naming the site).
        """
        s = np.asarray(site).astype(str).reshape(-1)
        known = set(self.pooled.sites) | set(self.reference_sites or ())
        new = sorted(set(s.tolist()) - known)
        if not new:
            return self
        present = np.asarray(feats.present, dtype=bool)
        for name in new:
            k = int((present & (s == name)).sum())
            if 0 < k < min_rows:
                raise ValueError(
                    f"harmonise: site {name!r} has no map of its own; one is fitted on its "
                    f"{k} rows with features, at least {min_rows} are needed"
                )

        def extend(maps: SiteMaps, x: NDArray[Any], use: NDArray[np.bool_]) -> SiteMaps:
            sites = dict(maps.sites)
            for name in new:
                rows = use & (s == name)
                if rows.any():
                    sites[name] = maps.fit_new_site(x[rows])
            return replace(maps, sites=sites)

        pooled, *tokens = (
            extend(maps, x, use)
            for maps, (x, use) in zip([self.pooled, *self.tokens], _blocks(feats), strict=True)
        )
        return replace(self, pooled=pooled, tokens=tokens)

    def save(self, path: str | Path) -> None:
        """Write the maps as one .npz file (arrays only; no pickle)."""
        arrays: dict[str, NDArray[Any]] = {}
        blocks: list[dict[str, Any]] = []
        head = {"method": self.method, "reference_sites": self.reference_sites, "blocks": blocks}
        for b, maps in enumerate([self.pooled, *self.tokens]):
            blocks.append({"sites": list(maps.sites), "eb": maps.eb})
            arrays[f"{b}/ref_mean"], arrays[f"{b}/ref_scale"] = maps.ref_mean, maps.ref_scale
            arrays[f"{b}/ref_cols"] = maps.ref_cols
            for i, (scale, shift) in enumerate(maps.sites.values()):
                arrays[f"{b}/{i}/scale"], arrays[f"{b}/{i}/shift"] = scale, shift
        arrays["header"] = np.frombuffer(json.dumps(head).encode(), dtype=np.uint8)
        target = Path(path)
        tmp = target.with_name(f"{target.stem}.tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(target)  # atomic: a crash leaves no half-written maps

    @classmethod
    def load(cls, path: str | Path) -> FeatureMaps:
        with np.load(path, allow_pickle=False) as z:
            head = json.loads(z["header"].tobytes().decode())
            blocks = []
            for b, block in enumerate(head["blocks"]):
                sites = {
                    name: (z[f"{b}/{i}/scale"], z[f"{b}/{i}/shift"])
                    for i, name in enumerate(block["sites"])
                }
                blocks.append(
                    SiteMaps(
                        head["method"], sites, z[f"{b}/ref_mean"], z[f"{b}/ref_scale"],
                        z[f"{b}/ref_cols"], bool(block["eb"]),
                    )
                )  # fmt: skip
        return cls(head["method"], head["reference_sites"], blocks[0], blocks[1:])


def fit_feature_maps(
    feats: ModalityFeatures,
    site: ArrayLike,
    method: str,
    *,
    reference_sites: list[str] | None = None,
) -> FeatureMaps:
    """Fit `method` on the present rows (and real tokens) of `feats` across `site` [N]."""
    method = look_up_option(method, HARMONISE_METHODS[1:], kind="harmonise method")
    fit = _FITS[method]
    pooled, *tokens = (
        fit(x, site, use, reference_sites=reference_sites) for x, use in _blocks(feats)
    )
    return FeatureMaps(method, reference_sites, pooled, tokens)


def _blocks(feats: ModalityFeatures) -> list[tuple[NDArray[Any], NDArray[np.bool_]]]:
    """Return (values [N, D], rows to use [N]) of each harmonised block.

    The pooled vector (present rows), then each dense token position (present rows whose token
    is real).
    """
    present = np.asarray(feats.present, dtype=bool)
    blocks = [(np.asarray(feats.pooled), present)]
    if feats.tokens is not None:
        mask = np.asarray(feats.mask, dtype=bool)
        tokens = np.asarray(feats.tokens)
        blocks += [(tokens[:, t, :], present & mask[:, t]) for t in range(tokens.shape[1])]
    return blocks


def harmonise_features(
    feats: ModalityFeatures,
    site: ArrayLike,
    method: str,
    *,
    reference_sites: list[str] | None = None,
    maps: FeatureMaps | None = None,
) -> ModalityFeatures:
    """`feats` with pooled and dense token features harmonised across `site` [N] by `method`.

    Uses only the feature values (present rows; real tokens). Sparse code tokens are kept as
    they are. `reference_sites`: see the module docstring. `maps`: apply these fitted maps
    (`fit_feature_maps`) instead of fitting on `feats`. `meta["harmonise"]` records the method,
    the reference sites and each site's number of rows used.
    """
    method = look_up_option(method, HARMONISE_METHODS, kind="harmonise method")
    if method == "none":
        return feats
    if maps is None:
        maps = fit_feature_maps(feats, site, method, reference_sites=reference_sites)
    present = np.asarray(feats.present, dtype=bool)
    codes, names = _site_codes(site, len(feats))
    counts = np.bincount(codes[present], minlength=len(names))
    meta = {
        **feats.meta,
        "harmonise": {
            "method": method,
            "reference_sites": reference_sites,
            "rows_per_site": {n: int(c) for n, c in zip(names, counts, strict=True)},
        },
    }
    return replace(maps.apply(feats, site), meta=meta)
