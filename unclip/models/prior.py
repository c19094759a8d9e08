"""The diffusion prior P(z_i | y): a causal decoder-only Transformer that predicts the clean CLIP
image embedding (x0-prediction, MSE), as in Ramesh et al. 2022, sec. 2.2.

The sequence is [caption token encodings, z_t, timestep embedding, noised z_i, query]; the output
at the final (query) token is the prediction of z_i. The caption (tokens and z_t) is replaced by
learned null tokens ``cond_drop_prob`` of the time (10% in the paper) so that sampling can use
classifier-free guidance: one null token at position 0 (``null_text[0]``), the other caption
positions masked, and ``null_zt`` for z_t, so the unconditional branch does not depend on the
batch's padded caption length (training pads to the batch's longest caption, the cascade to the
whole context). Priors trained before this change had a different null branch (``null_text[:n]``,
all n padded positions valid): guided, they sample differently now; the state dict keys and
shapes are unchanged (rows of ``null_text`` after the first are unused). Sampling draws ``num_candidates`` embeddings per caption and keeps the
one with the largest dot product with z_t (k=2 in the paper).

The model works in a scaled space ``x = embed_scale * (z_i - embed_mean)``: unit-norm embeddings
have per-dim values of ~1/sqrt(dim), badly scaled against unit Gaussian noise (the paper scales by
17.2, no centring). Scale and mean are part of the model's config, so a checkpoint always decodes
its own space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unclip import checkpoint
from unclip.diffusion import SAMPLERS, DiffusionConfig, GaussianDiffusion, guide
from unclip.diffusion import sample as diffusion_sample
from unclip.diffusion.noise import Generators, repeat_rows
from unclip.models.transformer import (CausalTransformer, check_heads, check_text, null_caption,
                                       timestep_embedding)
from unclip.options import option, validate

KIND = "diffusion_prior"
SCALE_RULES = ("sqrt_dim", "unit_variance")


@dataclass
class PriorConfig:
    dim: int                      # CLIP embedding dimension
    text_width: int               # width of the CLIP text tower's token states
    max_text_len: int = option(77, ge=1)  # caption tokens (the CLIP context length)
    width: int = option(256, ge=1)
    layers: int = option(4, ge=1)
    heads: int = option(4, ge=1)
    dropout: float = option(0.0, ge=0, lt=1)
    embed_scale: float = option(1.0, gt=0)  # x = embed_scale * (z_i - embed_mean) (resolve_embed_scale)
    embed_mean: list[float] | None = None   # the training mean of z_i when centring, else None
    # share of training samples whose caption is replaced by null tokens
    cond_drop_prob: float = option(0.1, ge=0, le=1)
    # The diffusion process; prediction_type is always "sample" (x0) and clip_sample off.
    diffusion: dict[str, Any] = field(default_factory=lambda: {
        "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})

    def __post_init__(self) -> None:
        validate(self)
        check_heads(self.width, self.heads)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PriorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown diffusion prior option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig.from_dict({**self.diffusion, "prediction_type": "sample",
                                          "clip_sample": False, "learn_variance": False})


@dataclass(frozen=True)
class PriorSampling:
    """How a diffusion prior is sampled: the paper's 64 strided DDPM steps, k=2, no guidance."""

    sampler: str = option("ddpm", choices=SAMPLERS)
    steps: int = option(64, ge=1)
    guidance_scale: float = option(1.0, ge=0)  # classifier-free guidance on x0 (1.0 = off)
    num_candidates: int = option(2, ge=1)      # draws per caption, re-ranked by z_i . z_t

    def __post_init__(self) -> None:
        validate(self)


