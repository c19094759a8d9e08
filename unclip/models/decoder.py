"""The unCLIP decoder: a GLIDE-style diffusion UNet conditioned on a CLIP image embedding.

The CLIP image embedding z_i enters twice, as in the paper (Sec. 2.1): projected and *added to the
timestep embedding* (diffusers' ``class_embed_type="projection"``), and projected into four extra
context tokens appended to the caption's token encodings, which every attention layer attends to
(GLIDE's "encoder_kv": the context's keys and values are concatenated to the image's own, diffusers'
``SimpleCrossAttn`` blocks). The caption is optional (``use_caption``). For classifier-free guidance
both conditions can be replaced per sample by learned null embeddings: the trainer drops z_i 10%
and the caption 50% of the time. As in GLIDE, the caption's final token also joins z_i in the
timestep embedding (``caption_in_time``): a global path for the caption beside cross-attention.

The model maps ``(x_t, t, conditioning) -> output``; the diffusion maths lives in
:mod:`unclip.diffusion`, sampling in :mod:`unclip.models.decoder_sampling`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from unclip import checkpoint
from unclip.diffusion import DiffusionConfig
from unclip.options import option, validate

KIND = "decoder"


@dataclass(frozen=True)
class DecoderConfig:
    resolution: int = option(64, ge=4)   # output side in pixels (the paper: 64)
    clip_dim: int = option(1024, ge=1)   # CLIP image embedding width (z_i)
    text_width: int = option(1024, ge=1)  # width of the CLIP text tower's token states
    base_channels: int = option(64, ge=1)  # channels of the first level
    channel_mult: tuple[int, ...] = option((1, 2, 3, 4), ge=1)
    layers_per_block: int = option(2, ge=1)  # residual blocks per level
    # levels (by side in px) with attention over [caption, CLIP tokens]
    attention_resolutions: tuple[int, ...] = option((32, 16, 8), ge=1)
    head_channels: int = option(64, ge=1)  # channels per attention head
    context_dim: int = option(512, ge=1)   # width of the context tokens (caption + 4 CLIP tokens)
    num_clip_tokens: int = option(4, ge=1)  # extra context tokens projected from z_i (the paper: 4)
    use_caption: bool = True             # condition on the caption's token states at all
    # GLIDE also adds the caption's final token state (projected) to the timestep embedding, beside
    # z_i: a global path for the caption besides cross-attention.
    caption_in_time: bool = True
    learn_variance: bool = True          # 6 output channels (mean + variance interpolation)
    dropout: float = option(0.0, ge=0, lt=1)
    norm_groups: int = option(32, ge=1)
    # Space-to-depth before the UNet (and back after): 2 runs a 32 px decoder at 16 px with 12
    # input channels, 4x less convolution work. 1 (the paper) on accelerators.
    patch_size: int = option(1, choices=(1, 2, 4))

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecoderConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown decoder model option(s) {unknown}; known: {sorted(known)}")
        for k in ("channel_mult", "attention_resolutions"):
            if k in d:
                d[k] = tuple(int(v) for v in d[k])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def validate(self) -> None:
        side = self.resolution
        if side < 4 or side & (side - 1):
            raise ValueError(f"decoder resolution must be a power of two >= 4, got {side}")
        if self.patch_size not in (1, 2, 4) or self.patch_size >= side:
            raise ValueError(f"patch_size must be 1, 2 or 4 and below the resolution, got {self.patch_size}")
        if side // self.patch_size >> (len(self.channel_mult) - 1) < 1:
            raise ValueError(f"{len(self.channel_mult)} levels halve {side} px below 1 px; "
                             "use fewer channel_mult entries")
        sides = _level_sides(self)
        for i, m in enumerate(self.channel_mult):
            ch = self.base_channels * m
            if ch % self.norm_groups:
                raise ValueError(f"level width {ch} is not divisible by norm_groups {self.norm_groups}")
            attends = sides[i] in self.attention_resolutions or i == len(sides) - 1  # (mid block)
            if attends and ch % self.head_channels:
                raise ValueError(f"level width {ch} is not divisible by head_channels {self.head_channels}")


def _level_sides(cfg: DecoderConfig) -> list[int]:
    """Side in pixels of the feature maps at each level (the first is resolution / patch_size)."""
    return [cfg.resolution // cfg.patch_size >> i for i in range(len(cfg.channel_mult))]


def build_unet(cfg: DecoderConfig):
    """GLIDE's layout in diffusers blocks: resblocks with scale-shift norm and resampling resblocks,
    attention with the context's keys/values added at ``attention_resolutions`` and in the middle."""
    from diffusers import UNet2DConditionModel

    cfg.validate()
    attn = [side in cfg.attention_resolutions for side in _level_sides(cfg)]
    down = tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn)
    up = tuple("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=cfg.resolution // cfg.patch_size,
        in_channels=3 * cfg.patch_size**2,
        out_channels=(6 if cfg.learn_variance else 3) * cfg.patch_size**2,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
        dropout=cfg.dropout,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.head_channels,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="projection",
        # the class embedding MLP reads [z_i, final caption token] (or z_i alone)
        projection_class_embeddings_input_dim=cfg.clip_dim + (
            cfg.context_dim if cfg.use_caption and cfg.caption_in_time else 0),
    )


