"""A small pre-LayerNorm causal Transformer shared by the diffusion prior and the AR prior.

Written on ``F.scaled_dot_product_attention`` so one boolean mask can combine the causal structure
with per-sample padding of the caption tokens (``nn.TransformerEncoderLayer`` takes them as two
masks and switches to a nested-tensor fast path in eval mode that zeroes padded outputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_heads(width: int, heads: int) -> None:
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        check_heads(width, heads)
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Blocks + final LayerNorm; ``forward(x, key_valid)`` with ``key_valid`` (B, S) bool.

    A key that is not valid gets exactly zero attention weight from every query, so padded
    positions change nothing at the valid ones. Every query also attends to itself: a padded
    query then has a key (no fully masked row, whose softmax some kernels turn into NaN that
    would reach the valid positions through the values) and its own output stays unread."""

    def __init__(self, width: int, layers: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, dropout=dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        s = x.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()[None, None]
        if key_valid is not None:
            eye = torch.eye(s, dtype=torch.bool, device=x.device)[None, None]
            mask = mask & (key_valid[:, None, None, :] | eye)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ln(x)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def check_text(text_tokens: torch.Tensor, text_mask: torch.Tensor, text_width: int,
               max_text_len: int, who: str) -> None:
    """Shapes of the caption token encodings, with an error that names what is wrong."""
    if text_tokens.ndim != 3 or text_tokens.shape[-1] != text_width:
        raise ValueError(f"{who}: text_tokens must be (B, L, {text_width}), got {tuple(text_tokens.shape)}")
    if text_tokens.shape[1] < 1:
        raise ValueError(f"{who}: text_tokens have no positions; the null caption needs one")
    if text_tokens.shape[1] > max_text_len:
        raise ValueError(f"{who}: {text_tokens.shape[1]} caption tokens, the model takes at most "
                         f"{max_text_len} (max_text_len)")
    if text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(f"{who}: text_mask must be {tuple(text_tokens.shape[:2])}, "
                         f"got {tuple(text_mask.shape)}")


def null_caption(text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor,
                 null: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the dropped rows' caption (B, n, W) by one ``null`` token at position 0 and mask the
    other n - 1 positions: the unconditional branch must not depend on the padded length n."""
    d = drop.bool().view(-1, 1).to(mask.device)
    first = torch.zeros_like(mask, dtype=torch.bool)
    first[:, 0] = True
    text = torch.where(d[..., None], null.to(text.dtype).expand_as(text), text)
    return text, torch.where(d, first, mask.bool())
