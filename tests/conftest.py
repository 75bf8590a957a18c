"""Shared fixtures for the survfuse test suite."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real reference data (MIMIC-IV demo MEDS, PBC2, TotalSegmentator CT, DeepSurv METABRIC, ...).
SHARED_DATA_ENV = "SURVFUSE_SHARED_DATA"  # its location; default <repo>/../shared/data
REQUIRE_SHARED_DATA_ENV = "SURVFUSE_REQUIRE_SHARED_DATA"  # "1" (CI): missing data fails


def shared_data_root() -> Path:
    """Where the shared data lives: $SURVFUSE_SHARED_DATA, else <repo>/../shared/data."""
    env = os.environ.get(SHARED_DATA_ENV, "").strip()
    return Path(env).expanduser() if env else REPO.parent / "shared" / "data"


def shared_data_required() -> bool:
    value = os.environ.get(REQUIRE_SHARED_DATA_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no")


def shared_path(*parts: str) -> Path:
    """The path `parts` under the shared data folder, which must exist.

    Call it only while a test (or a fixture) runs, never at import or collection time: when the
    path is missing the test is skipped with the path named, or fails when
    SURVFUSE_REQUIRE_SHARED_DATA=1 (CI), so CI can never pass by skipping the real-data tests.
    """
    __tracebackhide__ = True  # report the skip at the calling test's line
    path = shared_data_root().joinpath(*parts)
    if not path.exists():
        msg = f"shared data missing: {path}"
        if shared_data_required():
            pytest.fail(f"{msg} ({REQUIRE_SHARED_DATA_ENV} is set)", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session", name="shared_path")
def shared_path_fixture() -> Callable[..., Path]:
    """`shared_path("meds", "pbc2")`: a path under the shared data, skipping the test (failing it
    under SURVFUSE_REQUIRE_SHARED_DATA=1) when it is missing. See `shared_path` above."""
    return shared_path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder itself (skip, or fail in CI, when it is missing)."""
    return shared_path()


@pytest.fixture(scope="session")
def sim_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated CT + EHR cohort (n=300, CT shape (32, 32, 20), seed 0): its folder.

    Layout: see `survfuse.simulate.simulate` (cohort.parquet, oracle.parquet,
    ct_index.parquet, ct/*.nii.gz, meds/data/*.parquet, meds/metadata/, dataset.json).
    Treat it as read-only: it is shared by every test of the session.
    """
    from survfuse.simulate import simulate

    return simulate(
        tmp_path_factory.mktemp("sim_small"), n=300, shape=(32, 32, 20), seed=0, progress=False
    )


@pytest.fixture(scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """Run a module's torch code on one intra-op thread (`pytestmark = usefixtures(...)`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
