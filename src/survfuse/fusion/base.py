"""The fusion strategy base: `FusionStrategy` and `FusionOutput`.

`FusionStrategy` is what every registered strategy subclasses and `FusionOutput` what it
returns. Batches: `survfuse.fusion.batch`; layers: `survfuse.fusion.layers`.

Every strategy handles a missing modality (present=False) through masks: absent rows contribute
zeros / no attention keys, and a fully-masked attention row yields a zero output instead of NaN.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from survfuse.features import MODALITIES
from survfuse.fusion.batch import Batch, ModalitySpec
from survfuse.fusion.layers import MLP, FeatureNorm, ModalityEmbedding
from survfuse.registry import HEADS
from survfuse.survival.heads import SurvivalHead

__all__ = [
    "AttentionStrategy",
    "ExactStrategy",
    "FusionOutput",
    "FusionStrategy",
    "PreparedBatch",
]


@dataclass
class FusionOutput:
    """What a strategy returns.

    Head outputs `out` [N, K], `risk` [N] (higher = worse), an auxiliary loss added to the head
    loss (or None), the modality-specific representations [N, d_m] used for imbalance scoring, and
    extras (attention weights when recorded).
    """

    out: Tensor
    risk: Tensor
    aux_loss: Tensor | None = None
    modality_repr: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)


class PreparedBatch(dict[str, dict[str, Tensor]]):
    """A batch with `normalised`, what `FusionStrategy.prepare` computed from it once.

    The estimator prepares the batches it feeds every epoch (the full training batch, the
    validation chunks); `forward` then skips the normalisation. A copy made by `dict(batch)`
    (masking a modality, modality dropout) is a plain batch again and is normalised afresh.
    """

    normalised: Batch


# ----------------------------------------------------------------------------- strategy base
class FusionStrategy(nn.Module, abc.ABC):
    """Base of every registered strategy.

    Subclasses set `modalities` (the feature keys they read) and `uses_tokens`, build their
    layers in `__init__(specs, *, head, head_params, **params)` and implement `fuse(batch)`.
    `head` names a survival head from `survfuse.registry.HEADS` (the
    interface, `survfuse.survival.SurvivalHead`: prepare / risk / loss / fit_baseline / survival).

    A strategy that fits parts after training on the validation split (late fusion's stacking)
    sets `needs_validation_after_training` and implements `finish_training`.
    """

    uses_tokens: bool = False
    head: SurvivalHead
    # heads the strategy can use (None: every registered head); the grid skips the others
    supported_heads: tuple[str, ...] | None = None
    # the linear offset (`fusion.offset`) goes on each modality branch, not on the fused output
    offset_per_branch: bool = False

    def __init__(
        self,
        specs: Mapping[str, ModalitySpec],
        *,
        head: str = "cox",
        head_params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.modalities: tuple[str, ...] = MODALITIES
        self.specs = dict(specs)
        self.head_name = head
        self.head_params = dict(head_params or {})
        self.epoch = 0
        # a frozen linear Cox whose log-hazard is added to the fused output (`fusion.offset`);
        # strategies with `offset_per_branch` get one per modality branch instead
        self.offset: nn.Module | None = None
        self.branch_offsets: nn.ModuleDict | None = None
        # head outputs [N_val, K] of the validation rows with the post-hoc part fitted on the
        # other rows (cross-fitted by `finish_training`; late fusion), else None; not saved
        self.cross_fitted_out: Tensor | None = None

    def _setup(self, modalities: tuple[str, ...]) -> None:
        for m in modalities:
            if m not in self.specs:
                raise ValueError(
                    f"{type(self).__name__} needs modality {m!r}; specs have {sorted(self.specs)}"
                )
        self.modalities = modalities
        self.norms = nn.ModuleDict({m: FeatureNorm(self.specs[m]) for m in modalities})
        # Input balance: Adam moves every weight by ~lr per step, so a Linear on d standardised
        # inputs changes its output ~d times faster than one on a single input. A 521-dimensional
        # pure-noise EHR vector then fits the training risk sets within a few full-batch steps,
        # long before a 6-dimensional informative CT vector is learned, and early stopping keeps
        # that epoch (C ~0.55 vs 0.67 CT-only). Scaling each modality's standardised pooled
        # vector by d_min / d_m equalises the learning speed, but then a low-dimensional
        # pure-noise modality is fitted as fast as a high-dimensional informative one (the
        # imbalance-0 simulator test: ablating the noise CT dropped C by 0.11). The square root,
        # sqrt(d_min / d_m), is the compromise that passes both tests; a single-modality strategy
        # is unchanged (scale 1).
        dims = [self.specs[m].pooled_dim for m in modalities if self.specs[m].pooled_dim > 0]
        d_min = min(dims) if dims else 1
        self.pooled_scale = {
            m: (d_min / self.specs[m].pooled_dim) ** 0.5 if self.specs[m].pooled_dim > 0 else 1.0
            for m in modalities
        }

    def pooled_mlps(self, hidden: int, layers: int, dropout: float) -> nn.ModuleDict:
        """Per modality an `MLP` of its pooled vector to `hidden` (`layers` layers)."""
        return nn.ModuleDict(
            {m: MLP(self.specs[m].pooled_dim, hidden, layers, dropout) for m in MODALITIES}
        )

    def make_head(self, in_features: int) -> SurvivalHead:
        head: SurvivalHead = HEADS.get(self.head_name)(in_features, **self.head_params)
        return head

    # the head that scores the fused output (loss, baseline, survival curves)
    @property
    def output_head(self) -> SurvivalHead:
        return self.head

    def feature_norm(self, modality: str) -> FeatureNorm:
        norm = self.norms[modality]
        assert isinstance(norm, FeatureNorm)
        return norm

    def survival_heads(self) -> list[SurvivalHead]:
        """Every head that needs `prepare(time, event)` before training."""
        return [self.output_head]

    @abc.abstractmethod
    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters used by one modality only (its encoder side), for gradient-norm logging."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def training_stage(self) -> str:
        """Return "survival" (default) or "align" (contrastive two-stage: survival loss off)."""
        return "survival"

    def normalise(self, batch: Batch) -> Batch:
        """Return what `fuse` sees.

        Each modality standardised (`FeatureNorm`) and its pooled vector scaled by the input balance
        `pooled_scale`.
        """
        normed = {m: self.norms[m](batch[m]) for m in self.modalities}
        for m, scale in getattr(self, "pooled_scale", {}).items():
            if scale != 1.0:
                normed[m] = {**normed[m], "pooled": normed[m]["pooled"] * scale}
        return normed

    def prepare(self, batch: Batch) -> Batch:
        """Return `batch` with the work that is the same at every epoch done once (default: none).

        Only for a batch fed again unchanged, to this module with its normalisation fitted.
        """
        return batch

    def forward(self, batch: Batch) -> FusionOutput:
        normed = batch.normalised if isinstance(batch, PreparedBatch) else self.normalise(batch)
        output = self.fuse(normed)
        if self.offset is not None:  # out = x^T beta (frozen linear Cox) + the learnt residual
            shift = self.offset(batch).risk
            output.out = output.out + shift[:, None].to(output.out.dtype)
            output.risk = self.output_head.risk(output.out)
        return output

    @abc.abstractmethod
    def fuse(self, batch: Batch) -> FusionOutput:
        """Fuse a normalised batch into head outputs and risks."""

    def loss(self, output: FusionOutput, time: Tensor, event: Tensor) -> Tensor:
        """Head loss on the fused output plus the strategy's auxiliary loss."""
        parts: list[Tensor] = []
        if self.training_stage() == "survival":
            parts.append(self.output_head.loss(output.out, time, event))
        if output.aux_loss is not None:
            parts.append(output.aux_loss)
        if not parts:
            # nothing to optimise in this batch (e.g. the align stage without a pair of patients
            # having both modalities): a zero attached to the graph, so backward() still works
            return output.out.sum() * 0.0
        return torch.stack(parts).sum()

    @property
    def needs_validation_after_training(self) -> bool:
        """Whether `finish_training` must run (on the validation split) after training."""
        return False

    @property
    def uses_validation_after_training(self) -> bool:
        """Whether `finish_training` runs when a validation split exists (it may be optional)."""
        return self.needs_validation_after_training

    def finish_training(self, batch: Batch, time: Tensor, event: Tensor) -> None:
        """Fit post-training parts on the validation `batch` (no-op by default)."""

    def config(self) -> dict[str, Any]:
        """JSON-serialisable strategy parameters (set by subclasses in `self.params`)."""
        params: dict[str, Any] = dict(getattr(self, "params", {}))
        return params


class ExactStrategy(FusionStrategy):
    """Base of the strategies fitted by an exact solver instead of the training loop.

    The estimator calls `fit_exact` once (no epochs, no callbacks, no branch stopping).
    """

    @abc.abstractmethod
    def fit_exact(
        self,
        train: Batch,
        time: np.ndarray,
        event: np.ndarray,
        validation: tuple[Batch, np.ndarray, np.ndarray] | None,
    ) -> list[dict[str, Any]]:
        """Fit on `train` (validation data may choose a penalty); return history rows."""


class AttentionStrategy(FusionStrategy):
    """Base of the strategies that read both modalities' tokens through attention.

    `embed_tokens` builds `embed`, per modality a `ModalityEmbedding` to `d_model`;
    `record_attention = True` puts the attention weights in `extras`. `dropout` regularises the
    fused MLP; `token_dropout` (default 0) is per-token dropout in the attention blocks and
    pooling, off by default because at 64 + 256 tokens per patient it cost more CPU time than
    the attention itself.
    """

    uses_tokens = True
    record_attention = False

    def embed_tokens(self, d_model: int) -> None:
        """`self.embed`: each modality's tokens as ([N, T, d_model], mask [N, T])."""
        self.embed = nn.ModuleDict(
            {m: ModalityEmbedding(self.specs[m], d_model) for m in MODALITIES}
        )
