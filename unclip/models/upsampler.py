"""The x4 diffusion upsampler: a convolution-only UNet conditioned on a low-resolution image.

As in unCLIP's upsamplers, the network sees ``concat(x_t, bicubic-upsampled low-res image)`` and
has no attention layer anywhere (a ``diffusers`` ``UNet2DModel`` built from ResNet down/up blocks
and an attention-free middle block), so it is trained on small crops and applied at full
resolution. There is no caption input. The noise-augmentation level ``t_aug`` of the low-res image
is embedded like a timestep (``class_embed_type="timestep"``) and added to the timestep embedding.

Images are float tensors in [-1, 1], (B, 3, H, W).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from unclip import checkpoint
from unclip.devices import model_device
from unclip.data.degradations import KINDS, augment_low_res
from unclip.diffusion import SAMPLERS, DiffusionConfig, GaussianDiffusion, sample
from unclip.diffusion.noise import Generators
from unclip.options import option, validate

KIND = "upsampler"


@dataclass(frozen=True)
class UpsamplerConfig:
    """The upsampler's options and their defaults; a checkpoint stores them as a dict."""

    scale: int = option(4, ge=1)
    channels: tuple[int, ...] = option((32, 64, 64), ge=1)  # UNet width per level (one per entry)
    layers_per_block: int = option(1, ge=1)
    norm_num_groups: int = option(8, ge=1)
    dropout: float = option(0.0, ge=0, lt=1)
    diffusion: dict[str, Any] = field(default_factory=lambda: DiffusionConfig().to_dict())
    aug_max_level: int = option(150, ge=0)    # training: t_aug uniform in [0, aug_max_level]
    aug_sample_level: int = option(20, ge=0)  # sampling: fixed small level
    sampler: str = option("ddim", choices=SAMPLERS)
    steps: int = option(27, ge=1)             # the paper: 27 DDIM steps (64->256), 15 (256->1024)
    kind: str = option("blur", choices=KINDS)  # the corruption it was trained with (documentation only)
    # With x0-prediction only: the network predicts the correction to the bicubic upsampling of
    # the low-res input (x0 = bicubic(low) + f), so an untrained model already equals the bicubic
    # baseline and short trainings only add detail (the diffusion itself is unchanged).
    residual: bool = False

    def __post_init__(self) -> None:
        validate(self)


DEFAULTS: dict[str, Any] = {**asdict(UpsamplerConfig()), "channels": list(UpsamplerConfig.channels)}


def build_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults completed with ``cfg``; unknown keys are an error (typos would silently be ignored)."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown upsampler option(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    out["channels"] = [int(c) for c in out["channels"]]
    UpsamplerConfig(**{**out, "channels": tuple(out["channels"])})  # bounds
    out["diffusion"] = DiffusionConfig.from_dict({**DEFAULTS["diffusion"], **dict(out["diffusion"])}).to_dict()
    if out["diffusion"]["learn_variance"]:
        raise ValueError("the upsamplers use a fixed variance (diffusion.learn_variance: false)")
    if out["residual"] and out["diffusion"]["prediction_type"] != "sample":
        raise ValueError("residual: true needs diffusion.prediction_type: sample (the network's "
                         "output is then an image correction, not noise)")
    if any(c % int(out["norm_num_groups"]) for c in out["channels"]):
        raise ValueError(f"every UNet width in {out['channels']} must be divisible by "
                         f"norm_num_groups={out['norm_num_groups']}")
    return out


