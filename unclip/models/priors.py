"""The two priors behind one factory: ``prior.kind`` names the model, and the AR prior's PCA and
similarity-bucket buffers come from the pca stage (or from a checkpoint)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

KINDS = ("diffusion", "autoregressive")


def build_model(kind: str, model_cfg: dict[str, Any], pca_folder: str | None = None,
                sim_edges: np.ndarray | None = None) -> torch.nn.Module:
    if kind == "diffusion":
        from unclip.models.prior import DiffusionPrior

        return DiffusionPrior(model_cfg)
    if kind == "autoregressive":
        from unclip.embeddings.pca import PCA
        from unclip.models.ar_prior import ARPrior

        if pca_folder is None or sim_edges is None:
            return ARPrior(model_cfg)  # buffers come from a checkpoint
        return ARPrior.from_pca(model_cfg, PCA.load(pca_folder), sim_edges)
    raise ValueError(f"prior.kind must be one of {KINDS}, got {kind!r}")


def sample(model: torch.nn.Module, kind: str, sampling: dict[str, Any], tokens: torch.Tensor,
           mask: torch.Tensor, z_t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    s = dict(sampling)
    if kind == "autoregressive" and "sim_quantile" in s:
        s["sim_quantile"] = tuple(s["sim_quantile"])
    return model.sample(tokens, mask, z_t, generator=generator, **s)
