"""`FusionModelParams`: the constructor arguments of `FusionSurvivalModel` as estimator parameters.

Their scikit-learn handling, their validation and the `TrainingOptions` they make.

Every argument is stored as given (`get_params` / `set_params` / `sklearn.base.clone` read the
signature); the training arguments are exactly the fields of `TrainingOptions`, with its
defaults (a test holds the two in step). Names are validated when the model is built
(did-you-mean errors before any data is encoded) and again at fit (after `set_params`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from sklearn.base import BaseEstimator

from survfuse.fusion.params import STRATEGY_OPTIONS, check_params
from survfuse.registry import FUSIONS, HEADS
from survfuse.survival.estimator import SurvivalEstimatorMixin
from survfuse.training import TrainingOptions

__all__ = ["FusionModelParams"]

_DEFAULT = TrainingOptions()  # the estimator's training defaults are TrainingOptions' own


class FusionModelParams(SurvivalEstimatorMixin, BaseEstimator):
    """Parameters of a fusion survival model (see `survfuse.fusion.FusionSurvivalModel`)."""

    def __init__(
        self,
        strategy: str = "late",
        *,
        head: str = "cox",
        strategy_params: Mapping[str, Any] | None = None,
        head_params: Mapping[str, Any] | None = None,
        seed: int = 0,
        verbose: bool = False,
        lr: float = _DEFAULT.lr,
        weight_decay: float = _DEFAULT.weight_decay,
        max_epochs: int = _DEFAULT.max_epochs,
        patience: int = _DEFAULT.patience,
        batch_size: int | None = _DEFAULT.batch_size,
        modality_dropout: float = _DEFAULT.modality_dropout,
        grad_clip: float = _DEFAULT.grad_clip,
        rebalance: str = _DEFAULT.rebalance,
        rebalance_params: Mapping[str, Any] | None = None,
        branch_stopping: bool = _DEFAULT.branch_stopping,
        branch_loss: float = _DEFAULT.branch_loss,
        branch_patience: int | None = _DEFAULT.branch_patience,
        branch_drop_alpha: float | None = _DEFAULT.branch_drop_alpha,
        validation_slope: bool = _DEFAULT.validation_slope,
        device: str = _DEFAULT.device,
        threads: int | None = _DEFAULT.threads,
    ) -> None:
        # scikit-learn: arguments are stored as given (clone compares them by identity)
        self.strategy = strategy
        self.head = head
        self.strategy_params = strategy_params
        self.head_params = head_params
        self.seed = seed
        self.verbose = verbose
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.modality_dropout = modality_dropout
        self.grad_clip = grad_clip
        self.rebalance = rebalance
        self.rebalance_params = rebalance_params
        self.branch_stopping = branch_stopping
        self.branch_loss = branch_loss
        self.branch_patience = branch_patience
        self.branch_drop_alpha = branch_drop_alpha
        self.validation_slope = validation_slope
        self.device = device
        self.threads = threads
        self._check()  # a misspelt name fails here, not after encoding a cohort

    @classmethod
    def from_options(cls, strategy: str, options: TrainingOptions, **kwargs: Any) -> Any:
        """Build the model with the options of a `TrainingOptions` (e.g. a study config's)."""
        return cls(strategy, **options.model_dump(), **kwargs)

    def _check(self) -> TrainingOptions:
        """Validate the arguments (did-you-mean errors) and return the training options."""
        strategy_cls = FUSIONS.get(self.strategy)
        head_cls = HEADS.get(self.head)
        check_params(
            self.strategy_params or {},
            strategy_cls,
            kind=f"{self.strategy} strategy parameter",
            extra=STRATEGY_OPTIONS,
        )
        check_params(self.head_params or {}, head_cls, kind=f"{self.head} head parameter")
        fields = {name: getattr(self, name) for name in TrainingOptions.model_fields}
        fields["rebalance_params"] = dict(self.rebalance_params or {})
        try:
            return TrainingOptions(**fields)
        except ValidationError as exc:  # the underlying error (e.g. did-you-mean), one line
            err = exc.errors()[0]
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, Exception):
                raise cause from None
            raise ValueError(f"{err['loc'][0]}: {err['msg']}") from None

    @property
    def options(self) -> TrainingOptions:
        """The training options, validated, from the current arguments."""
        return self._check()

    def _rebalance_settings(self) -> dict[str, Any]:
        """OGM-GE parameters with their defaults filled in."""
        return {"alpha": 0.5, "noise": True, **(self.rebalance_params or {})}
