"""Embedding-space filters drop exactly the constructed low-similarity pairs and near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from unclip.embeddings import io as eio
from unclip.embeddings.filters import (EmbeddingFilterConfig, NearDuplicateFilter, apply_filters,
                                       similarity_filter)

DIM = 16


def _unit(a):
    a = np.asarray(a, np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _pair(cos: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors with exactly this cosine."""
    u, w = np.linalg.qr(rng.normal(size=(DIM, 2)))[0].T
    return u.astype(np.float32), (cos * u + np.sqrt(1 - cos**2) * w).astype(np.float32)


def _distinct(n, rng):
    """n unit vectors with pairwise cosine exactly 0 (orthonormal rows)."""
    return np.linalg.qr(rng.normal(size=(DIM, DIM)))[0][:n].astype(np.float32)


def _near(v, rng, eps=0.01):
    return _unit(v + eps * rng.normal(size=v.shape))


def test_similarity_filter_counts():
    rng = np.random.default_rng(0)
    cosines = [0.9, 0.35, 0.3, 0.29, 0.1, -0.5]
    pairs = [_pair(c, rng) for c in cosines]
    img, txt = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    keep = similarity_filter(img, txt, 0.295)
    assert keep.tolist() == [True, True, True, False, False, False]
    with pytest.raises(ValueError):
        similarity_filter(img, txt[:3], 0.3)


def test_near_duplicates_across_batches():
    rng = np.random.default_rng(1)
    base = _distinct(5, rng)
    f = NearDuplicateFilter(0.95, DIM, block=3)  # block < batch: exercises chunking and block storage
    # batch 1: 0, dup-of-0, 1, 2, dup-of-2 ; batch 2: dup-of-1 (earlier batch), 3, 3-dup, 4 ; batch 3: empty
    b1 = np.stack([base[0], _near(base[0], rng), base[1], base[2], _near(base[2], rng)])
    b2 = np.stack([_near(base[1], rng), base[3], _near(base[3], rng), base[4]])
    assert f.update(b1).tolist() == [True, False, True, True, False]
    assert f.update(b2).tolist() == [False, True, False, True]
    assert f.update(np.zeros((0, DIM), np.float32)).tolist() == []
    assert (f.seen, f.kept, f.dropped) == (9, 5, 4)
    # a later exact copy of the first vector is still recognised after many batches
    assert f.update(base[:1]).tolist() == [False]
    # distinct vectors near but below the threshold are all kept
    g = NearDuplicateFilter(0.95, DIM)
    a, b = _pair(0.94, rng)
    assert g.update(np.stack([a, b])).tolist() == [True, True]
    with pytest.raises(ValueError):
        g.update(np.zeros((2, DIM + 1), np.float32))


def test_near_duplicates_keep_first_not_chain():
    """Drops are against *kept* vectors: b ~ a is dropped, c ~ b but not ~ a is kept."""
    rng = np.random.default_rng(2)
    a, c = _pair(0.8, rng)
    b = _unit(a + c)  # cos(a, b) = cos(b, c) ~ 0.95
    f = NearDuplicateFilter(0.9, DIM)
    assert f.update(np.stack([a, b, c])).tolist() == [True, False, True]


def _table(img, txt, keys):
    return eio.to_table(keys, [f"cap {k}" for k in keys], img, txt, {"arch": "t", "dim": DIM})


def test_apply_filters_similarity_first_and_across_tables():
    rng = np.random.default_rng(3)
    base = _distinct(4, rng)
    # rows: k0 low-similarity copy of base[0]; k1 good base[0] (must survive: low-sim row never kept);
    # k2 good near-dup of base[0] (dropped); k3 good base[1]
    img = np.stack([base[0], base[0], _near(base[0], rng), base[1]])
    txt = np.stack([_unit(0.1 * base[0] + base[2]), _unit(base[0] + 0.5 * base[3]),
                    _unit(base[0] + 0.5 * base[3]), _unit(base[1] + 0.5 * base[3])])
    cfg = EmbeddingFilterConfig(min_similarity=0.3, dedup_threshold=0.95)
    dedup = NearDuplicateFilter(0.95, DIM)
    t1 = _table(img, txt, ["k0", "k1", "k2", "k3"])
    out, counts = apply_filters(t1, cfg, dedup)
    assert out.column("key").to_pylist() == ["k1", "k3"]
    assert counts == {"low_similarity": 1, "near_duplicate": 1}
    assert out.schema.metadata == t1.schema.metadata
    # second table: a copy of base[1] is a duplicate of the first table's k3; base[2] is new
    t2 = _table(np.stack([base[1], base[2]]), np.stack([base[1], base[2]]), ["k4", "k5"])
    out2, counts2 = apply_filters(t2, cfg, dedup)
    assert out2.column("key").to_pylist() == ["k5"] and counts2 == {"low_similarity": 0, "near_duplicate": 1}
    # similarity only; nothing dropped returns the table as is; empty tables are fine
    out3, counts3 = apply_filters(t2, EmbeddingFilterConfig(min_similarity=0.3))
    assert out3 is t2 and counts3 == {"low_similarity": 0}
    empty = t1.slice(0, 0)
    assert apply_filters(empty, cfg)[1] == {"low_similarity": 0, "near_duplicate": 0}
    with pytest.raises(ValueError, match="threshold"):
        apply_filters(t1, cfg, NearDuplicateFilter(0.9, DIM))
