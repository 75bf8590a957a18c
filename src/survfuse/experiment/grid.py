"""The experiment grid: task x CT encoder x EHR encoder x strategy x head x seed -> `CellSpec`s.

A cell is one trained model. Its id is stable and readable
(`<task>.<strategy>.<ct encoder|none>.<ehr encoder|none>.<head>.s<seed>`) so a rerun finds the
same folder; `CellSpec.digest()` hashes everything that determines its result, so a cell whose
config changed is recomputed. A strategy that uses one modality does not multiply over the other
modality's encoders (its unused encoder is `None`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from survfuse.experiment.config import ExperimentConfig
from survfuse.registry import FUSIONS

__all__ = ["CellSpec", "expand_grid", "model_key"]


class CellSpec(BaseModel):
    """Everything `run_cell` needs, JSON-serialisable (it travels to Ray workers as is).

    `features` maps each used modality to its feature folder relative to the run directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cell_id: str
    task: str
    strategy: str  # the strategy's label in the config
    strategy_name: str  # the registered fusion strategy
    strategy_params: dict[str, Any]
    modalities: list[str]
    ct_encoder: str | None
    ehr_encoder: str | None
    head: str
    seed: int
    training: dict[str, Any]
    survival_times: list[float]
    features: dict[str, str]

    @property
    def model(self) -> str:
        """The model this cell is one seed of (what evaluation averages seeds over)."""
        return model_key(self.strategy, self.ct_encoder, self.ehr_encoder, self.head)

    def digest(self) -> str:
        """sha256 of the spec's canonical JSON: equal digests give equal results."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def model_key(strategy: str, ct: str | None, ehr: str | None, head: str) -> str:
    """`strategy[ct+ehr]/head`, e.g. `late[ct_radiomics+ehr_onehot]/cox`."""
    encs = "+".join(e for e in (ct, ehr) if e)
    return f"{strategy}[{encs}]/{head}"


def expand_grid(cfg: ExperimentConfig, features: dict[str, dict[str, str]]) -> list[CellSpec]:
    """All cells of a config in a stable order (task, strategy, encoders, head, seed).

    `features[modality][encoder_key]` is the feature folder (relative to the run directory).
    """
    cells: list[CellSpec] = []
    ct_keys = [c.key for c in cfg.encoders.ct]
    ehr_keys = [c.key for c in cfg.encoders.ehr]
    for task in cfg.tasks:
        for strat in cfg.strategies:
            mods = list(strat.modalities)
            cts: list[str | None] = list(ct_keys) if "ct" in mods else [None]
            ehrs: list[str | None] = list(ehr_keys) if "ehr" in mods else [None]
            training = cfg.training_for(strat).model_dump(mode="json")
            # a strategy may support only some heads (e.g. `linear`: cox); the others are skipped
            supported = FUSIONS.get(strat.name).supported_heads
            heads = [h for h in cfg.heads if supported is None or h in supported]
            for ct in cts:
                for ehr in ehrs:
                    feats = {}
                    if ct is not None:
                        feats["ct"] = features["ct"][ct]
                    if ehr is not None:
                        feats["ehr"] = features["ehr"][ehr]
                    for head in heads:
                        for seed in cfg.seeds:
                            cell_id = ".".join(
                                [task, strat.key, ct or "none", ehr or "none", head, f"s{seed}"]
                            )
                            cells.append(
                                CellSpec(
                                    cell_id=cell_id,
                                    task=task,
                                    strategy=strat.key,
                                    strategy_name=strat.name,
                                    strategy_params=strat.resolved_params(),
                                    modalities=mods,
                                    ct_encoder=ct,
                                    ehr_encoder=ehr,
                                    head=head,
                                    seed=seed,
                                    training=training,
                                    survival_times=cfg.evaluation.survival_times(),
                                    features=feats,
                                )
                            )
    return cells
