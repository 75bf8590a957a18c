"""`FusionSurvivalModel`: trains a registered fusion strategy with a survival head.

Training: AdamW, gradient-norm clipping, early stopping on the validation C-index (the best
epoch's weights are restored), deterministic on CPU for a given `seed`.

Batches (`batch_size=None`): the whole training split is one batch when it has at most
`FULL_BATCH_MAX` = 4096 patients, so every Cox risk set is exact; larger cohorts use shuffled
mini-batches of `LARGE_BATCH` = 2048 patients, with risk sets inside each batch (the usual
large-batch approximation of the partial likelihood; it needs many patients per batch, hence
the large size). An explicit `batch_size` overrides both.

Branch stopping (`branch_stopping=True`, the default for strategies with two modalities): a
linear Cox probe per modality on the strategy's modality representation adds its partial
likelihood to the loss (`branch_loss`, deep supervision), and each modality's encoder side is
restored to its best-probe epoch and frozen once neither it nor the fused model improved for
`branch_patience` epochs (default `patience`); training does not stop before every branch is
frozen (at most 2 x `patience` epochs without a better fused model). A branch whose best
validation C is not above chance (one-sided level `branch_drop_alpha`, 0.05) while another
branch is above it, and whose masking raises the fused validation C by `DROP_MIN_GAIN`, is
dropped: masked as missing for every patient from then on, in training
and prediction (`dropped_modalities`, saved with the model). Why and how:
`survfuse.fusion.branches`. History records gain `val_c_index_<m>`, `frozen_<m>`, `dropped_<m>`.

Imbalance diagnostics (issue 11): every epoch logs, in `history`, the mean L2 norm of the
gradient of each modality's encoder-side parameters (`strategy.modality_parameters()`),
`grad_norm_ct`, `grad_norm_ehr`, and their ratio `grad_ratio` = ct / ehr.

Rebalancing (`rebalance="ogm_ge"`, off by default): OGM-GE (Peng et al., CVPR 2022) adapted to
survival. A linear Cox probe per modality is trained on that modality's detached
representation r_m (`FusionOutput.modality_repr`; Adam, 5 steps per training step); its score is the geometric-mean partial
likelihood per event relative to the null model (risk 0), s_m = exp(nll_null - nll_m) (the
analogue of OGM-GE's softmax probability of the true class), both computed on the batch rows
where *both* modalities are present: the Cox NLL grows with risk-set size, so scoring each probe on
its own present rows would favour the modality that is missing more often. With rho_ct = s_ct / s_ehr and rho_ehr = 1 / rho_ct, the
dominant modality (rho_m > 1) has its encoder-side gradients scaled by
k_m = 1 - tanh(alpha * (rho_m - 1)) and, for generalisation enhancement, Gaussian noise with the
gradient's own standard deviation added (`noise=True`); the other modality is untouched.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time as _time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import Tensor, nn

from survfuse.device import resolve_device
from survfuse.encoders.features import ModalityFeatures
from survfuse.fusion.base import (
    Batch,
    FusionOutput,
    FusionStrategy,
    ModalitySpec,
    check_modalities,
    drop_modalities,
    mask_modalities,
    to_batch,
)
from survfuse.fusion.branches import (
    DROP_MIN_GAIN,
    BranchStopper,
    check_drop_alpha,
    probe_scores,
)
from survfuse.interop import check_survival
from survfuse.metrics import concordance_index
from survfuse.metrics.concordance import NoComparablePairError
from survfuse.registry import FUSIONS, look_up_option
from survfuse.survival.losses import cox_partial_nll

__all__ = ["FULL_BATCH_MAX", "LARGE_BATCH", "FusionSurvivalModel", "harrell_c"]

FULL_BATCH_MAX = 4096
LARGE_BATCH = 2048
PREDICT_CHUNK = 4096
PROBE_STEPS = 5
PROBE_LR = 1e-2
REBALANCE = ("none", "ogm_ge")
Features = Mapping[str, ModalityFeatures]


REBALANCE_PARAMS = ("alpha", "noise")
# FusionStrategy.__init__ arguments the estimator passes itself (not strategy_params)
_RESERVED = ("self", "specs", "head", "head_params", "in_features")


def check_params(params: Mapping[str, Any], target: Any, *, kind: str) -> None:
    """Every key of `params` must be a keyword argument of `target`'s `__init__` (did-you-mean
    error otherwise); a target that accepts **kwargs accepts anything."""
    sig = inspect.signature(target.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    allowed = [
        name
        for name, p in sig.parameters.items()
        if name not in _RESERVED
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    for key in params:
        look_up_option(key, allowed, kind=kind)


def harrell_c(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> float:
    """Harrell's C of `risk` (`survfuse.metrics.concordance_index`), used for early stopping;
    NaN when the split has no comparable pair (early stopping then keeps the first epoch)."""
    try:
        return float(concordance_index(time, event, risk).estimate)
    except NoComparablePairError:
        return math.nan


class FusionSurvivalModel:
    """Fusion strategy + survival head with a scikit-learn-like estimator interface.

    >>> model = FusionSurvivalModel("late", head="cox", seed=0)  # doctest: +SKIP
    >>> model.fit({"ct": ct, "ehr": ehr}, time, event, validation=(val_feats, vt, ve))
    >>> risk = model.predict_risk(test_feats)  # [N], higher = worse

    `strategy_params` go to the strategy (e.g. `{"modality": "ehr"}` for `unimodal`,
    `{"direction": "both"}` for `cross_attention`), `head_params` to the head.
    `rebalance_params` for OGM-GE: `alpha` (default 0.5), `noise` (default True), scored on
    the rows where both modalities are present (see the module docstring).
    Without `validation` the model trains `max_epochs` epochs and keeps the last weights.
    """

    def __init__(
        self,
        strategy: str = "late",
        *,
        head: str = "cox",
        strategy_params: Mapping[str, Any] | None = None,
        head_params: Mapping[str, Any] | None = None,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 100,
        patience: int = 10,
        batch_size: int | None = None,
        modality_dropout: float = 0.0,
        grad_clip: float = 1.0,
        rebalance: str = "none",
        rebalance_params: Mapping[str, Any] | None = None,
        branch_stopping: bool = True,
        branch_loss: float = 1.0,
        branch_patience: int | None = None,
        branch_drop_alpha: float | None = 0.05,
        seed: int = 0,
        device: str = "auto",
        verbose: bool = False,
    ) -> None:
        from survfuse.registry import HEADS

        # every option is validated here, not at fit(): did-you-mean errors for misspelt names
        strategy_cls = FUSIONS.get(strategy)
        head_cls = HEADS.get(head)
        check_params(strategy_params or {}, strategy_cls, kind=f"{strategy} strategy parameter")
        check_params(head_params or {}, head_cls, kind=f"{head} head parameter")
        for key in rebalance_params or {}:
            look_up_option(key, REBALANCE_PARAMS, kind="rebalance parameter")
        resolve_device(device)
        self.strategy_name = strategy
        self.head = head
        self.strategy_params = dict(strategy_params or {})
        self.head_params = dict(head_params or {})
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.max_epochs = int(max_epochs)
        self.patience = int(patience)
        self.batch_size = batch_size
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        self.modality_dropout = float(modality_dropout)
        self.grad_clip = float(grad_clip)
        self.rebalance = look_up_option(rebalance, REBALANCE, kind="rebalance")
        self.rebalance_params = {"alpha": 0.5, "noise": True, **dict(rebalance_params or {})}
        if branch_loss < 0:
            raise ValueError(f"branch_loss must be >= 0, got {branch_loss}")
        if branch_patience is not None and branch_patience < 1:
            raise ValueError(f"branch_patience must be >= 1, got {branch_patience}")
        check_drop_alpha(branch_drop_alpha, "branch_drop_alpha")
        self.branch_stopping = bool(branch_stopping)
        self.branch_drop_alpha = branch_drop_alpha
        self.branch_loss = float(branch_loss)
        self.branch_patience = branch_patience
        self.seed = int(seed)
        self.device = device
        self.verbose = verbose
        self.history: list[dict[str, Any]] = []
        self.module: FusionStrategy | None = None
        self.specs: dict[str, ModalitySpec] = {}
        self.best_epoch: int | None = None
        self.branch_summary: dict[str, dict[str, float | int | None]] = {}
        # modalities masked as missing for every patient (chance-level branches; see branches.py)
        self.dropped_modalities: list[str] = []

    # ------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable)."""
        return {
            "strategy": self.strategy_name,
            "head": self.head,
            "strategy_params": self.strategy_params,
            "head_params": self.head_params,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "batch_size": self.batch_size,
            "modality_dropout": self.modality_dropout,
            "grad_clip": self.grad_clip,
            "rebalance": self.rebalance,
            "rebalance_params": self.rebalance_params,
            "branch_stopping": self.branch_stopping,
            "branch_loss": self.branch_loss,
            "branch_patience": self.branch_patience,
            "branch_drop_alpha": self.branch_drop_alpha,
            "seed": self.seed,
            "device": self.device,
        }

    def _build(self, specs: Mapping[str, ModalitySpec]) -> FusionStrategy:
        cls = FUSIONS.get(self.strategy_name)
        module: FusionStrategy = cls(
            dict(specs), head=self.head, head_params=self.head_params, **self.strategy_params
        )
        return module

    @property
    def _module(self) -> FusionStrategy:
        if self.module is None:
            raise RuntimeError("FusionSurvivalModel is not fitted: call fit() or load() first")
        return self.module

    # ------------------------------------------------------------------ training
    def fit(
        self,
        features: Features,
        time: ArrayLike,
        event: ArrayLike,
        *,
        validation: tuple[Features, ArrayLike, ArrayLike] | None = None,
    ) -> FusionSurvivalModel:
        """Train on `features` (dict "ct"/"ehr" -> ModalityFeatures, rows aligned with time/event)."""
        t, e = check_survival(time, event)
        check_modalities(features, ())
        n = len(next(iter(features.values())))
        if n != t.shape[0]:
            raise ValueError(f"features have {n} rows but time has {t.shape[0]} values")
        dev = resolve_device(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            specs = {m: ModalitySpec.of(f) for m, f in features.items()}
            module = self._build(specs)
            check_modalities(features, module.modalities)
            for m in module.modalities:
                module.feature_norm(m).fit(features[m], seed=self.seed)
            for h in module.survival_heads():
                h.prepare(t, e)
            module.to(dev)
            self.module, self.specs = module, specs
            self._train(module, features, t, e, validation, dev)
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
        mods = module.modalities
        tok = module.uses_tokens
        n = t.shape[0]
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        mod_params = module.modality_parameters()
        full = None
        if self._batch_rows(n) >= n:  # one batch: convert once, reuse every epoch
            full = to_batch(features, modalities=mods, with_tokens=tok, device=dev)
        t_all = torch.as_tensor(t, device=dev)
        e_all = torch.as_tensor(e, device=dev)

        val = None
        if validation is not None:
            vf, vt, ve = validation
            vt, ve = check_survival(vt, ve)
            check_modalities(vf, mods)
            val = (vf, vt, ve)

        probes: nn.ModuleDict | None = None
        probe_opt: torch.optim.Optimizer | None = None
        stopper: BranchStopper | None = None
        branch_opt: torch.optim.Optimizer | None = None
        if self.branch_stopping and len(mod_params) >= 2:
            stopper = BranchStopper(
                mod_params,
                patience=self.branch_patience or self.patience,
                loss_weight=self.branch_loss,
                drop_alpha=self.branch_drop_alpha,
            )
        best_score = -math.inf
        best_state: dict[str, Tensor] | None = None
        bad_epochs = 0
        self.history = []
        self.best_epoch = None
        self.branch_summary = {}
        self.dropped_modalities = []
        for epoch in range(self.max_epochs):
            started = _time.perf_counter()
            module.set_epoch(epoch)
            module.train()
            stage = module.training_stage()
            losses: list[float] = []
            gnorm: dict[str, list[float]] = {m: [] for m in mod_params}
            coefs: dict[str, list[float]] = {m: [] for m in mod_params}
            for idx in self._batches(n, rng):
                if idx is None and full is not None:
                    batch, bt, be = full, t_all, e_all
                else:
                    batch = to_batch(features, idx, modalities=mods, with_tokens=tok, device=dev)
                    it = torch.as_tensor(idx, device=dev)
                    bt, be = t_all[it], e_all[it]
                batch = mask_modalities(batch, self.dropped_modalities)
                batch = drop_modalities(batch, self.modality_dropout, gen)
                output = module(batch)
                loss = module.loss(output, bt, be)
                opt.zero_grad(set_to_none=True)
                if stopper is not None and stage == "survival":
                    if branch_opt is None:
                        branch_opt = torch.optim.AdamW(
                            stopper.probe_parameters(output.modality_repr), lr=self.lr
                        )
                    present = {m: batch[m]["present"] for m in output.modality_repr}
                    branch = stopper.loss(output.modality_repr, present, bt, be)
                    if branch is not None:
                        loss = loss + branch
                    branch_opt.zero_grad(set_to_none=True)
                loss.backward()
                for m, ps in mod_params.items():
                    gnorm[m].append(_grad_norm(ps))
                if self.rebalance == "ogm_ge" and len(mod_params) == 2:
                    if probes is None:
                        probes = nn.ModuleDict(
                            {
                                m: nn.Linear(r.shape[-1], 1).to(dev)
                                for m, r in output.modality_repr.items()
                            }
                        )
                        probe_opt = torch.optim.Adam(probes.parameters(), lr=PROBE_LR)
                    assert probe_opt is not None
                    k = self._ogm_modulate(
                        output, batch, bt, be, probes, probe_opt, mod_params, gen
                    )
                    for m, c in k.items():
                        coefs[m].append(c)
                if self.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, self.grad_clip)
                opt.step()
                if branch_opt is not None and stage == "survival":
                    branch_opt.step()
                losses.append(float(loss.detach()))
            record: dict[str, Any] = {
                "epoch": epoch,
                "stage": stage,
                "train_loss": float(np.mean(losses)),
            }
            for m, vals in gnorm.items():
                record[f"grad_norm_{m}"] = float(np.mean(vals))
            if {"ct", "ehr"} <= set(gnorm):
                den = record["grad_norm_ehr"]
                record["grad_ratio"] = record["grad_norm_ct"] / den if den > 0 else math.inf
            for m, vals in coefs.items():
                if vals:
                    record[f"ogm_coef_{m}"] = float(np.mean(vals))
            if val is not None:
                vf, vt, ve = val
                vout, vreprs, vpresent = self._forward_all(vf)
                c = harrell_c(vt, ve, module.output_head.risk(vout).cpu().numpy())
                record["val_c_index"] = c
                improved = froze = dropped = False
                if stage == "survival":
                    score = c if math.isfinite(c) else -math.inf
                    improved = score > best_score + 1e-6 or best_state is None
                if stopper is not None and stage == "survival":
                    scored = probe_scores(stopper, vreprs, vpresent, vt, ve)
                    branch_c = {m: c_se[0] for m, c_se in scored.items()}
                    for m, bc in branch_c.items():
                        record[f"val_c_index_{m}"] = bc
                    se = {m: c_se[1] for m, c_se in scored.items()}
                    for m in stopper.update(
                        epoch, branch_c, fused_improved=improved, std_errors=se
                    ):
                        record[f"frozen_{m}"] = True
                        froze = True
                    for m in stopper.drop_candidates():
                        # drop only if the fused model is better without it (branches.py)
                        without = self._val_c(vf, vt, ve, mask=[m])
                        record[f"val_c_index_without_{m}"] = without
                        if math.isfinite(c) and without >= c + DROP_MIN_GAIN:
                            stopper.drop(m, epoch)
                            record[f"dropped_{m}"] = record[f"frozen_{m}"] = True
                            self.dropped_modalities.append(m)
                            dropped, c = True, without
                if stage == "survival":
                    if improved:
                        best_score = score
                        best_state = copy.deepcopy(module.state_dict())
                        self.best_epoch = epoch
                        bad_epochs = 0
                    else:
                        bad_epochs += 1
                    if froze:  # the fusion layers get `patience` epochs to adapt to the freeze
                        bad_epochs = 0
                    if dropped:
                        # restart early stopping from the current weights with the modality
                        # masked (validated just now: C without > C with), so the weights kept
                        # are never ones scored with the dropped modality present, and the
                        # fusion layers get `patience` epochs to adapt
                        best_score = c if math.isfinite(c) else -math.inf
                        best_state = copy.deepcopy(module.state_dict())
                        self.best_epoch, bad_epochs = epoch, 0
            record["seconds"] = _time.perf_counter() - started
            self.history.append(record)
            if self.verbose:
                print(record)
            # wait for every branch to be frozen (a slower modality may still be learning), but
            # not beyond 2 x patience epochs without a better fused model
            branches_done = stopper is None or stopper.all_frozen or bad_epochs >= 2 * self.patience
            if val is not None and bad_epochs >= self.patience and branches_done:
                break
        if stopper is not None:
            stopper.release()
            self.branch_summary = stopper.summary()
        if best_state is not None:
            module.load_state_dict(best_state)
        elif self.history:
            self.best_epoch = self.history[-1]["epoch"]
        module.eval()
        if getattr(module, "combine", None) == "stacking":
            if val is None:
                raise ValueError("late fusion with combine='stacking' needs validation data")
            vf, vt, ve = val
            vb = to_batch(vf, modalities=mods, with_tokens=tok, device=dev)
            vb = mask_modalities(vb, self.dropped_modalities)
            module.fit_stacking(
                vb, torch.as_tensor(vt, device=dev), torch.as_tensor(ve, device=dev)
            )  # type: ignore[operator]
        out = self._outputs(features)
        module.output_head.fit_baseline(out, t, e)

    def _ogm_modulate(
        self,
        output: FusionOutput,
        batch: Batch,
        bt: Tensor,
        be: Tensor,
        probes: nn.ModuleDict,
        probe_opt: torch.optim.Optimizer,
        mod_params: dict[str, list[nn.Parameter]],
        gen: torch.Generator,
    ) -> dict[str, float]:
        """Train the per-modality Cox probes one step and scale the dominant modality's grads."""
        scores: dict[str, float] = {}
        probe_losses: list[Tensor] = []
        # Scores on the rows where every modality is present: the Cox NLL grows with the size of
        # the risk sets, so scoring each probe on its own present rows would favour the modality
        # that is missing more often. Each score is the improvement over the null model (risk 0)
        # on those shared rows, s_m = exp(nll_null - nll_m) (1 = uninformative).
        both = torch.stack([batch[m]["present"] for m in output.modality_repr]).all(0)
        scorable = bool(be[both].any())
        nll_null = (
            float(cox_partial_nll(bt[both], be[both], torch.zeros_like(bt[both])))
            if scorable
            else 0.0
        )
        for m, r in output.modality_repr.items():
            rows = batch[m]["present"]
            risk = probes[m](r.detach()[rows])[:, 0]
            probe_losses.append(cox_partial_nll(bt[rows], be[rows], risk))
            if scorable:
                with torch.no_grad():
                    shared = probes[m](r.detach()[both])[:, 0]
                    nll = float(cox_partial_nll(bt[both], be[both], shared))
                scores[m] = math.exp(nll_null - nll)
            else:
                scores[m] = 0.0
        # a few cheap steps per training step so the linear probes track the representations
        for step in range(PROBE_STEPS):
            if step:
                probe_losses = [
                    cox_partial_nll(
                        bt[batch[m]["present"]],
                        be[batch[m]["present"]],
                        probes[m](r.detach()[batch[m]["present"]])[:, 0],
                    )
                    for m, r in output.modality_repr.items()
                ]
            probe_opt.zero_grad(set_to_none=True)
            torch.stack(probe_losses).sum().backward()
            probe_opt.step()
        names = sorted(scores)
        coef = {m: 1.0 for m in names}
        a, b = names
        if scores[a] > 0 and scores[b] > 0:
            rho = {a: scores[a] / scores[b], b: scores[b] / scores[a]}
            alpha = float(self.rebalance_params["alpha"])
            for m in names:
                if rho[m] > 1:
                    coef[m] = 1.0 - math.tanh(alpha * (rho[m] - 1.0))
                    for p in mod_params[m]:
                        if p.grad is None:
                            continue
                        g = p.grad * coef[m]
                        if self.rebalance_params["noise"] and p.grad.numel() > 1:
                            noise = torch.randn(p.grad.shape, generator=gen).to(g.device)
                            g = g + noise * (float(p.grad.std()) + 1e-8)
                        p.grad.copy_(g)
        return coef

    # ------------------------------------------------------------------ inference
    def _outputs(self, features: Features) -> Tensor:
        """Head outputs [N, K] of every row, in eval mode."""
        check_modalities(features, self._module.modalities)
        self._module.eval()
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

    @torch.no_grad()
    def _forward_all(
        self, features: Features, *, mask: Iterable[str] = ()
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Head outputs [N, K], modality representations {m: [N, d_m]} and presence {m: [N]}
        of every row (eval mode, in chunks); dropped modalities and `mask` are masked."""
        module = self._module
        was_training = module.training
        module.eval()
        dev = next(module.parameters()).device
        n = len(features[module.modalities[0]])
        outs: list[Tensor] = []
        reprs: dict[str, list[Tensor]] = {}
        present: dict[str, list[Tensor]] = {}
        for start in range(0, n, PREDICT_CHUNK):
            idx = np.arange(start, min(n, start + PREDICT_CHUNK))
            batch = to_batch(
                features,
                idx,
                modalities=module.modalities,
                with_tokens=module.uses_tokens,
                device=dev,
            )
            batch = mask_modalities(batch, [*self.dropped_modalities, *mask])
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

    def predict_risk(self, features: Features) -> NDArray[np.float64]:
        """Risk per row [N] (higher = worse)."""
        return self._risk_np(features)

    def predict_survival(self, features: Features, times: ArrayLike) -> NDArray[np.float64]:
        """Survival probabilities [N, len(times)] from the head's curves."""
        out = self._outputs(features)
        surv = self._module.output_head.survival(out, np.asarray(times, dtype=np.float64))
        return surv.detach().cpu().numpy().astype(np.float64)

    @torch.no_grad()
    def attention(self, features: Features) -> dict[str, NDArray[np.float32]]:
        """Attention weights of an attention strategy (co-attention [N, H, T_G, T_O], pooling
        [N, T], cross-attention [N, H, T_q, T_k]); empty for strategies without attention."""
        module = self._module
        if not hasattr(module, "record_attention"):
            return {}
        module.eval()
        dev = next(module.parameters()).device
        batch = to_batch(features, modalities=module.modalities, with_tokens=True, device=dev)
        batch = mask_modalities(batch, self.dropped_modalities)
        setattr(module, "record_attention", True)  # noqa: B010  (a flag only attention strategies have)
        try:
            extras = module(batch).extras
        finally:
            setattr(module, "record_attention", False)  # noqa: B010
        return {k: v.cpu().numpy() for k, v in extras.items()}

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write `config.json` (arguments, feature specs, history) and `model.safetensors`."""
        from safetensors.torch import save_file

        module = self._module
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {
            "model": self.config(),
            "specs": {m: s.to_dict() for m, s in self.specs.items()},
            "history": self.history,
            "best_epoch": self.best_epoch,
            "dropped_modalities": self.dropped_modalities,
        }
        (out / "config.json").write_text(json.dumps(cfg, indent=2, default=float))
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        return out

    @classmethod
    def load(cls, directory: str | Path, *, device: str | None = None) -> FusionSurvivalModel:
        """Recreate a saved model (weights, normalisation statistics, fitted head state)."""
        from safetensors.torch import load_file

        src = Path(directory)
        if not (src / "config.json").exists():
            raise FileNotFoundError(f"no saved FusionSurvivalModel in {src} (config.json missing)")
        cfg = json.loads((src / "config.json").read_text())
        kwargs = dict(cfg["model"])
        strategy = kwargs.pop("strategy")
        if device is not None:
            kwargs["device"] = device
        model = cls(strategy, **kwargs)
        model.specs = {m: ModalitySpec(**s) for m, s in cfg["specs"].items()}
        model.history = cfg.get("history", [])
        model.best_epoch = cfg.get("best_epoch")
        model.dropped_modalities = list(cfg.get("dropped_modalities", []))
        module = model._build(model.specs)
        weights = src / "model.safetensors"
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise ValueError(
                f"{weights}: not a valid safetensors file ({' '.join(str(exc).split())}); "
                "refusing to load it (retrain the cell)"
            ) from exc
        module.load_state_dict(state)
        module.to(resolve_device(model.device)).eval()
        model.module = module
        return model


def _grad_norm(params: list[nn.Parameter]) -> float:
    sq = [p.grad.detach().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0
