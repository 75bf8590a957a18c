"""ModalityFeatures: validation, save/load (memory-mapped), select, align, concat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from survfuse.features import ModalityFeatures


def make(
    n: int = 5, t: int = 3, d: int = 4, seed: int = 0, codes: bool = False
) -> ModalityFeatures:
    rng = np.random.default_rng(seed)
    sid = np.arange(100, 100 + n)
    pt = np.datetime64("2020-01-01T00:00:00", "us") + np.arange(n) * np.timedelta64(1, "D")
    mask = rng.random((n, t)) > 0.3
    return ModalityFeatures(
        subject_id=sid,
        prediction_time=pt,
        pooled=rng.normal(size=(n, d)).astype(np.float32),
        present=np.ones(n, bool),
        tokens=rng.normal(size=(n, t, d)).astype(np.float32),
        mask=mask,
        token_codes=rng.integers(-1, 9, size=(n, t, 2)).astype(np.int32) if codes else None,
        meta={"encoder": "test", "vocab_size": 10},
    )


def assert_same(a: ModalityFeatures, b: ModalityFeatures) -> None:
    for name in ("subject_id", "prediction_time", "pooled", "present", "tokens", "mask"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_validation_names_the_bad_array() -> None:
    f = make()
    with pytest.raises(ValueError, match="pooled must be"):
        ModalityFeatures(f.subject_id, f.prediction_time, f.pooled[:3], f.present)
    with pytest.raises(ValueError, match="mask is required"):
        ModalityFeatures(f.subject_id, f.prediction_time, f.pooled, f.present, tokens=f.tokens)
    with pytest.raises(ValueError, match="tokens must be"):
        ModalityFeatures(
            f.subject_id,
            f.prediction_time,
            f.pooled,
            f.present,
            tokens=f.tokens[:, :2],
            mask=f.mask,
        )
    with pytest.raises(ValueError, match="vocab_size"):
        ModalityFeatures(
            f.subject_id,
            f.prediction_time,
            f.pooled,
            f.present,
            token_codes=np.zeros((5, 3, 2), np.int32),
            mask=f.mask,
        )


def test_dtypes_are_coerced() -> None:
    f = make()
    g = ModalityFeatures(
        f.subject_id.astype(np.int32),
        f.prediction_time,
        f.pooled.astype(np.float64),
        f.present.astype(np.int8),
        tokens=f.tokens.astype(np.float64),
        mask=f.mask.astype(np.uint8),
    )
    assert g.pooled.dtype == np.float32 and g.present.dtype == np.bool_
    assert g.tokens is not None and g.tokens.dtype == np.float32
    assert g.subject_id.dtype == np.int64
    assert (g.num_tokens, g.token_dim, g.pooled_dim, len(g)) == (3, 4, 4, 5)


def test_save_load_roundtrip_memory_mapped(tmp_path: Path) -> None:
    f = make(codes=True)
    f.save(tmp_path / "feat")
    g = ModalityFeatures.load(tmp_path / "feat", mmap=True)
    assert isinstance(g.tokens, np.memmap) and isinstance(g.pooled, np.memmap)
    assert_same(f, g)
    np.testing.assert_array_equal(f.token_codes, g.token_codes)  # type: ignore[arg-type]
    assert g.meta == f.meta and g.vocab_size == 10
    h = ModalityFeatures.load(tmp_path / "feat", mmap=False)
    assert not isinstance(h.tokens, np.memmap)
    assert_same(f, h)
    # saving again over the same folder replaces it atomically (no temp folders left)
    make(seed=1).save(tmp_path / "feat")
    assert_same(make(seed=1), ModalityFeatures.load(tmp_path / "feat"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feat"]
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        ModalityFeatures.load(tmp_path / "nothing")


def test_select_positions_and_boolean() -> None:
    f = make()
    s = f.select([4, 0])
    np.testing.assert_array_equal(s.subject_id, [104, 100])
    np.testing.assert_array_equal(s.tokens, f.tokens[[4, 0]])  # type: ignore[index]
    b = f.select(np.array([True, False, True, False, False]))
    np.testing.assert_array_equal(b.subject_id, [100, 102])
    np.testing.assert_array_equal(b.pooled, f.pooled[[0, 2]])


def test_align_reorders_and_marks_missing_keys_absent() -> None:
    f = make(codes=True)
    pt = f.prediction_time
    keys_sid = np.array([103, 999, 100])
    keys_pt = np.array([pt[3], pt[0], pt[0]])
    a = f.align(keys_sid, keys_pt)
    np.testing.assert_array_equal(a.subject_id, keys_sid)
    np.testing.assert_array_equal(a.present, [True, False, True])
    np.testing.assert_array_equal(a.pooled[0], f.pooled[3])
    np.testing.assert_array_equal(a.pooled[1], 0)
    assert a.mask is not None and not a.mask[1].any()
    assert a.token_codes is not None and (a.token_codes[1] == -1).all()
    np.testing.assert_array_equal(a.tokens[2], f.tokens[0])  # type: ignore[index]
    # same subject, other prediction time: not the same key
    b = f.align(np.array([100]), np.array([pt[1]]))
    assert not b.present[0]


def test_concat_pads_token_counts() -> None:
    a, b = make(n=2, t=3, codes=True), make(n=3, t=5, seed=1, codes=True)
    c = ModalityFeatures.concat([a, b])
    assert len(c) == 5 and c.num_tokens == 5
    assert c.mask is not None and c.tokens is not None and c.token_codes is not None
    np.testing.assert_array_equal(c.mask[:2, 3:], False)
    np.testing.assert_array_equal(c.tokens[:2, :3], a.tokens)  # type: ignore[arg-type]
    np.testing.assert_array_equal(c.tokens[:2, 3:], 0)
    np.testing.assert_array_equal(c.token_codes[:2, 3:], -1)
    np.testing.assert_array_equal(c.pooled[2:], b.pooled)
    with pytest.raises(ValueError, match="at least one"):
        ModalityFeatures.concat([])
    pooled_only = ModalityFeatures(a.subject_id, a.prediction_time, a.pooled, a.present)
    with pytest.raises(ValueError, match="tokens"):
        ModalityFeatures.concat([a, pooled_only])
