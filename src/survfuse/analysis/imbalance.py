"""Modality contributions of a trained two-modality survival model, with bootstrap CIs.

For one split (N subjects) and a model `f` with `predict_risk(features)`:

- ablation: C(S) = Harrell's C of f's risk when only the modalities in S are present at test time
  (the others masked as missing: present=False, token mask False, tokens/pooled zero, codes -1;
  what a patient without that modality looks like to the fusion model);
- exact two-player Shapley values of the game v(S) = C(S) - 0.5, v({}) = 0:
      phi_ct  = 1/2 [v({ct}) - v({})] + 1/2 [v({ct, ehr}) - v({ehr})]
      phi_ehr = 1/2 [v({ehr}) - v({})] + 1/2 [v({ct, ehr}) - v({ct})]
  so phi_ct + phi_ehr = C(full) - 0.5 exactly (efficiency);
- imbalance index I = |phi_ct - phi_ehr| / (|phi_ct| + |phi_ehr|) in [0, 1] (0 = both modalities
  contribute equally, 1 = one modality does everything or the two pull in opposite directions by
  the same amount; NaN when both are 0), and the CT share |phi_ct| / (|phi_ct| + |phi_ehr|);
- the unimodal gap: C of each separately trained unimodal baseline (risks passed in), their
  difference C_uni_ct - C_uni_ehr, and the fusion gain C(full) - max(C_uni_ct, C_uni_ehr) (the
  better baseline chosen on the point estimates unless `reference` names it).

Every quantity gets a percentile interval from the same subject-level bootstrap resamples
(`survfuse.metrics.Resampler` weight blocks scored by the vectorised Harrell-C kernel): each
resample yields all the C's at once, and the derived quantities are computed per resample, so
their intervals account for the correlation between the C's. Risks may carry a leading seed axis
[S, N]: then every C is the mean over seeds (the runner's seed averaging), on each resample too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import polars as pl
from numpy.typing import ArrayLike, NDArray

from survfuse.features import ModalityFeatures
from survfuse.interop import check_survival
from survfuse.metrics import MetricResult, Resampler, interval, make_scorer
from survfuse.metrics.bootstrap import run_boot
from survfuse.registry import look_up_option

__all__ = [
    "MODALITY_PAIR",
    "ImbalanceAnalysis",
    "RiskModel",
    "ablation_risks",
    "analyse_imbalance",
    "imbalance_index",
    "mask_modality",
    "modality_contributions",
    "shapley_two_player",
]

MODALITY_PAIR = ("ct", "ehr")
TABLE_SCHEMA = {
    "quantity": pl.Utf8,
    "modality": pl.Utf8,
    "estimate": pl.Float64,
    "lower": pl.Float64,
    "upper": pl.Float64,
    "level": pl.Float64,
    "n_boot": pl.Int64,
    "seed": pl.Int64,
    "n_subjects": pl.Int64,
    "n_events": pl.Int64,
}


class RiskModel(Protocol):
    """Anything with `predict_risk(features) -> [N]` (e.g. `FusionSurvivalModel`)."""

    def predict_risk(self, features: Mapping[str, ModalityFeatures]) -> Any: ...


# ----------------------------------------------------------------------------- masking
def mask_modality(features: ModalityFeatures) -> ModalityFeatures:
    """Return the same rows with the modality missing for everyone.

    present=False, mask all False, pooled/tokens zero, token codes -1 (exactly what
    `ModalityFeatures.align` gives a key without data, so the model sees the missing-modality
    input it was built to handle).
    """

    def zeros(a: NDArray[Any] | None, fill: int = 0) -> Any:
        return None if a is None else np.full(a.shape, fill, dtype=a.dtype)

    return replace(
        features,
        pooled=zeros(features.pooled),
        present=np.zeros(len(features), dtype=bool),
        tokens=zeros(features.tokens),
        mask=zeros(features.mask),
        token_codes=zeros(features.token_codes, -1),
        meta=dict(features.meta),
    )


def ablation_risks(
    model: RiskModel, features: Mapping[str, ModalityFeatures]
) -> dict[str, NDArray[np.float64]]:
    """Risk [N] with both modalities ("full") and with only one present ("ct", "ehr").

    features: dict "ct"/"ehr" -> ModalityFeatures (rows aligned). The key of each ablated risk
    is the modality that stays present.
    """
    for m in MODALITY_PAIR:
        if m not in features:
            raise ValueError(f"ablation needs both modalities; features lack {m!r}")
    out = {"full": np.asarray(model.predict_risk(features), dtype=np.float64)}
    for keep in MODALITY_PAIR:
        other = MODALITY_PAIR[1 - MODALITY_PAIR.index(keep)]
        ablated = {**features, other: mask_modality(features[other])}
        out[keep] = np.asarray(model.predict_risk(ablated), dtype=np.float64)
    return out


# ----------------------------------------------------------------------------- formulas
def shapley_two_player(
    c_full: ArrayLike, c_ct: ArrayLike, c_ehr: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(phi_ct, phi_ehr) of v(S) = C(S) - 0.5, v({}) = 0 (elementwise; see module docstring)."""
    full = np.asarray(c_full, dtype=np.float64) - 0.5
    ct = np.asarray(c_ct, dtype=np.float64) - 0.5
    ehr = np.asarray(c_ehr, dtype=np.float64) - 0.5
    return 0.5 * ct + 0.5 * (full - ehr), 0.5 * ehr + 0.5 * (full - ct)


