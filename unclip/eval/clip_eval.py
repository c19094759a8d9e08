"""Held-out score of a CLIP being trained: image->text recall@1/@5 beside its chance level (and, on
shapes captions, zero-shot colour and shape of single objects)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unclip.devices import model_device, to_device, to_numpy
from unclip.eval.retrieval import recall_at_k, zero_shot_attributes
from unclip.models.clip import to_model_input


def heldout_retrieval(model: torch.nn.Module, holdout: dict[str, Any], batch_size: int = 256) -> dict[str, float]:
    """Held-out image->text recall@1/@5 (text-level) and the chance level of each; on synthetic
    shapes captions also zero-shot colour and shape of single objects."""
    from open_clip.tokenizer import SimpleTokenizer

    model.eval()
    # an imported (transformers) CLIP brings its own tokenizer (unclip.interop.hf_clip)
    tok = getattr(model, "tokenize", None) or SimpleTokenizer(context_length=int(model.context_length))
    device = model_device(model)  # a GPU worker's model: inputs go there, outputs back

    def encode_text(captions: list[str]) -> np.ndarray:
        return to_numpy(torch.cat([F.normalize(model.encode_text(to_device(tok(captions[i:i + batch_size]), device)),
                                               dim=-1) for i in range(0, len(captions), batch_size)]))

    img = []
    with torch.no_grad():
        for i in range(0, len(holdout["captions"]), batch_size):
            img.append(F.normalize(model.encode_image(to_device(to_model_input(
                holdout["images"][i:i + batch_size]), device)), dim=-1))
        image_emb = to_numpy(torch.cat(img))
        r = recall_at_k(image_emb, encode_text(list(holdout["captions"])), holdout["captions"])
        r.update(zero_shot_attributes(image_emb, holdout["captions"], encode_text))
    model.train()
    return {f"val_{k}": v for k, v in r.items()}
