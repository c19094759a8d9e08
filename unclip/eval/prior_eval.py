"""Held-out score of a prior: how close its samples come to the true z_i, beside the two trivial
baselines a prior must beat (z_t itself and the mean training z_i)."""

from __future__ import annotations

from typing import Any

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
    cos = mean_cosine(z, holdout["image"])
    base_text = mean_cosine(holdout["text"], holdout["image"])
    base_mean = mean_cosine(holdout["mean_train_image"], holdout["image"])
    return {"val_cosine": cos, "val_baseline_text": base_text, "val_baseline_mean": base_mean,
            "val_delta": cos - max(base_text, base_mean)}
