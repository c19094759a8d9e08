"""A small pre-LayerNorm causal Transformer shared by the diffusion prior and the AR prior.

Written on ``F.scaled_dot_product_attention`` so one boolean mask can combine the causal structure
with per-sample padding of the caption tokens (``nn.TransformerEncoderLayer`` takes them as two
masks and switches to a nested-tensor fast path in eval mode that zeroes padded outputs).

Incremental decoding (the AR prior's sampler) passes a :class:`KVCache`: each call then feeds only
the new positions, whose keys and values are appended to the cache, and attends to every cached
one, so a sequence of n tokens costs n one-position forwards instead of n forwards of growing
prefixes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: "KVCache | None" = None,
                layer: int = 0) -> torch.Tensor:
        """``mask`` (B or 1, 1, s, keys); with ``cache``, x holds the new positions only and the
        keys are the cached ones followed by these."""
        b, s, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, w))
        return x + self.mlp(self.ln2(x))


class KVCache:
    """Keys and values of every layer for the positions decoded so far, and which of them are
    valid keys (caption padding is not), for incremental decoding.

    The buffers are allocated on the first write to ``max_len`` positions, in the device and dtype
    of the keys (so autocast's bfloat16 stays bfloat16): a step writes its slice in place instead
    of concatenating, which would copy the whole prefix every step. Each batch row is a sequence
    of its own (the conditional and unconditional branches of guidance are separate rows)."""

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = int(max_len)
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None

    def append_valid(self, key_valid: torch.Tensor) -> torch.Tensor:
        """Record the validity (B, s) of ``s`` new positions; the validity of all keys so far."""
        b, s = key_valid.shape
        end = self.length + s
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions, allocated for {self.max_len}")
        if self.valid is None:
            self.valid = torch.zeros(b, self.max_len, dtype=torch.bool, device=key_valid.device)
        self.valid[:, self.length:end] = key_valid
        return self.valid[:, :end]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, H, s, D) keys and values of ``layer`` after the cached ones; all of
        that layer's keys and values so far (views of the buffers)."""
        end = self.length + k.shape[2]
        if layer == len(self.keys):
            b, h, _, d = k.shape
            self.keys.append(k.new_empty(b, h, self.max_len, d))
            self.values.append(v.new_empty(b, h, self.max_len, d))
        kb, vb = self.keys[layer], self.values[layer]
        kb[:, :, self.length:end] = k
        vb[:, :, self.length:end] = v
        return kb[:, :, :end], vb[:, :, :end]


def attention_mask(start: int, s: int, key_valid: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """Boolean mask (B or 1, 1, s, start + s) of queries at positions start..start+s-1: causal,
    invalid keys masked, and each query's own key always kept (see :class:`CausalTransformer`)."""
    q = torch.arange(start, start + s, device=device)[:, None]
    k = torch.arange(start + s, device=device)[None, :]
    mask = (k <= q)[None, None]
    if key_valid is not None:
        mask = mask & (key_valid[:, None, None, :] | (k == q)[None, None])
    return mask


class CausalTransformer(nn.Module):
    """Blocks + final LayerNorm; ``forward(x, key_valid)`` with ``key_valid`` (B, S) bool.

    A key that is not valid gets exactly zero attention weight from every query, so padded
    positions change nothing at the valid ones. Every query also attends to itself: a padded
    query then has a key (no fully masked row, whose softmax some kernels turn into NaN that
    would reach the valid positions through the values) and its own output stays unread.

    With ``cache``, ``x`` (B, s, W) and ``key_valid`` (B, s) are the positions after the cached
    ones; the output is theirs, computed as if the whole sequence had been fed."""

    def __init__(self, width: int, layers: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, dropout=dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        # activation checkpointing (unclip.training.sharding.set_activation_checkpointing): each
        # block's activations recomputed in the backward pass; not part of the model's config
        self.checkpointing = False

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        b, s = x.shape[:2]
        start = 0
        if cache is not None:
            start = cache.length
            if key_valid is None:
                key_valid = torch.ones(b, s, dtype=torch.bool, device=x.device)
            key_valid = cache.append_valid(key_valid)
        mask = attention_mask(start, s, key_valid, x.device)
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if recompute:  # non-reentrant: works with FSDP's hooks and inputs without grad
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask, cache, i)
        if cache is not None:
            cache.length = start + s
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
