"""The blocked bounded copy (`survfuse.data.voxel_copy`) against one numpy call on the whole
volume, on every axis order and flip, and the preprocessing that uses it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from survfuse.data import voxel_copy
from survfuse.data.imaging import CTPreprocessing, preprocess_ct
from survfuse.data.voxel_copy import bounded_copy

VIEWS = list(itertools.product(itertools.permutations(range(3)), [(1, -1, 1), (-1, -1, 1)]))


def _reference(arr: np.ndarray, lo: float, hi: float | None) -> np.ndarray:
    out = np.empty(arr.shape, np.float32)
    if hi is None:
        return np.maximum(arr, np.float32(lo), out=out)
    return np.clip(arr, np.float32(lo), np.float32(hi), out=out)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 5 x 3 voxels on a small volume: many blocks, ragged at every edge."""
    monkeypatch.setattr(voxel_copy, "MIN_BLOCKED_VOXELS", 0)
    monkeypatch.setattr(voxel_copy, "WIDE", 5)
    monkeypatch.setattr(voxel_copy, "NARROW", 3)


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "u1", "<f4", "<f8"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_blocked_copy_equals_one_numpy_call(small_blocks: None, dtype: str, order: str) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(-3000, 4000, (23, 17, 13)).astype(dtype if dtype != "u1" else "<i2")
    if dtype == "u1":
        base = np.clip(base, 0, 255).astype("u1")
    if dtype.endswith(("f4", "f8")):
        base = base + rng.random(base.shape).astype(dtype)
    arr = np.asarray(base, order=order)
    for (perm, flips), (lo, hi) in itertools.product(VIEWS, [(-1024.0, 3071.0), (-1024.0, None)]):
        view = arr.transpose(perm)[:: flips[0], :: flips[1], :: flips[2]]
        got = bounded_copy(view, lo, hi)
        assert got.flags.c_contiguous and got.dtype == np.float32
        assert got.tobytes() == _reference(view, lo, hi).tobytes(), (perm, flips, lo, hi)


def test_preprocess_of_a_fortran_volume_is_unchanged_by_blocking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LPS-stored Fortran-ordered int16, reoriented to RAS: blocked and unblocked agree."""
    rng = np.random.default_rng(1)
    arr = np.asfortranarray(rng.integers(-1100, 2000, (40, 36, 24)).astype(np.int16))
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    prep = CTPreprocessing(check_hu=False, min_slices=4)
    plain = preprocess_ct(arr, affine, prep)
    monkeypatch.setattr(voxel_copy, "MIN_BLOCKED_VOXELS", 0)
    monkeypatch.setattr(voxel_copy, "WIDE", 7)
    blocked = preprocess_ct(arr, affine, prep)
    assert blocked.array.tobytes() == plain.array.tobytes()
    np.testing.assert_array_equal(blocked.affine, plain.affine)
