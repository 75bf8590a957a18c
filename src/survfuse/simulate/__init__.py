"""The ground-truth simulator: multi-site CT + EHR cohorts with known signal.

Kept apart from the real-data loaders in `survfuse.data`.

`cohort` draws sites, latent factors, hazards and outcomes; `ct` renders NIfTI volumes with
scanner effects; `ehr` writes MEDS events; `write` puts a whole dataset on disk
(`simulate(out, n=..., seed=...)`) with its oracle risks.
"""

from survfuse.simulate.write import simulate, simulate_tables

__all__ = ["simulate", "simulate_tables"]
