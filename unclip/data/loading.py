"""Decoded training samples from (filtered) shards, and the deterministic train / held-out split."""

from __future__ import annotations

import hashlib
import io
from typing import Any, Container, Iterator

import numpy as np
from PIL import Image

from unclip.data.shards import RawSample, iter_shard


def is_holdout(key: str, fraction: float) -> bool:
    """Same answer for a key in every stage and every run: held-out sets never leak into training."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big")
    return h % 10_000 < fraction * 10_000


def iter_samples(shard: str, image_size: int | None = None, split: str = "all",
                 holdout_fraction: float = 0.0,
                 keys: Container[str] | None = None) -> Iterator[tuple[RawSample, dict[str, Any]]]:
    """(sample, row {key, caption, image (H, W, 3) uint8}) for each sample of a shard that decodes,
    is in ``split`` ("train", "holdout" or "all", by the key hash every stage uses) and, when
    ``keys`` is given, has its key there; images resized square to ``image_size`` when given."""
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split must be train, holdout or all, got {split!r}")
    for item in iter_shard(shard):
        if not isinstance(item, RawSample) or item.image_bytes is None:
            continue
        if keys is not None and item.key not in keys:
            continue
        if split != "all" and is_holdout(item.key, holdout_fraction) != (split == "holdout"):
            continue
        try:
            img = Image.open(io.BytesIO(item.image_bytes)).convert("RGB")
            caption = item.caption() or ""
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        yield item, {"key": item.key, "caption": caption, "image": np.asarray(img, dtype=np.uint8)}


def iter_decoded(shard: str, image_size: int | None = None, split: str = "all",
                 holdout_fraction: float = 0.0) -> Iterator[dict[str, Any]]:
    """Rows {key, caption, image (H, W, 3) uint8} of a filtered shard, optionally resized square.

    ``split`` is "train", "holdout" or "all". Samples that do not decode are skipped (the filter
    stage has already counted and removed them; this only guards against unfiltered input).
    """
    for _, row in iter_samples(shard, image_size, split, holdout_fraction):
        yield row
