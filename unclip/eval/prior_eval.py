"""Held-out score of a prior: how close its samples come to the true z_i, beside the two trivial
baselines a prior must beat (z_t itself and the mean training z_i)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unclip.devices import model_device, to_host, to_numpy
from unclip.models.captions import CaptionEncoder
from unclip.models.prior import mean_cosine
from unclip.models.priors import sample


def validate(model: torch.nn.Module, kind: str, sampling: dict[str, Any], encoder: CaptionEncoder,
             holdout: dict[str, Any], seed: int, batch_size: int = 256) -> dict[str, float]:
    """Mean cosine of sampled vs true z_i on held-out captions, and the two baselines."""
    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(holdout["captions"]), batch_size):
        tokens, mask = encoder(holdout["captions"][i:i + batch_size])
        zt = torch.as_tensor(holdout["text"][i:i + batch_size], device=device)
        out.append(to_host(sample(model, kind, sampling, tokens, mask, zt, g)))
    z = to_numpy(torch.cat(out))
    return cosine_scores(z, holdout)


def cosine_scores(z: Any, holdout: dict[str, Any]) -> dict[str, float]:
    """Mean cosine of sampled z_i to the true ones, beside the two baselines a prior must beat."""
    cos = mean_cosine(z, holdout["image"])
    base_text = mean_cosine(holdout["text"], holdout["image"])
    base_mean = mean_cosine(holdout["mean_train_image"], holdout["image"])
    return {"val_cosine": cos, "val_baseline_text": base_text, "val_baseline_mean": base_mean,
            "val_delta": cos - max(base_text, base_mean)}


def caption_inputs(clip: Any, captions: list[str], device: torch.device | str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(raw text embedding, token states, mask) at the CLIP's full context: what an imported
    (Karlo) prior reads, its positions fixed to the context length."""
    emb, states, mask = clip.encode_text_tokens(list(captions), normalize=False)
    return tuple(torch.as_tensor(np.asarray(v)).to(device) for v in (emb, states, mask))


def heldout_loss(model: torch.nn.Module, clip: Any, holdout: dict[str, Any], seed: int,
                 batch_size: int = 256) -> float:
    """An imported prior's mean x0 loss on the held-out rows (caption kept), on timesteps and noise
    seeded by ``seed``: the same draws for every model scored, so a source and its fine-tuned
    result compare directly."""
    device = model_device(model)
    total, n = 0.0, len(holdout["captions"])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                emb, states, mask = caption_inputs(clip, holdout["captions"][i:i + batch_size], device)
                zi = torch.as_tensor(holdout["image"][i:i + batch_size], device=device)
                g = torch.Generator().manual_seed(seed + i)
                total += float(model.losses(zi, states, mask, emb, g, cond_drop_prob=0.0)["loss"]) * len(zi)
    finally:
        model.train(was_training)
    return total / max(1, n)


def validate_imported(model: torch.nn.Module, sampling: dict[str, Any], clip: Any,
                      holdout: dict[str, Any], seed: int, batch_size: int = 256) -> dict[str, float]:
    """:func:`validate` for an imported prior (raw embeddings, the ``unclip`` sampler), with its
    :func:`heldout_loss` (``val_loss``)."""
    device = model_device(model)
    out = []
    for i in range(0, len(holdout["captions"]), batch_size):
        emb, states, mask = caption_inputs(clip, holdout["captions"][i:i + batch_size], device)
        g = torch.Generator().manual_seed(seed + i)
        out.append(to_host(model.sample(states, mask, emb, steps=int(sampling["steps"]),
                                        guidance_scale=float(sampling["guidance_scale"]),
                                        num_candidates=int(sampling.get("num_candidates", 1)),
                                        generator=g)))
    z = to_numpy(torch.cat(out))
    return {**cosine_scores(z, holdout), "val_loss": heldout_loss(model, clip, holdout, seed, batch_size)}
