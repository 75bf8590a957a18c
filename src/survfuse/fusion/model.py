"""`FusionSurvivalModel`: trains a registered fusion strategy with a survival head.

Training: AdamW, gradient-norm clipping, early stopping on the validation C-index (the best
epoch's weights are restored), deterministic on CPU for a given `seed` and `threads`.

Batches (`batch_size=None`): the whole training split is one batch when it has at most
`FULL_BATCH_MAX` = 4096 patients, so every Cox risk set is exact; larger cohorts use shuffled
mini-batches of `LARGE_BATCH` = 2048 patients, with risk sets inside each batch (the usual
large-batch approximation of the partial likelihood; it needs many patients per batch, hence
the large size). An explicit `batch_size` overrides both.

Branch stopping (default on for two-modality strategies): a linear Cox probe per modality,
each modality's encoder side frozen at its best epoch, chance-level modalities dropped (masked
as missing for every patient, `dropped_modalities`); see `survfuse.fusion.branches`. History
records gain `val_c_index_<m>`, `frozen_<m>`, `dropped_<m>`.

Training runs `survfuse.training.fit_loop` with callbacks: early stopping and gradient logging
(`grad_norm_<m>`, `grad_ratio` = ct / ehr in `history`: the imbalance diagnostic), branch
stopping (`survfuse.fusion.branches.BranchStopping`) and, with `rebalance="ogm_ge"`, OGM-GE
(`survfuse.fusion.rebalance`). Options: `survfuse.training.TrainingOptions`. After training a
strategy may fit post-hoc parts on the validation split (`FusionStrategy.finish_training`, e.g.
late fusion's stacking), then the head fits its baseline hazard on the training split.

scikit-learn: a `BaseEstimator` (get_params / set_params / clone from the constructor's
arguments, fitted attributes end in `_`); X is a dict of `ModalityFeatures` (wrap it in
`MultimodalFeatures` for scikit-learn's row splitting), y a scikit-survival structured array.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from sklearn.exceptions import NotFittedError
from torch import Tensor

from survfuse.device import resolve_device
from survfuse.features import ModalityFeatures
from survfuse.fusion.base import ExactStrategy, FusionStrategy
from survfuse.fusion.batch import (
    Batch,
    ModalitySpec,
    check_modalities,
    drop_modalities,
    mask_modalities,
    to_batch,
)
from survfuse.fusion.branches import BranchStopper, BranchStopping
from survfuse.fusion.model_params import FusionModelParams
from survfuse.fusion.multimodal import MultimodalFeatures
from survfuse.fusion.offset import attach_offset, fit_offset, has_offset
from survfuse.fusion.params import harrell_c
from survfuse.fusion.persistence import load_model, save_model
from survfuse.fusion.rebalance import OGMGE
from survfuse.fusion.signal import signal_check
from survfuse.interop import check_survival, survival_from_y
from survfuse.registry import FUSIONS
from survfuse.survival.heads import CoxHead
from survfuse.training import (
    Callback,
    EarlyStopping,
    GradientLogging,
    fit_loop,
)
from survfuse.training.state import Step

__all__ = ["FULL_BATCH_MAX", "LARGE_BATCH", "FusionSurvivalModel", "MultimodalFeatures"]

FULL_BATCH_MAX = 4096
LARGE_BATCH = 2048
PREDICT_CHUNK = 4096
Features = Mapping[str, ModalityFeatures]
# (features, y) with a structured y, or (features, time, event)
Validation = tuple[Features, ArrayLike] | tuple[Features, ArrayLike, ArrayLike]


def _check_finite(features: Features) -> None:
    """Pooled features must be finite: NaN would only surface later as a NaN loss."""
    for m, f in features.items():
        bad = ~np.isfinite(f.pooled)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(
                f"modality {m!r}: pooled features must be finite (no NaN or inf); row {i} "
                f"(subject {f.subject_id[i]}), column {j} = {f.pooled[i, j]}"
            )


def _validation(
    validation: Validation | None,
) -> tuple[Features, ArrayLike, ArrayLike] | None:
    """(X_val, time, event) from (X_val, y) or (X_val, time, event)."""
    if validation is None:
        return None
    if len(validation) == 2:
        vt, ve = survival_from_y(validation[1])
        return validation[0], vt, ve
    if len(validation) == 3:
        return validation
    raise ValueError(
        f"validation must be (X, y) or (X, time, event), got a tuple of {len(validation)}"
    )


class FusionSurvivalModel(FusionModelParams):
    """Fusion strategy + survival head as a scikit-learn / scikit-survival estimator.

    >>> model = FusionSurvivalModel("late", head="cox", seed=0)  # doctest: +SKIP
    >>> model.fit({"ct": ct, "ehr": ehr}, y, validation=(val_feats, val_y))
    >>> risk = model.predict(test_feats)  # [N], higher = worse; model.score(...) = Harrell's C

    `strategy_params` go to the strategy (e.g. `{"modality": "ehr"}` for `unimodal`,
    `{"direction": "both"}` for `cross_attention`), `head_params` to the head; the other
    arguments are the fields of `survfuse.training.TrainingOptions`, with its defaults.
    `rebalance_params` for OGM-GE: `alpha` (default 0.5), `noise` (default True), scored on
    the rows where both modalities are present (see the module docstring).
    Without `validation` the model trains `max_epochs` epochs and keeps the last weights.
    Names are checked when the model is built (did-you-mean errors), and again at fit.

    Fitted attributes: `module_` (the trained `FusionStrategy`), `specs_` (feature shapes per
    modality), `history_` (one record per epoch), `best_epoch_`, `branch_summary_`,
    `dropped_modalities_` (modalities masked as missing for every patient: chance-level
    branches, see branches.py), `offset_history_` (the linear offset's penalty path with
    `strategy_params={"offset": "linear"}`, else empty), `validation_slope_` (Cox risk scale).
    """

    def _build(self, specs: Mapping[str, ModalitySpec]) -> FusionStrategy:
        cls = FUSIONS.get(self.strategy)
        params = dict(self.strategy_params or {})
        offset = params.pop("offset", "none")
        module: FusionStrategy = cls(
            dict(specs), head=self.head, head_params=dict(self.head_params or {}), **params
        )
        attach_offset(module, offset, strategy=self.strategy)
        return module

    @property
    def _module(self) -> FusionStrategy:
        module: FusionStrategy | None = getattr(self, "module_", None)
        if module is None:
            raise NotFittedError("FusionSurvivalModel is not fitted: call fit() or load() first")
        return module

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        # a fixed thread count: results must not depend on the machine's cores
        threads = self.threads
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        X: Features,
        y: ArrayLike,
        event: ArrayLike | None = None,
        *,
        validation: Validation | None = None,
    ) -> FusionSurvivalModel:
        """Train on X and the outcome.

        X: dict "ct"/"ehr" -> ModalityFeatures, rows aligned with the outcome; `y`: a
        scikit-survival structured array (event, time), or `y` = time and `event`.
        `validation`: `(X_val, y_val)` or `(X_val, time_val, event_val)`, for early stopping.
        """
        options = self._check()
        t, e = survival_from_y(y, event)
        features = X
        check_modalities(features, ())
        if not features:
            raise ValueError("X has no modality: pass {'ct': ..., 'ehr': ...} ModalityFeatures")
        n = len(next(iter(features.values())))
        if n != t.shape[0]:
            raise ValueError(f"features have {n} rows but time has {t.shape[0]} values")
        _check_finite(features)
        if all(f.pooled_dim == 0 and f.num_tokens == 0 for f in features.values()):
            raise ValueError(
                f"X has 0 feature(s) (shape=({n}, 0)) while a minimum of 1 is required: every "
                "modality has empty pooled features and no tokens"
            )
        dev = resolve_device(options.device)
        with torch.random.fork_rng(devices=[]), self._threads():
            torch.manual_seed(self.seed)
            specs = {m: ModalitySpec.of(f) for m, f in features.items()}
            module = self._build(specs)
            check_modalities(features, module.modalities)
            for m in module.modalities:
                module.feature_norm(m).fit(features[m], seed=self.seed)
            for h in module.survival_heads():
                h.prepare(t, e)
            module.to(dev)
            self.module_, self.specs_ = module, specs
            self._train(module, features, t, e, _validation(validation), dev)
        return self

    def _batch_rows(self, n: int) -> int:
        return self.batch_size or (n if n <= FULL_BATCH_MAX else LARGE_BATCH)

    def _batches(self, n: int, rng: np.random.Generator) -> list[np.ndarray | None]:
        size = self._batch_rows(n)
        if size >= n:
            return [None]
        perm = rng.permutation(n)
        return [np.sort(perm[i : i + size]) for i in range(0, n, size)]

    def _train(
        self,
        module: FusionStrategy,
        features: Features,
        t: NDArray[np.float64],
        e: NDArray[np.bool_],
        validation: tuple[Features, ArrayLike, ArrayLike] | None,
        dev: torch.device,
    ) -> None:
        opts = self.options
        mods = module.modalities
        tok = module.uses_tokens
        n = t.shape[0]
        rng = np.random.default_rng(self.seed)
        # one generator for modality dropout and OGM-GE noise, drawn in step order
        gen = torch.Generator().manual_seed(self.seed)
        full = None
        if self._batch_rows(n) >= n:  # one batch: convert and prepare once, reuse every epoch
            full = module.prepare(to_batch(features, modalities=mods, with_tokens=tok, device=dev))
        t_all = torch.as_tensor(t, device=dev)
        e_all = torch.as_tensor(e, device=dev)
        self.history_: list[dict[str, Any]] = []
        self.best_epoch_: int | None = None
        self.branch_summary_: dict[str, dict[str, float | int | None]] = {}
        self.dropped_modalities_: list[str] = []
        self.offset_history_: list[dict[str, Any]] = []
        val = None
        if validation is not None:
            vf, vt_raw, ve_raw = validation
            vt, ve = check_survival(vt_raw, ve_raw)
            check_modalities(vf, mods)
            val = (vf, vt, ve)
        if has_offset(module):  # the frozen linear part(s), fitted before the residual
            offset_val = None
            if val is not None:
                offset_val = (to_batch(vf, modalities=mods, with_tokens=False, device=dev), vt, ve)
            train_pooled = to_batch(features, modalities=mods, with_tokens=False, device=dev)
            self.offset_history_ = fit_offset(module, train_pooled, t, e, offset_val)
        if isinstance(module, ExactStrategy):  # an exact solver: no epochs, no callbacks
            train = to_batch(features, modalities=mods, with_tokens=tok, device=dev)
            exact_val = None
            if val is not None:
                exact_val = (to_batch(vf, modalities=mods, with_tokens=tok, device=dev), vt, ve)
            module.eval()
            self.history_ = module.fit_exact(train, t, e, exact_val)
            self.best_epoch_ = 0
            self._fit_validation_slope(val)
            module.output_head.fit_baseline(self._outputs(features), t, e)
            return

        def batches() -> Iterator[Step]:
            for idx in self._batches(n, rng):
                if idx is None and full is not None:
                    batch, bt, be = full, t_all, e_all
                else:
                    batch = to_batch(features, idx, modalities=mods, with_tokens=tok, device=dev)
                    it = torch.as_tensor(idx, device=dev)
                    bt, be = t_all[it], e_all[it]
                batch = mask_modalities(batch, self.dropped_modalities_)
                yield drop_modalities(batch, opts.modality_dropout, gen), bt, be

        validate = None
        if val is not None:
            # converted once: to_batch of the same rows gives the same tensors every epoch
            val_chunks = [module.prepare(b) for b in self._chunk_batches(vf)]

            def validate() -> tuple[float, Any]:
                vout, vreprs, vpresent = self._forward_all(vf, chunks=val_chunks)
                c = harrell_c(vt, ve, module.output_head.risk(vout).cpu().numpy())
                return c, (vreprs, vpresent)

        mod_params = module.modality_parameters()
        callbacks: list[Callback] = [GradientLogging(mod_params)]
        if opts.rebalance == "ogm_ge" and len(mod_params) == 2:
            rp = self._rebalance_settings()
            callbacks.append(OGMGE(mod_params, alpha=rp["alpha"], noise=rp["noise"], generator=gen))
        callbacks.append(EarlyStopping(opts.patience))
        if opts.branch_stopping and len(mod_params) >= 2:
            # without validation the probes still supervise each branch; nothing is judged
            vf, vt, ve = val if val is not None else ({}, np.zeros(0), np.zeros(0, bool))
            callbacks.append(
                BranchStopping(
                    BranchStopper(
                        mod_params,
                        patience=opts.branch_patience or opts.patience,
                        loss_weight=opts.branch_loss,
                        # with a linear offset on the fused output nothing is dropped: the
                        # offset's penalty already shrinks a modality without linear signal,
                        # and masking one for everyone also removes its offset term
                        # (docs/benchmarks.md: such drops cost C). Late fusion's
                        # branch offsets are unimodal: its average of branches still needs the
                        # drop to leave out a noise branch
                        drop_alpha=None if module.offset is not None else opts.branch_drop_alpha,
                    ),
                    lr=opts.lr,
                    val_time=vt,
                    val_event=ve,
                    c_without=lambda m: self._val_c(vf, vt, ve, mask=[m]),
                    dropped=self.dropped_modalities_,
                    signal=None
                    if val is None
                    else signal_check(
                        features, t, e, val, alpha=opts.branch_drop_alpha or 0.05, seed=self.seed
                    ),
                )
            )
        state = fit_loop(
            module,
            opts,
            batches=batches,
            validate=validate,
            callbacks=callbacks,
            verbose=self.verbose,
        )
        self.history_, self.best_epoch_ = state.history, state.best_epoch
        for cb in callbacks:
            if isinstance(cb, BranchStopping):
                self.branch_summary_ = cb.stopper.summary()
        module.eval()
        if module.needs_validation_after_training or (
            val is not None and module.uses_validation_after_training
        ):
            if val is None:
                raise ValueError(
                    f"strategy {self.strategy!r} with {self.strategy_params} fits a part "
                    "on the validation split after training (e.g. late combine='stacking'): "
                    "pass validation data"
                )
            vf, vt, ve = val
            vb = to_batch(vf, modalities=mods, with_tokens=tok, device=dev)
            vb = mask_modalities(vb, self.dropped_modalities_)
            module.finish_training(
                vb, torch.as_tensor(vt, device=dev), torch.as_tensor(ve, device=dev)
            )
        self._fit_validation_slope(val, None if val is None else val_chunks)  # prepared once
        # the prepared training batch when there is one (no second conversion and bucketing)
        out = self._forward_all(features, chunks=None if full is None else [full])[0]
        module.output_head.fit_baseline(out, t, e)

    def _fit_validation_slope(self, val: Any, chunks: list[Batch] | None = None) -> None:
        """Scale a Cox head's risk by its calibration slope on validation (`CoxHead.fit_scale`)."""
        head, self.validation_slope_ = self._module.output_head, None
        if val is not None and self.options.validation_slope and isinstance(head, CoxHead):
            out = self._forward_all(val[0], chunks=chunks)[0]
            self.validation_slope_ = head.fit_scale(out, val[1], val[2])

    # ------------------------------------------------------------------ inference
    def _outputs(self, features: Features) -> Tensor:
        """Head outputs [N, K] of every row, in eval mode."""
        check_modalities(features, self._module.modalities)
        self._module.eval()
        with self._threads():
            return self._forward_all(features)[0]

    def _val_c(
        self,
        features: Features,
        time: NDArray[np.float64],
        event: NDArray[np.bool_],
        mask: Iterable[str],
    ) -> float:
        """Harrell's C of the model with the modalities `mask` also masked as missing."""
        out = self._forward_all(features, mask=mask)[0]
        return harrell_c(time, event, self._module.output_head.risk(out).cpu().numpy())

    def _chunk_batches(self, features: Features) -> list[Batch]:
        """Return every row of `features` as model batches of `PREDICT_CHUNK` rows (a list)."""
        module = self._module
        dev = next(module.parameters()).device
        n = len(features[module.modalities[0]])
        return [
            to_batch(
                features,
                np.arange(start, min(n, start + PREDICT_CHUNK)),
                modalities=module.modalities,
                with_tokens=module.uses_tokens,
                device=dev,
            )
            for start in range(0, n, PREDICT_CHUNK)
        ]

    @torch.no_grad()
    def _forward_all(
        self,
        features: Features,
        *,
        mask: Iterable[str] = (),
        chunks: list[Batch] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Return head outputs [N, K], representations {m: [N, d_m]} and presence {m: [N]}.

        Every row, in eval mode and in chunks (`chunks`: `_chunk_batches(features)` made once);
        dropped modalities and `mask` are masked.
        """
        module = self._module
        was_training = module.training
        module.eval()
        dev = next(module.parameters()).device
        outs: list[Tensor] = []
        reprs: dict[str, list[Tensor]] = {}
        present: dict[str, list[Tensor]] = {}
        for batch in chunks if chunks is not None else self._chunk_batches(features):
            batch = mask_modalities(batch, [*self.dropped_modalities_, *mask])
            o = module(batch)
            outs.append(o.out)
            for m, r in o.modality_repr.items():
                reprs.setdefault(m, []).append(r)
                present.setdefault(m, []).append(batch[m]["present"])
        module.train(was_training)
        out = torch.cat(outs) if outs else torch.zeros(0, 1, device=dev)
        return (
            out,
            {m: torch.cat(v) for m, v in reprs.items()},
            {m: torch.cat(v) for m, v in present.items()},
        )

    def _risk_np(self, features: Features) -> NDArray[np.float64]:
        module = self._module
        out = self._outputs(features)
        return module.output_head.risk(out).detach().cpu().numpy().astype(np.float64)

    def predict(self, X: Features) -> NDArray[np.float64]:
        """Risk per row [N] (higher = worse)."""
        _check_finite(X)
        return self._risk_np(X)

    predict_risk = predict

    def predict_survival(self, X: Features, times: ArrayLike) -> NDArray[np.float64]:
        """Survival probabilities S(t | x) [N, len(times)] from the head's curves."""
        _check_finite(X)
        out = self._outputs(X)
        surv = self._module.output_head.survival(out, np.asarray(times, dtype=np.float64))
        return surv.detach().cpu().numpy().astype(np.float64)

    def predict_cumulative_hazard(self, X: Features, times: ArrayLike) -> NDArray[np.float64]:
        """Cumulative hazard H(t | x) = -log S(t | x) [N, len(times)] (inf where S = 0)."""
        with np.errstate(divide="ignore"):
            out: NDArray[np.float64] = -np.log(self.predict_survival(X, times))
        return out + 0.0  # -0.0 -> 0.0 where S = 1

    def _curve_times(self) -> NDArray[np.float64]:
        """Return the times at which the curves can change.

        The Cox head's baseline times (the distinct training times), the discrete head's bin cut
        points.
        """
        head = self._module.output_head
        for name in ("baseline_time", "cuts"):
            knots = getattr(head, name, None)
            if isinstance(knots, Tensor):
                return np.unique(knots.detach().cpu().numpy().astype(np.float64))
        raise TypeError(f"{type(head).__name__} has no curve times (baseline_time or cuts)")

    @torch.no_grad()
    def attention(self, features: Features) -> dict[str, NDArray[np.float32]]:
        """Return the attention weights of an attention strategy.

        Co-attention [N, H, T_G, T_O], pooling [N, T], cross-attention [N, H, T_q, T_k]; empty for
        strategies without attention.
        """
        module = self._module
        if not hasattr(module, "record_attention"):
            return {}
        module.eval()
        dev = next(module.parameters()).device
        batch = to_batch(features, modalities=module.modalities, with_tokens=True, device=dev)
        batch = mask_modalities(batch, self.dropped_modalities_)
        setattr(module, "record_attention", True)  # noqa: B010  (a flag only attention strategies have)
        try:
            extras = module(batch).extras
        finally:
            setattr(module, "record_attention", False)  # noqa: B010
        return {k: v.cpu().numpy() for k, v in extras.items()}

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write `config.json` (arguments, feature specs, history) and `model.safetensors`."""
        return save_model(self, directory)

    @classmethod
    def load(cls, directory: str | Path, *, device: str | None = None) -> FusionSurvivalModel:
        """Recreate a saved model (weights, normalisation statistics, fitted head state)."""
        model: FusionSurvivalModel = load_model(cls, directory, device=device)
        return model
