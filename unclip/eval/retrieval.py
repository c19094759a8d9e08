"""Image-to-text retrieval recall, with the chance level it must beat.

Synthetic captions repeat ("a red circle" describes many images), so a retrieved caption counts as
right when its *text* equals the query image's caption; chance is computed with the same rule.
"""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Sequence

import numpy as np


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, captions: Sequence[str],
                ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of image->text over the given pairs (row i of both is one sample)."""
    sims = image_emb @ text_emb.T
    order = np.argsort(-sims, axis=1)
    caps = np.asarray(captions, dtype=object)
    hits = caps[order] == caps[:, None]
    counts = Counter(captions)
    n = len(captions)
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall_at_{k}"] = float(hits[:, :k].any(axis=1).mean())
        out[f"chance_at_{k}"] = float(np.mean([1 - comb(n - counts[c], k) / comb(n, k) for c in captions]))
    return out
