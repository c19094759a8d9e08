"""Validation of an upsampler on held-out images at full size, beside bicubic upsampling.

Each held-out image is corrupted with the stage's degradation (seeded per image, so every run and
every model sees the same inputs), then upsampled twice: by the model (few-step sampling) and by
bicubic interpolation. PSNR and SSIM of both against the original say whether the model adds
anything over the trivial baseline. The same is done for the uncorrupted downscale, the input a
cascade hands over.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from unclip.data.degradations import degrade, downscale
from unclip.eval.image_quality import mean_finite, psnr, ssim
from unclip.training.upsampler import to_unit


def bicubic_upsample(low: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline: bicubic interpolation of (B, 3, h, w) in [0, 1] by ``scale``, clamped."""
    return F.interpolate(low, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


def degraded_inputs(images: np.ndarray, kind: str, scale: int,
                    degradation: Mapping[str, Any] | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(originals, degraded low-res) in [0, 1]; image i's corruption is seeded by (seed, i)."""
    hr = to_unit(images)
    low = torch.stack([degrade(kind, im, scale, np.random.default_rng([seed, i]), degradation)
                       for i, im in enumerate(hr)])
    return hr, low


def _scores(out: torch.Tensor, bic: torch.Tensor, hr: torch.Tensor, suffix: str = "") -> dict[str, float]:
    m = {f"val_psnr{suffix}": mean_finite(psnr(out, hr)), f"val_ssim{suffix}": float(ssim(out, hr).mean()),
         f"val_psnr{suffix}_bicubic": mean_finite(psnr(bic, hr)),
         f"val_ssim{suffix}_bicubic": float(ssim(bic, hr).mean())}
    m[f"val_psnr{suffix}_gain"] = m[f"val_psnr{suffix}"] - m[f"val_psnr{suffix}_bicubic"]
    m[f"val_ssim{suffix}_gain"] = m[f"val_ssim{suffix}"] - m[f"val_ssim{suffix}_bicubic"]
    return m


def _upsample(model, low: torch.Tensor, seed: int, steps: int | None, sampler: str | None,
              batch_size: int) -> torch.Tensor:
    outs = []
    for i in range(0, len(low), batch_size):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        up = model.upsample(low[i:i + batch_size] * 2 - 1, steps=steps, sampler=sampler, generator=g)
        outs.append((up.float().cpu() + 1) / 2)
    return torch.cat(outs).clamp(0, 1)


@torch.no_grad()
def validate(model, images: np.ndarray, kind: str, degradation: Mapping[str, Any] | None = None,
             seed: int = 0, steps: int | None = None, sampler: str | None = None,
             batch_size: int = 4, grid_rows: int = 4) -> tuple[dict[str, float], np.ndarray]:
    """Metrics ``val_psnr``/``val_ssim`` (model), ``val_psnr_bicubic``/``val_ssim_bicubic`` and the
    gains, plus a grid image (uint8 HWC): rows of [degraded input, bicubic, model, original].

    The same scores again as ``val_*_sharp*`` on the uncorrupted downscale: what the
    cascade feeds the model. An upsampler trained only on degraded inputs can beat bicubic on those
    and still over-sharpen the clean images it gets from the stage before.
    """
    scale = int(model.scale)
    hr, low = degraded_inputs(images, kind, scale, degradation, seed)
    out = _upsample(model, low, seed, steps, sampler, batch_size)
    bic = bicubic_upsample(low, scale)
    clean = downscale(hr, scale)
    m = {**_scores(out, bic, hr),
         **_scores(_upsample(model, clean, seed, steps, sampler, batch_size),
                   bicubic_upsample(clean, scale), hr, "_sharp")}
    nearest = F.interpolate(low, scale_factor=scale, mode="nearest")
    rows = [torch.cat([nearest[i], bic[i], out[i], hr[i]], dim=-1) for i in range(min(grid_rows, len(hr)))]
    grid = (torch.cat(rows, dim=-2).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return m, grid