class Decoder(nn.Module):
    """``forward(x_t, t, image_embed, text_states, text_mask, drop_clip, drop_caption)`` ->
    (B, 6 or 3, H, W): epsilon (or whatever ``diffusion.prediction_type`` says) and, with a learned
    variance, the per-pixel interpolation values of the reverse variance."""

    def __init__(self, cfg: DecoderConfig, diffusion: DiffusionConfig | None = None):
        super().__init__()
        diffusion = diffusion or DiffusionConfig(learn_variance=cfg.learn_variance)
        if diffusion.learn_variance != cfg.learn_variance:
            raise ValueError(f"decoder learn_variance={cfg.learn_variance} but diffusion "
                             f"learn_variance={diffusion.learn_variance}; they must agree")
        self.cfg = cfg
        self.diffusion = diffusion
        self.unet = build_unet(cfg)
        c = cfg.context_dim
        self.clip_tokens = nn.Linear(cfg.clip_dim, cfg.num_clip_tokens * c)
        self.null_clip = nn.Parameter(torch.zeros(cfg.clip_dim))  # "CLIP embedding dropped"
        if cfg.use_caption:
            self.text_proj = nn.Linear(cfg.text_width, c)
            self.null_text = nn.Parameter(torch.zeros(c))          # "caption dropped"
        self.context_norm = nn.LayerNorm(c)

    @property
    def out_channels(self) -> int:
        return 6 if self.cfg.learn_variance else 3

    @property
    def resolution(self) -> int:
        return int(self.cfg.resolution)

    @property
    def _attended_token_counts(self) -> frozenset[int]:
        """Image tokens at each level whose attention reads the context (the middle block too)."""
        sides = _level_sides(self.cfg)
        return frozenset(s * s for s in sides if s in self.cfg.attention_resolutions) | {sides[-1] ** 2}

    def context(self, image_embed: torch.Tensor, text_states: torch.Tensor | None,
                text_mask: torch.Tensor | None, drop_clip: torch.Tensor | None,
                drop_caption: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_i or its null embedding, context tokens [B, L+4, C], their mask [B, L+4])."""
        b = image_embed.shape[0]
        if image_embed.ndim != 2 or image_embed.shape[1] != self.cfg.clip_dim:
            raise ValueError(f"image_embed must be (B, {self.cfg.clip_dim}), got {tuple(image_embed.shape)}")
        z = image_embed.to(self.null_clip.dtype)
        if drop_clip is not None:
            z = torch.where(drop_clip.view(-1, 1).to(z.device), self.null_clip.expand_as(z), z)
        tokens = [self.clip_tokens(z).view(b, self.cfg.num_clip_tokens, -1)]
        masks = [torch.ones(b, self.cfg.num_clip_tokens, dtype=torch.bool, device=z.device)]
        if self.cfg.use_caption:
            if text_states is None:  # no caption given: every sample is "caption dropped"
                text = self.null_text.view(1, 1, -1).expand(b, 1, -1)
                mask = torch.ones(b, 1, dtype=torch.bool, device=z.device)
            else:
                if text_states.ndim != 3 or text_states.shape[0] != b \
                        or text_states.shape[2] != self.cfg.text_width:
                    raise ValueError(f"text_states must be (B={b}, L, {self.cfg.text_width}), "
                                     f"got {tuple(text_states.shape)}")
                text = self.text_proj(text_states.to(z.dtype))
                mask = (torch.ones(text.shape[:2], dtype=torch.bool, device=z.device)
                        if text_mask is None else text_mask.to(device=z.device, dtype=torch.bool))
                if drop_caption is not None:
                    drop = drop_caption.to(z.device).view(-1, 1)
                    # a dropped caption is one null token; the other positions are masked out
                    text = torch.where(drop.unsqueeze(-1), self.null_text.expand_as(text), text)
                    first = torch.zeros_like(mask)
                    first[:, 0] = True
                    mask = torch.where(drop, first, mask)
            tokens.insert(0, text)
            masks.insert(0, mask)
        return z, self.context_norm(torch.cat(tokens, 1)), torch.cat(masks, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image_embed: torch.Tensor,
                text_states: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                drop_clip: torch.Tensor | None = None,
                drop_caption: torch.Tensor | None = None) -> torch.Tensor:
        side = self.cfg.resolution
        if x_t.ndim != 4 or x_t.shape[1] != 3 or x_t.shape[2:] != (side, side):
            raise ValueError(f"x_t must be (B, 3, {side}, {side}), got {tuple(x_t.shape)}")
        z, ctx, mask = self.context(image_embed, text_states, text_mask, drop_clip, drop_caption)
        if self.cfg.use_caption and self.cfg.caption_in_time:
            z = torch.cat([z, self.final_caption_token(ctx, mask)], 1)
        if ctx.shape[1] in self._attended_token_counts:
            # diffusers pads the context mask with the image tokens' positions only when the two
            # lengths differ (Attention.prepare_attention_mask): equal lengths would crash the
            # attention. One more masked-out token changes nothing and keeps them apart.
            ctx = nn.functional.pad(ctx, (0, 0, 0, 1))
            mask = nn.functional.pad(mask, (0, 1), value=False)
        p = self.cfg.patch_size
        x = nn.functional.pixel_unshuffle(x_t, p) if p > 1 else x_t
        out = self.unet(x, t, encoder_hidden_states=ctx, class_labels=z,
                        encoder_attention_mask=mask).sample
        return nn.functional.pixel_shuffle(out, p) if p > 1 else out

    def final_caption_token(self, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last unmasked caption token of the context (the null token when dropped)."""
        n_text = ctx.shape[1] - self.cfg.num_clip_tokens
        last = mask[:, :n_text].long().cumsum(1).argmax(1)  # index of the last True
        return ctx[torch.arange(ctx.shape[0], device=ctx.device), last]

    # ---- files --------------------------------------------------------------------------------

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        """safetensors + JSON (model and diffusion configs): enough to rebuild and sample."""
        checkpoint.save(folder, self.state_dict(), KIND,
                        {"model": self.cfg.to_dict(), "diffusion": self.diffusion.to_dict()}, extra)

    @classmethod
    def from_checkpoint(cls, folder: str) -> "Decoder":
        return load_decoder(folder)


def load_decoder(folder: str) -> Decoder:
    """Rebuild a decoder from a checkpoint folder URI (its JSON config alone defines the model)."""
    state, meta = checkpoint.load(folder, KIND)
    model = Decoder(DecoderConfig.from_dict(meta["config"]["model"]),
                    DiffusionConfig.from_dict(meta["config"]["diffusion"]))
    return checkpoint.load_into(model, state, folder, "decoder")


def dropout_masks(batch: int, p_clip: float, p_caption: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-sample drops of z_i and the caption, for classifier-free guidance."""
    for name, p in (("p_drop_clip", p_clip), ("p_drop_caption", p_caption)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    u = torch.rand(2, batch, generator=generator)
    return u[0] < p_clip, u[1] < p_caption
