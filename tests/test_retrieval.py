"""Held-out CLIP scores: recall@k against its chance level, and zero-shot colour / shape."""

from __future__ import annotations

import numpy as np
import pytest

from unclip.data.shapes import COLORS, SHAPES, parse_caption
from unclip.eval.retrieval import recall_at_k, zero_shot_attributes

CAPTIONS = ["a red circle", "a large blue star at the top", "a green square left of a red star",
            "a white triangle on the left", "not a shapes caption"]


def attribute_encoder(shape_weight: float):
    """Text embeddings that hold colour (one-hot) and, scaled by ``shape_weight``, shape."""
    colors = list(COLORS)

    def encode(texts):
        out = np.zeros((len(texts), len(colors) + len(SHAPES)))
        for i, t in enumerate(texts):
            obj = parse_caption(t)["objects"][0]
            out[i, colors.index(obj["color"])] = 1.0
            out[i, len(colors) + SHAPES.index(obj["shape"])] = shape_weight
        return out
    return encode


def test_zero_shot_reads_what_the_embedding_holds():
    singles = [0, 1, 3]
    full = attribute_encoder(1.0)
    images = np.zeros((len(CAPTIONS), len(COLORS) + len(SHAPES)))
    images[singles] = full([CAPTIONS[i] for i in singles])
    m = zero_shot_attributes(images, CAPTIONS, full)
    assert m["zeroshot_images"] == 3  # the pair and the foreign caption are left out
    assert m["zeroshot_shape"] == 1.0 and m["zeroshot_color"] == 1.0
    assert m["zeroshot_shape_chance"] == pytest.approx(1 / len(SHAPES))
    assert m["zeroshot_color_chance"] == pytest.approx(1 / len(COLORS))
    # image embeddings without shape: colour is still read, shape falls to the first candidate
    blind = images.copy()
    blind[:, len(COLORS):] = 0.0
    m = zero_shot_attributes(blind, CAPTIONS, full)
    assert m["zeroshot_color"] == 1.0 and m["zeroshot_shape"] == pytest.approx(1 / 3)  # the circle
    assert zero_shot_attributes(images, ["not a shapes caption"], full) == {}


def test_recall_counts_equal_captions_as_hits_and_reports_chance():
    captions = ["a", "b", "a", "c"]
    emb = np.eye(4)
    m = recall_at_k(emb, emb[[2, 1, 0, 3]], captions, ks=(1,))
    assert m["recall_at_1"] == 1.0  # image 0 retrieves text 2, whose caption is also "a"
    assert m["chance_at_1"] == pytest.approx((2 / 4 + 1 / 4 + 2 / 4 + 1 / 4) / 4)