class Upsampler(torch.nn.Module):
    """eps_theta(x_t, t | low-res image, t_aug): a conv-only UNet on 6 input channels."""

    def __init__(self, cfg: dict[str, Any] | None = None):
        from diffusers import UNet2DModel

        super().__init__()
        self.config = build_config(cfg)
        c = self.config
        n = len(c["channels"])
        self.unet = UNet2DModel(
            in_channels=6, out_channels=3,
            block_out_channels=tuple(c["channels"]),
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            mid_block_type="UNetMidBlock2D", add_attention=False,   # ResNet blocks only
            layers_per_block=int(c["layers_per_block"]),
            norm_num_groups=int(c["norm_num_groups"]),
            dropout=float(c["dropout"]),
            class_embed_type="timestep",                          # t_aug, added to the t embedding
        )
        if c["residual"]:  # start as exactly the bicubic baseline
            torch.nn.init.zeros_(self.unet.conv_out.weight)
            torch.nn.init.zeros_(self.unet.conv_out.bias)
        self.diffusion_config = DiffusionConfig.from_dict(c["diffusion"])
        self.scale = int(c["scale"])

    @staticmethod
    def multiple_for(cfg: dict[str, Any]) -> int:
        """Image sides must be divisible by this (one halving per UNet level but the last)."""
        return 2 ** (len(cfg["channels"]) - 1)

    @property
    def multiple(self) -> int:
        return self.multiple_for(self.config)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low: torch.Tensor, t_aug: torch.Tensor,
                low_aug: torch.Tensor | None = None) -> torch.Tensor:
        """The model output for ``x_t`` (B, 3, H, W) given the low-res image ``low`` (B, 3, H/s, W/s)
        and its noise-augmented version ``low_aug`` at level ``t_aug`` (what the network sees)."""
        size = x_t.shape[-2:]
        seen = low if low_aug is None else low_aug
        cond = F.interpolate(seen, size=size, mode="bicubic", align_corners=False).to(x_t.dtype)
        out = self.unet(torch.cat([x_t, cond], dim=1), t, class_labels=t_aug).sample
        if self.config["residual"]:
            out = out + F.interpolate(low, size=size, mode="bicubic", align_corners=False).to(out.dtype)
        return out

    # ---- inference ------------------------------------------------------------------------

    def _check_low(self, low: torch.Tensor) -> None:
        if low.ndim != 4 or low.shape[1] != 3:
            raise ValueError(f"low-res images must be (B, 3, h, w), got shape {tuple(low.shape)}")
        if not torch.is_floating_point(low):
            raise ValueError(f"low-res images must be float in [-1, 1], got dtype {low.dtype}")
        h, w = low.shape[-2] * self.scale, low.shape[-1] * self.scale
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"output size {h}x{w} must be divisible by {self.multiple} "
                             f"(the UNet halves it {len(self.config['channels']) - 1} times)")

    @torch.no_grad()
    def upsample(self, low: torch.Tensor, steps: int | None = None, sampler: str | None = None,
                 generator: Generators = None, aug_level: int | None = None,
                 eta: float = 0.0, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Images ``scale`` times larger than ``low`` (B, 3, h, w) in [-1, 1], at any size (the UNet
        has no attention): few-step DDIM/DPM sampling, the input noised at a fixed small level."""
        self._check_low(low)
        device = model_device(self)
        low = low.to(device)
        level = int(self.config["aug_sample_level"] if aug_level is None else aug_level)
        gd = GaussianDiffusion(self.diffusion_config)
        t_aug = torch.full((low.shape[0],), level, dtype=torch.long, device=device)
        low_aug = augment_low_res(low, t_aug, gd, generator)  # level 0 too, as in training

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self(x_t, t, low, t_aug, low_aug)

        shape = (low.shape[0], 3, low.shape[-2] * self.scale, low.shape[-1] * self.scale)
        was_training = self.training
        self.eval()
        try:
            out = sample(denoise, shape, self.diffusion_config, sampler or self.config["sampler"],
                         int(steps or self.config["steps"]), generator=generator, device=device,
                         eta=eta, progress=progress)
        finally:
            self.train(was_training)
        return out.clamp(-1, 1)

    # ---- files ----------------------------------------------------------------------------

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        """safetensors weights + the JSON config that rebuilds the model (no pickle)."""
        checkpoint.save(folder, self.state_dict(), KIND, self.config, extra)

    @classmethod
    def from_checkpoint(cls, folder: str) -> "Upsampler":
        state, meta = checkpoint.load(folder, KIND)
        model = cls(meta["config"])
        return checkpoint.load_into(model, state, folder, "upsampler")


def load_upsampler(source: str) -> Upsampler:
    """An upsampler from a checkpoint folder, an ``s3://`` folder or ``models:/NAME@ALIAS``."""
    from unclip.registry import resolve_checkpoint

    return Upsampler.from_checkpoint(resolve_checkpoint(source))


def has_attention(model: torch.nn.Module) -> bool:
    """True when any attention module is present (the upsamplers must have none)."""
    from diffusers.models.attention_processor import Attention

    return any(isinstance(m, (Attention, torch.nn.MultiheadAttention)) for m in model.modules())
