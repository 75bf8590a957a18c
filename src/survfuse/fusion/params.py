"""Checks shared by the estimator and the study config.

Strategy / head parameters against their constructors' signatures, and the validation C-index
used for model selection.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from numpy.typing import ArrayLike

from survfuse.metrics import concordance_index
from survfuse.metrics.result import NoComparablePairError
from survfuse.registry import look_up_option

__all__ = ["RESERVED_PARAMS", "STRATEGY_OPTIONS", "check_params", "harrell_c"]

# FusionStrategy.__init__ arguments the estimator passes itself (not strategy_params)
RESERVED_PARAMS = ("self", "specs", "head", "head_params", "in_features")
#: strategy parameters every strategy takes, applied by the estimator around the strategy
#: (`offset`: see `survfuse.fusion.offset`)
STRATEGY_OPTIONS = ("offset",)


def check_params(
    params: Mapping[str, Any], target: Any, *, kind: str, extra: tuple[str, ...] = ()
) -> None:
    """Check that every key of `params` is a keyword argument of `target`'s `__init__`.

    Keys in `extra` are accepted too; others raise a did-you-mean error. A target that accepts
    **kwargs accepts anything.
    """
    sig = inspect.signature(target.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    allowed = [
        name
        for name, p in sig.parameters.items()
        if name not in RESERVED_PARAMS
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    for key in params:
        look_up_option(key, [*allowed, *extra], kind=kind)


def harrell_c(time: ArrayLike, event: ArrayLike, risk: ArrayLike) -> float:
    """Return Harrell's C of `risk` (`survfuse.metrics.concordance_index`), used for early stopping.

    NaN when the split has no comparable pair (early stopping then keeps the first epoch).
    """
    try:
        return float(concordance_index(time, event, risk).estimate)
    except NoComparablePairError:
        return math.nan
