"""Optional embedding-space filters: image-text agreement and near-duplicate images, each counted.

Both work on the unit-norm CLIP embeddings of our Parquet files, so a dot product is the cosine
similarity. They run after embedding because only then is the similarity known (LAION itself was
filtered at CLIP image-text cosine 0.28 with ViT-B/32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from unclip.embeddings import io as eio
from unclip.options import option, validate


def similarity_filter(image: np.ndarray, text: np.ndarray, threshold: float) -> np.ndarray:
    """Keep mask: False where cosine(image, text) < threshold (rows assumed unit norm)."""
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and text {text.shape} must be equal (n, d) arrays")
    sim = np.einsum("nd,nd->n", image.astype(np.float32, copy=False), text.astype(np.float32, copy=False))
    return sim >= threshold


class NearDuplicateFilter:
    """Streaming near-duplicate removal by image-embedding cosine similarity.

    Batches are fed in order; a vector is dropped if its cosine with any earlier *kept* vector is
    >= ``threshold`` (so the first of each group survives, across batch boundaries too). Kept
    vectors are stored in fixed ``(block, dim)`` float32 blocks and compared with blockwise matrix
    products, so memory is O(kept * dim + block^2), never an n x n matrix. Time is
    O(n * kept * dim): fine for the millions of rows of one run on one machine; at LAION scale
    (billions) one would use an approximate nearest-neighbour index (e.g. faiss IVF/HNSW range
    search) instead of this exact scan.
    """

    def __init__(self, threshold: float, dim: int, block: int = 4096):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        self.threshold = float(threshold)
        self.dim = int(dim)
        self.block = int(block)
        self._blocks: list[np.ndarray] = []  # full (block, dim) blocks of kept vectors
        self._tail = np.empty((self.block, self.dim), np.float32)
        self._fill = 0
        self.seen = 0
        self.kept = 0

    @property
    def dropped(self) -> int:
        return self.seen - self.kept

    def _store(self, vecs: np.ndarray) -> None:
        for v in np.array_split(vecs, range(self.block - self._fill, len(vecs), self.block)):
            self._tail[self._fill:self._fill + len(v)] = v
            self._fill += len(v)
            if self._fill == self.block:
                self._blocks.append(self._tail)
                self._tail = np.empty((self.block, self.dim), np.float32)
                self._fill = 0

    def update(self, batch: np.ndarray) -> np.ndarray:
        """Keep mask for ``batch`` (n, dim); kept rows become references for later rows."""
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"expected an array of shape (n, {self.dim}), got {batch.shape}")
        keep = np.ones(len(batch), bool)
        for start in range(0, len(batch), self.block):
            chunk = batch[start:start + self.block]
            alive = np.ones(len(chunk), bool)
            for ref in [*self._blocks, self._tail[:self._fill]]:
                if len(ref):
                    alive &= (chunk @ ref.T).max(axis=1) < self.threshold
            # Within the chunk: greedy in order, each surviving row suppresses its later duplicates.
            idx = np.flatnonzero(alive)
            sims = chunk[idx] @ chunk[idx].T
            live = np.ones(len(idx), bool)
            for i in range(len(idx)):
                if live[i]:
                    live[i + 1:] &= sims[i, i + 1:] < self.threshold
            alive[idx[~live]] = False
            keep[start:start + len(chunk)] = alive
            self._store(chunk[alive])
        self.seen += len(batch)
        self.kept += int(keep.sum())
        return keep


@dataclass
class EmbeddingFilterConfig:
    """Thresholds of the optional filters; None turns a filter off."""

    # drop pairs with image-text cosine below this
    min_similarity: float | None = option(None, ge=-1, le=1)
    # drop images with cosine >= this to an earlier kept one
    dedup_threshold: float | None = option(None, ge=-1, le=1)

    def __post_init__(self) -> None:
        validate(self)


def apply_filters(table: pa.Table, cfg: EmbeddingFilterConfig,
                  dedup: NearDuplicateFilter | None = None) -> tuple[pa.Table, dict[str, int]]:
    """Filter one embedding table; return it (schema metadata kept) and drops per reason.

    Similarity runs first so a mismatched pair never becomes the kept representative of a group
    of duplicates. Pass the same ``dedup`` for every table of a folder to dedup across files; with
    ``dedup=None`` and a ``dedup_threshold`` duplicates are only removed within this table.
    """
    keep = np.ones(table.num_rows, bool)
    counts: dict[str, int] = {}
    image = eio.matrix(table, "image_embedding")
    if cfg.min_similarity is not None:
        keep = similarity_filter(image, eio.matrix(table, "text_embedding"), cfg.min_similarity)
        counts["low_similarity"] = int((~keep).sum())
    if cfg.dedup_threshold is not None:
        if dedup is None:
            dedup = NearDuplicateFilter(cfg.dedup_threshold, image.shape[1])
        elif dedup.threshold != cfg.dedup_threshold:
            raise ValueError(f"dedup filter threshold {dedup.threshold} != config {cfg.dedup_threshold}")
        idx = np.flatnonzero(keep)
        unique = dedup.update(image[idx])
        keep[idx[~unique]] = False
        counts["near_duplicate"] = int((~unique).sum())
    return (table if keep.all() else table.filter(pa.array(keep))), counts
