"""Training pairs for the decoder: shard samples joined by key with their CLIP image embeddings.

The embed stage writes one Parquet file per shard under the shard's name, so a shard is joined with
its own file alone (nothing global is held in memory, however large the data set). Embedding folders
laid out otherwise (an imported clip-retrieval folder) are joined through a key index of all files.
Images are decoded and resized once, here, to the resolution the model trains at.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from unclip import storage
from unclip.data.loading import iter_samples
from unclip.embeddings import io as eio


NoNormsError = eio.NoNormsError  # raised where raw embeddings are asked of files without norms


def _index(table, where: str, raw: bool) -> dict[str, np.ndarray]:
    return dict(zip(table.column("key").to_pylist(), eio.image_matrix(table, where, raw)))


def _columns(raw: bool) -> list[str] | None:
    # raw: every column (the norm one when present; _index reports its absence)
    return None if raw else ["key", "image_embedding"]


@lru_cache(maxsize=4)
def _all_embeddings(folder: str, raw: bool = False) -> dict[str, np.ndarray]:
    return _index(eio.read_all(folder, _columns(raw)), folder, raw)


def shard_embeddings(shard: str, folder: str, raw: bool = False) -> dict[str, np.ndarray]:
    """key -> image embedding for the samples of ``shard`` (its own Parquet file when there is one):
    unit-norm, or with ``raw`` the CLIP projection as it was (unit row x stored norm)."""
    own = storage.join(folder, eio.part_name(storage.basename(shard)))
    if storage.exists(own):
        return _index(eio.read_file(own, _columns(raw)), own, raw)
    return _all_embeddings(folder, raw)


def iter_paired(shard: str, embeddings: str, image_size: int, split: str = "all",
                holdout_fraction: float = 0.0, with_meta: bool = False,
                raw: bool = False) -> Iterator[dict[str, Any]]:
    """Rows {key, caption, image (S, S, 3) uint8, image_embedding (D,) float32[, meta]}.

    Samples without an embedding (dropped by the embed stage's filters) or that do not decode are
    skipped. ``split`` is "train", "holdout" or "all", by the same key hash as every stage.
    ``meta`` is the sample's JSON (the synthetic data's scene) as a string, "" when absent.
    ``raw``: the embeddings as CLIP projected them, not unit-normalized (see shard_embeddings).
    """
    index = shard_embeddings(shard, embeddings, raw)
    for item, row in iter_samples(shard, image_size, split, holdout_fraction, keys=index):
        row["image_embedding"] = np.asarray(index[item.key], dtype=np.float32)
        if with_meta:
            meta = item.files.get("json")
            row["meta"] = meta.decode("utf-8", "replace") if meta else ""
        yield row


class PairedRows:
    """Ray Data ``flat_map``: one shard -> its decoded, resized rows joined with their embeddings.

    Lives here, not in the stage module, so Ray workers unpickle it without importing torch."""

    def __init__(self, embeddings: str, size: int, split: str, fraction: float, raw: bool = False):
        self.args = (embeddings, size, split, fraction)
        self.raw = raw

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        emb, size, split, frac = self.args
        return [{k: r[k] for k in ("caption", "image", "image_embedding")}
                for r in iter_paired(row["shard"], emb, size, split, frac, raw=self.raw)]
