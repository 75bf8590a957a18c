"""Shared fixtures for the survfuse test suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sim_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated CT + EHR cohort (n=300, CT shape (32, 32, 20), seed 0): its folder.

    Layout: see `survfuse.data.simulate.simulate` (cohort.parquet, oracle.parquet,
    ct_index.parquet, ct/*.nii.gz, meds/data/*.parquet, meds/metadata/, dataset.json).
    Treat it as read-only: it is shared by every test of the session.
    """
    from survfuse.data.simulate import simulate

    return simulate(
        tmp_path_factory.mktemp("sim_small"), n=300, shape=(32, 32, 20), seed=0, progress=False
    )
