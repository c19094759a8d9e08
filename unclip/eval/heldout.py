"""The evaluation set read from filtered shards: distinct held-out captions (with their ground-truth
scenes when the data has them) and real images from both sides of the split for the FD."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from unclip.data.loading import is_holdout
from unclip.data.shapes import Scene
from unclip.data.shards import RawSample, iter_shard
from unclip.eval.decoding import scene_of


@dataclass
class HeldOut:
    captions: list[str]                   # distinct held-out captions, in shard order
    scenes: list[Scene] | None            # their ground truth; None when the data has none
    real_holdout: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8 each
    real_train: list[np.ndarray] = field(default_factory=list)
    samples_seen: int = 0                 # held-out samples read (before de-duplication)


def _decode(data: bytes) -> np.ndarray | None:
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ValueError):
        return None


def held_out_set(shards: Sequence[str], fraction: float, n_one: int, n_two: int, n_captions: int,
                 n_real: int) -> HeldOut:
    """Read shards until there are enough captions and ``n_real`` real images on each side.

    With a ground truth on every held-out sample (the shapes generator), the captions are
    ``n_one`` one-object then ``n_two`` two-object scenes; otherwise the first ``n_captions``
    distinct held-out captions. Either way no caption repeats.
    """
    ones: list[Scene] = []
    twos: list[Scene] = []
    plain: list[str] = []
    seen: set[str] = set()
    all_scenes = True
    out = HeldOut([], None)
    for shard in shards:
        for item in iter_shard(shard):
            if not isinstance(item, RawSample) or item.image_bytes is None:
                continue
            holdout = is_holdout(item.key, fraction)
            real = out.real_holdout if holdout else out.real_train
            if len(real) < n_real and (img := _decode(item.image_bytes)) is not None:
                real.append(img)
            if not holdout:
                continue
            try:
                caption = item.caption()
            except UnicodeDecodeError:
                continue
            if not caption:
                continue
            out.samples_seen += 1
            scene = scene_of(item.meta())
            all_scenes = all_scenes and scene is not None
            if caption in seen:
                continue
            seen.add(caption)
            if len(plain) < n_captions:
                plain.append(caption)
            if scene is not None:
                (ones if len(scene.objects) == 1 else twos).append(scene)
        enough = (len(ones) >= n_one and len(twos) >= n_two) if all_scenes else len(plain) >= n_captions
        if enough and min(len(out.real_holdout), len(out.real_train)) >= n_real:
            break
    if all_scenes and out.samples_seen:
        out.scenes = ones[:n_one] + twos[:n_two]
        out.captions = [s.caption for s in out.scenes]
    else:
        out.captions = plain
    return out