def imbalance_index(phi_ct: ArrayLike, phi_ehr: ArrayLike) -> NDArray[np.float64]:
    """I = |phi_ct - phi_ehr| / (|phi_ct| + |phi_ehr|) in [0, 1]; NaN where both are 0."""
    a = np.asarray(phi_ct, dtype=np.float64)
    b = np.asarray(phi_ehr, dtype=np.float64)
    den = np.abs(a) + np.abs(b)
    return np.divide(np.abs(a - b), den, out=np.full(den.shape, np.nan), where=den > 0)


def _ct_share(phi_ct: ArrayLike, phi_ehr: ArrayLike) -> NDArray[np.float64]:
    a = np.abs(np.asarray(phi_ct, dtype=np.float64))
    den = a + np.abs(np.asarray(phi_ehr, dtype=np.float64))
    return np.divide(a, den, out=np.full(den.shape, np.nan), where=den > 0)


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class ImbalanceAnalysis:
    """Modality contributions and imbalance of one fused model, with bootstrap intervals.

    `results`: one MetricResult per quantity, named `quantity` or `quantity[modality]`:
    harrell_c[full], harrell_c[ct], harrell_c[ehr] (only that modality present),
    ablation_drop[ct] = C(full) - C(only ehr) (the loss when CT is masked), ablation_drop[ehr],
    shapley[ct], shapley[ehr], shapley_sum (= C(full) - 0.5), imbalance_index, ct_share,
    and with unimodal baselines: unimodal_c[ct], unimodal_c[ehr], unimodal_gap (ct - ehr),
    fusion_gain (C(full) - C of the better baseline, named in `reference`).
    `replicates` holds each quantity's bootstrap values (same resamples for all).
    """

    results: list[MetricResult]
    replicates: dict[str, NDArray[np.float64]] = field(repr=False)
    reference: str | None = None

    def __getitem__(self, name: str) -> MetricResult:
        for r in self.results:
            if r.name == name:
                return r
        look_up_option(name, [r.name for r in self.results], kind="imbalance quantity")
        raise KeyError(name)  # unreachable: look_up_option raised with a did-you-mean

    def table(self) -> pl.DataFrame:
        """Tidy: quantity, modality (null when none), estimate, lower, upper, level, ..."""
        rows = []
        for r in self.results:
            q, _, rest = r.name.partition("[")
            d = r.as_dict()
            rows.append(
                {
                    "quantity": q,
                    "modality": rest.rstrip("]") or None,
                    **{k: d[k] for k in TABLE_SCHEMA if k not in ("quantity", "modality")},
                }
            )
        return pl.DataFrame(rows, schema=TABLE_SCHEMA, orient="row")


def _as_seeds(risk: ArrayLike, n: int, name: str) -> NDArray[np.float64]:
    r = np.asarray(risk, dtype=np.float64)
    if r.ndim == 1:
        r = r[None, :]
    if r.ndim != 2 or r.shape[1] != n:
        raise ValueError(f"risk {name!r} must be [N] or [S, N] with N = {n}, got {r.shape}")
    if not np.all(np.isfinite(r)):
        bad = int(np.flatnonzero(~np.isfinite(r).all(axis=0))[0])
        raise ValueError(f"risk {name!r} has a non-finite value at index {bad}")
    return r


