"""`MultimodalFeatures`: the X of `FusionSurvivalModel`, a dict of modalities split by rows.

scikit-learn's model selection (`cross_val_score`, `GridSearchCV`, `train_test_split`) counts
samples with `X.shape[0]` and takes rows with `X[rows, ...]`; a plain dict of
`ModalityFeatures` has neither. `MultimodalFeatures` is that dict (`X["ct"]`, `X.items()`) plus
`shape = (N,)` and row selection (`X[rows]`, `X[rows, ...]` with integer positions, a boolean
mask or a slice), which selects the same rows of every modality.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from survfuse.features import ModalityFeatures

__all__ = ["MultimodalFeatures"]


class MultimodalFeatures(dict[str, ModalityFeatures]):
    """{modality: ModalityFeatures} with aligned rows; `len()` counts modalities, `shape[0]` rows.

    >>> X = MultimodalFeatures({"ct": ct, "ehr": ehr})  # doctest: +SKIP
    >>> cross_val_score(FusionSurvivalModel("late"), X, y)  # doctest: +SKIP
    """

    def __init__(self, features: Mapping[str, ModalityFeatures]) -> None:
        super().__init__(features)
        if not self:
            raise ValueError("MultimodalFeatures needs at least one modality")
        rows = {m: len(f) for m, f in self.items()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"modalities have different row counts: {rows}")

    @property
    def shape(self) -> tuple[int]:
        """(N,): the number of rows (predictions), what scikit-learn counts as samples."""
        return (len(next(iter(self.values()))),)

    def __getitem__(self, key: Any) -> Any:  # a modality name, or rows of every modality
        if isinstance(key, str):
            return super().__getitem__(key)
        if isinstance(key, tuple):  # scikit-learn's X[rows, ...]
            if len(key) != 2 or key[1] is not Ellipsis:
                raise IndexError(f"MultimodalFeatures takes rows only, got index {key!r}")
            key = key[0]
        rows = np.arange(self.shape[0])[key]
        return MultimodalFeatures({m: f.select(np.atleast_1d(rows)) for m, f in self.items()})

    def __repr__(self) -> str:
        dims = ", ".join(
            f"{m}: pooled {f.pooled_dim}, tokens {f.num_tokens}" for m, f in self.items()
        )
        return f"MultimodalFeatures({self.shape[0]} rows; {dims})"
