"""Image-to-text retrieval recall, with the chance level it must beat.

Synthetic captions repeat ("a red circle" describes many images), so a retrieved caption counts as
right when its *text* equals the query image's caption; chance is computed with the same rule.
"""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Callable, Sequence

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


def zero_shot_attributes(image_emb: np.ndarray, captions: Sequence[str],
                         encode_text: Callable[[list[str]], np.ndarray]) -> dict[str, float]:
    """Zero-shot colour and shape of single-object images of the shapes data set, beside chance.

    Each image's own caption is rewritten with every colour (shape) the data set draws; the
    candidate whose text embedding is closest to the image's is its reading. Recall mixes all
    attributes; this says which one the image embedding lacks (the decoder can only draw what it
    holds). Empty for captions that are not single-object shapes captions.
    """
    from unclip.data.shapes import COLORS, SHAPES, parse_caption

    colors = list(COLORS)
    rows: list[tuple[int, str, list[str], int]] = []
    for i, caption in enumerate(captions):
        try:
            objects = parse_caption(caption)["objects"]
        except ValueError:
            continue
        if len(objects) != 1:
            continue
        color, shape = objects[0]["color"], objects[0]["shape"]
        phrase = f"{color} {shape}"
        rows.append((i, "shape", [caption.replace(phrase, f"{color} {s}", 1) for s in SHAPES],
                     SHAPES.index(shape)))
        rows.append((i, "color", [caption.replace(phrase, f"{c} {shape}", 1) for c in colors],
                     colors.index(color)))
    if not rows:
        return {}
    texts = sorted({t for row in rows for t in row[2]})
    where = {t: j for j, t in enumerate(texts)}
    emb = encode_text(texts)
    hits: dict[str, list[bool]] = {"shape": [], "color": []}
    for i, attribute, candidates, true in rows:
        sims = emb[[where[t] for t in candidates]] @ image_emb[i]
        hits[attribute].append(int(np.argmax(sims)) == true)
    return {"zeroshot_shape": float(np.mean(hits["shape"])), "zeroshot_shape_chance": 1 / len(SHAPES),
            "zeroshot_color": float(np.mean(hits["color"])), "zeroshot_color_chance": 1 / len(colors),
            "zeroshot_images": float(len(hits["shape"]))}
