"""The prior stage's input: embedding rows split into training and held-out by key, and the
statistics the prior needs from the training rows.

Kept free of torch / open_clip imports: Ray Data tasks import this module in fresh worker
processes, and on a small machine that import is most of a task's cost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unclip.data.loading import is_holdout
from unclip.embeddings import io as eio

COLUMNS = ["key", "caption", "image_embedding", "text_embedding"]


def read_split(batch: dict[str, np.ndarray], split: str, fraction: float,
               raw: bool = False) -> dict[str, np.ndarray]:
    """Ray Data task: the rows of some embedding files on one side of the held-out split; with
    ``raw`` the image embeddings as CLIP projected them (unit row x the embed stage's norm)."""
    if split not in ("train", "holdout"):
        raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
    caps: list[str] = []
    zi, zt = [], []
    dim = 0
    for uri in batch["uri"]:
        table = eio.read_file(str(uri), None if raw else COLUMNS)
        dim = table.schema.field("image_embedding").type.list_size
        keep = np.array([is_holdout(k, fraction) == (split == "holdout")
                         for k in table.column("key").to_pylist()], dtype=bool)
        if not keep.any():
            continue
        caps.extend(c or "" for c, k in zip(table.column("caption").to_pylist(), keep) if k)
        zi.append(eio.image_matrix(table, str(uri), raw)[keep])
        zt.append(eio.matrix(table, "text_embedding")[keep])
    empty = np.zeros((0, dim), np.float32)
    return {"caption": np.array(caps, dtype=object),
            "image_embedding": np.concatenate(zi) if zi else empty,
            "text_embedding": np.concatenate(zt) if zt else empty}


def split_dataset(files: list[str], split: str, fraction: float, raw: bool = False):
    """A Ray Dataset of one side of the split (one read task per embedding file)."""
    import ray

    return ray.data.from_items([{"uri": u} for u in files], override_num_blocks=len(files)) \
        .map_batches(read_split, batch_size=1,
                     fn_kwargs={"split": split, "fraction": fraction, "raw": raw})


def read_holdout(files: list[str], fraction: float, limit: int, raw: bool = False) -> dict[str, Any]:
    """Up to ``limit`` held-out rows, read on the driver file by file (stops once it has enough)."""
    caps: list[str] = []
    zi, zt = [], []
    for uri in files:
        part = read_split({"uri": np.array([uri])}, "holdout", fraction, raw)
        caps.extend(part["caption"].tolist())
        zi.append(part["image_embedding"])
        zt.append(part["text_embedding"])
        if len(caps) >= limit:
            break
    return {"captions": caps[:limit], "image": np.concatenate(zi)[:limit],
            "text": np.concatenate(zt)[:limit]}


def train_statistics(batches) -> dict[str, Any]:
    """One streaming pass over numpy batches: row count, mean z_i, mean per-dim variance of z_i,
    and every z_i . z_t (the AR prior's similarity-token quantiles; 4 MB per million rows)."""
    n, s, sq, sims = 0, None, None, []
    for b in batches:
        zi = np.asarray(b["image_embedding"], np.float64)
        if not len(zi):
            continue
        n += len(zi)
        s = zi.sum(0) if s is None else s + zi.sum(0)
        sq = (zi ** 2).sum(0) if sq is None else sq + (zi ** 2).sum(0)
        sims.append(np.sum(zi * np.asarray(b["text_embedding"], np.float64), axis=1))
    if n < 2:
        raise ValueError(f"prior: only {n} training rows after the held-out split")
    mean = s / n
    var = np.maximum(sq / n - mean ** 2, 0.0)
    return {"n": n, "mean": mean.astype(np.float32), "per_dim_variance": float(var.mean()),
            "sims": np.concatenate(sims)}