def modality_contributions(
    time: ArrayLike,
    event: ArrayLike,
    risks: Mapping[str, ArrayLike],
    *,
    unimodal: Mapping[str, ArrayLike] | None = None,
    reference: str | None = None,
    cluster: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ImbalanceAnalysis:
    """Ablation, Shapley values, imbalance index and unimodal gap from precomputed risks.

    risks: "full", "ct" (only CT present), "ehr" (only EHR present) -> risk [N] or [S, N]
    (S seeds: each C is the mean over seeds). unimodal: optional "ct"/"ehr" -> risk of the
    separately trained unimodal baselines ([N] or [S', N]). reference: the baseline ("ct" or
    "ehr") the fusion gain is measured against (default: the one with the higher C here).
    cluster [N]: subject ids for the subject-level resampling. Percentile CIs at `level` from
    `n_boot` resamples (`n_boot` = 0: point estimates only, method "none").
    """
    t, e = check_survival(time, event)
    n = t.shape[0]
    for k in ("full", *MODALITY_PAIR):
        if k not in risks:
            raise ValueError(f"risks lack {k!r} (need 'full', 'ct', 'ehr'; got {sorted(risks)})")
    preds: dict[str, NDArray[np.float64]] = {
        f"harrell_c[{k}]": _as_seeds(risks[k], n, k) for k in ("full", *MODALITY_PAIR)
    }
    uni = dict(unimodal or {})
    for m in uni:
        look_up_option(m, MODALITY_PAIR, kind="unimodal modality")
    for m, r in uni.items():
        preds[f"unimodal_c[{m}]"] = _as_seeds(r, n, f"unimodal {m}")
    if n_boot < 0 or n_boot == 1:
        raise ValueError(f"n_boot must be 0 or >= 2, got {n_boot}")

    # One scorer per (quantity, seed); the C of a quantity is the mean over its seeds.
    scorers = {
        (name, s): make_scorer("harrell_c", t, e, r[s])
        for name, r in preds.items()
        for s in range(r.shape[0])
    }
    point_c = {
        name: float(np.mean([scorers[(name, s)].point() for s in range(r.shape[0])]))
        for name, r in preds.items()
    }
    boot_c: dict[str, NDArray[np.float64]] = {}
    res = Resampler.build(n, cluster)
    if n_boot:
        flat = run_boot({f"{k[0]}#{k[1]}": sc for k, sc in scorers.items()}, res, n_boot, seed)
        for name, r in preds.items():
            boot_c[name] = np.mean([flat[f"{name}#{s}"] for s in range(r.shape[0])], axis=0)

    if reference is not None:
        reference = look_up_option(reference, list(uni), kind="reference baseline")
    elif len(uni) == 2:
        reference = max(MODALITY_PAIR, key=lambda m: point_c[f"unimodal_c[{m}]"])
    elif len(uni) == 1:
        reference = next(iter(uni))

    def derive(c: Mapping[str, Any]) -> dict[str, Any]:
        full, ct, ehr = c["harrell_c[full]"], c["harrell_c[ct]"], c["harrell_c[ehr]"]
        phi_ct, phi_ehr = shapley_two_player(full, ct, ehr)
        out = {
            "harrell_c[full]": full,
            "harrell_c[ct]": ct,
            "harrell_c[ehr]": ehr,
            "ablation_drop[ct]": np.asarray(full) - np.asarray(ehr),
            "ablation_drop[ehr]": np.asarray(full) - np.asarray(ct),
            "shapley[ct]": phi_ct,
            "shapley[ehr]": phi_ehr,
            "shapley_sum": phi_ct + phi_ehr,
            "imbalance_index": imbalance_index(phi_ct, phi_ehr),
            "ct_share": _ct_share(phi_ct, phi_ehr),
        }
        for m in uni:
            out[f"unimodal_c[{m}]"] = c[f"unimodal_c[{m}]"]
        if len(uni) == 2:
            out["unimodal_gap"] = np.asarray(c["unimodal_c[ct]"]) - np.asarray(c["unimodal_c[ehr]"])
        if reference is not None:
            out["fusion_gain"] = np.asarray(full) - np.asarray(c[f"unimodal_c[{reference}]"])
        return out

    points = {k: float(v) for k, v in derive(point_c).items()}
    boots = derive(boot_c) if n_boot else {}
    n_events = int(e.sum())
    results = []
    for name, est in points.items():
        if n_boot:
            b = np.asarray(boots[name], dtype=np.float64)
            b = b[np.isfinite(b)]
            lo, hi = (
                interval(est, b, level, "percentile")
                if b.shape[0] >= 2 and math.isfinite(est)
                else (math.nan, math.nan)
            )
            results.append(
                MetricResult(
                    name, est, lo, hi, level, "percentile", int(b.shape[0]), seed,
                    res.n_clusters, n_events,
                )
            )  # fmt: skip
        else:
            results.append(
                MetricResult(
                    name, est, math.nan, math.nan, level, "none", 0, None, res.n_clusters, n_events
                )
            )
    reps = {k: np.asarray(v, dtype=np.float64) for k, v in boots.items()}
    return ImbalanceAnalysis(results, reps, reference)


def analyse_imbalance(
    model: RiskModel,
    features: Mapping[str, ModalityFeatures],
    time: ArrayLike,
    event: ArrayLike,
    *,
    unimodal: Mapping[str, ArrayLike] | None = None,
    reference: str | None = None,
    cluster: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ImbalanceAnalysis:
    """`modality_contributions` of a trained model on one split (`ablation_risks` first).

    features: dict "ct"/"ehr" -> ModalityFeatures of the split's N rows, aligned with
    time/event; unimodal: "ct"/"ehr" -> the unimodal baselines' risks on the same rows.
    """
    return modality_contributions(
        time,
        event,
        ablation_risks(model, features),
        unimodal=unimodal,
        reference=reference,
        cluster=cluster,
        n_boot=n_boot,
        seed=seed,
        level=level,
    )