def resolve_embed_scale(rule: float | str, dim: int, per_dim_variance: float | None = None) -> float:
    """A number, ``sqrt_dim`` (unit RMS per dimension for unit vectors) or ``unit_variance``
    (unit per-dimension variance about the mean, from the training embeddings)."""
    if isinstance(rule, (int, float)):
        if rule <= 0:
            raise ValueError(f"embed_scale must be positive, got {rule}")
        return float(rule)
    if rule == "sqrt_dim":
        return math.sqrt(dim)
    if rule == "unit_variance":
        if not per_dim_variance or per_dim_variance <= 0:
            raise ValueError("embed_scale 'unit_variance' needs the training embeddings' variance")
        return float(1.0 / math.sqrt(per_dim_variance))
    raise ValueError(f"embed_scale must be a number or one of {SCALE_RULES}, got {rule!r}")


class DiffusionPrior(nn.Module):
    """x0-predicting causal Transformer over [text tokens, z_t, t, x_t, query]."""

    def __init__(self, cfg: PriorConfig | Mapping[str, Any]):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, PriorConfig) else PriorConfig.from_dict(cfg)
        c = self.cfg
        self.text_proj = nn.Linear(c.text_width, c.width)
        self.zt_proj = nn.Linear(c.dim, c.width)
        self.x_proj = nn.Linear(c.dim, c.width)
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.query = nn.Parameter(torch.randn(c.width) * 0.02)
        self.null_text = nn.Parameter(torch.randn(c.max_text_len, c.width) * 0.02)
        self.null_zt = nn.Parameter(torch.randn(c.width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(c.max_text_len + 4, c.width) * 0.02)
        self.transformer = CausalTransformer(c.width, c.layers, c.heads, c.dropout)
        self.out = nn.Linear(c.width, c.dim)
        self.diffusion = GaussianDiffusion(self.cfg.diffusion_config)

    # ---- the network -----------------------------------------------------------------------

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor, z_t: torch.Tensor,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted clean embedding in the scaled space, (B, dim). ``drop_text`` (B,) bool
        replaces the caption by the null token at position 0 (the rest masked) and z_t by null_zt."""
        c = self.cfg
        check_text(text_tokens, text_mask, c.text_width, c.max_text_len, "DiffusionPrior")
        if x_t.shape[-1] != c.dim or z_t.shape[-1] != c.dim:
            raise ValueError(f"DiffusionPrior: x_t and z_t must have {c.dim} dims, got "
                             f"{tuple(x_t.shape)} and {tuple(z_t.shape)}")
        b, n = text_tokens.shape[:2]
        text = self.text_proj(text_tokens.to(self.x_proj.weight.dtype))
        zt = self.zt_proj(z_t.to(text.dtype) * math.sqrt(c.dim))
        mask = text_mask.bool()
        if drop_text is not None:
            text, mask = null_caption(text, mask, drop_text, self.null_text[0])
            zt = torch.where(drop_text.bool().view(b, 1), self.null_zt.expand(b, -1), zt)
        temb = self.time_mlp(timestep_embedding(t, c.width).to(text.dtype))
        seq = torch.cat([text, zt[:, None], temb[:, None], self.x_proj(x_t.to(text.dtype))[:, None],
                         self.query.expand(b, 1, -1)], dim=1)
        seq = seq + torch.cat([self.pos_embed[:n], self.pos_embed[-4:]])[None]
        valid = torch.cat([mask, torch.ones(b, 4, dtype=torch.bool, device=mask.device)], dim=1)
        return self.out(self.transformer(seq, valid)[:, -1])

    # ---- training --------------------------------------------------------------------------

    def _mean(self, like: torch.Tensor) -> torch.Tensor | float:
        m = self.cfg.embed_mean
        return 0.0 if m is None else torch.tensor(m, dtype=like.dtype, device=like.device)

    def to_latent(self, z_i: torch.Tensor) -> torch.Tensor:
        return (z_i - self._mean(z_i)) * self.cfg.embed_scale

    def from_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings from the scaled (and centred) space."""
        return F.normalize(x.float() / self.cfg.embed_scale + self._mean(x.float()), dim=-1)

    def losses(self, z_i: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
               z_t: torch.Tensor, generator: torch.Generator | None = None,
               net: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Batch-mean x0 MSE (``loss``) with the caption dropped ``cond_drop_prob`` of the time.
        ``net``: the module to call (a DDP wrapper of this one, so gradients are all-reduced)."""
        net = self if net is None else net
        b = z_i.shape[0]
        drop = torch.rand(b, generator=generator).to(z_i.device) < self.cfg.cond_drop_prob
        out = self.diffusion.training_losses(
            lambda x, t: net(x, t, text_tokens, text_mask, z_t, drop), self.to_latent(z_i.float()),
            generator=generator)
        return {"loss": out["loss"].mean()}

    # ---- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor,
               steps: int = PriorSampling.steps, sampler: str = PriorSampling.sampler,
               guidance_scale: float = PriorSampling.guidance_scale,
               num_candidates: int = PriorSampling.num_candidates,
               generator: Generators = None,
               eta: float = 0.0) -> torch.Tensor:
        """Unit-norm image embeddings (B, dim): ``num_candidates`` draws per caption, strided to
        ``steps`` steps, guided by ``guidance_scale``, the one with the largest z_i . z_t kept."""
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        was_training = self.training
        self.eval()
        b, k = z_t.shape[0], int(num_candidates)
        tt, tm, zt = (v.repeat_interleave(k, 0) for v in (text_tokens, text_mask, z_t))
        guided = guidance_scale != 1.0
        if guided:  # one batched pass for the conditional and the unconditional branch
            tt2, tm2, zt2 = torch.cat([tt, tt]), torch.cat([tm, tm]), torch.cat([zt, zt])
            drop = torch.cat([torch.zeros(b * k, dtype=torch.bool), torch.ones(b * k, dtype=torch.bool)])
            drop = drop.to(zt.device)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self(x, t, tt, tm, zt)
            cond, uncond = self(torch.cat([x, x]), torch.cat([t, t]), tt2, tm2, zt2, drop).chunk(2)
            return guide(cond, uncond, guidance_scale)

        x = diffusion_sample(denoise, (b * k, self.cfg.dim), self.cfg.diffusion_config, sampler,
                             steps, repeat_rows(generator, k), device=zt.device, eta=eta)
        self.train(was_training)
        z = self.from_latent(x).view(b, k, -1)
        return rerank(z, z_t)

    # ---- files -----------------------------------------------------------------------------

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        checkpoint.save(folder, self.state_dict(), KIND, self.cfg.to_dict(), extra)

    @classmethod
    def from_checkpoint(cls, folder: str) -> "DiffusionPrior":
        state, meta = checkpoint.load(folder, KIND)
        model = cls(PriorConfig.from_dict(meta["config"]))
        model.load_state_dict(state)
        return model.eval()


def rerank(candidates: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """From (B, k, dim) candidates keep, per caption, the one with the largest dot product with z_t."""
    score = (candidates * F.normalize(z_t.float(), dim=-1)[:, None]).sum(-1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), score.argmax(1)]


def load_prior(folder: str) -> nn.Module:
    """Either prior from its checkpoint folder (the ``kind`` in config.json says which)."""
    kind = checkpoint.read_config(folder).get("kind")
    if kind == KIND:
        return DiffusionPrior.from_checkpoint(folder)
    from unclip.models import ar_prior

    if kind == ar_prior.KIND:
        return ar_prior.ARPrior.from_checkpoint(folder)
    raise checkpoint.CheckpointError(f"{folder}: holds a {kind!r}, not a prior")


def mean_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean row-wise cosine similarity (the prior's validation metric)."""
    a, b = torch.as_tensor(np.array(a, np.float32)), torch.as_tensor(np.array(b, np.float32))
    if a.ndim == 1:
        a = a[None].expand_as(b)
    return float(F.cosine_similarity(a, b, dim=-1).mean())
