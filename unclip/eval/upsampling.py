"""Validation of an upsampler on held-out images at full size, beside bicubic upsampling.

Each held-out image is corrupted with the stage's degradation (seeded per image, so every run and
every model sees the same inputs), then upsampled twice: by the model (few-step sampling) and by
bicubic interpolation. PSNR and SSIM of both against the original say whether the model adds
anything over the trivial baseline.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from unclip.data.degradations import degrade
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


@torch.no_grad()
def validate(model, images: np.ndarray, kind: str, degradation: Mapping[str, Any] | None = None,
             seed: int = 0, steps: int | None = None, sampler: str | None = None,
             batch_size: int = 4, grid_rows: int = 4) -> tuple[dict[str, float], np.ndarray]:
    """Metrics ``val_psnr``/``val_ssim`` (model), ``val_psnr_bicubic``/``val_ssim_bicubic`` and the
    gains, plus a grid image (uint8 HWC): rows of [degraded input, bicubic, model, original]."""
    scale = int(model.scale)
    hr, low = degraded_inputs(images, kind, scale, degradation, seed)
    outs = []
    for i in range(0, len(hr), batch_size):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        up = model.upsample(low[i:i + batch_size] * 2 - 1, steps=steps, sampler=sampler, generator=g)
        outs.append((up.float().cpu() + 1) / 2)
    out = torch.cat(outs).clamp(0, 1)
    bic = bicubic_upsample(low, scale)
    m = {"val_psnr": mean_finite(psnr(out, hr)), "val_ssim": float(ssim(out, hr).mean()),
         "val_psnr_bicubic": mean_finite(psnr(bic, hr)), "val_ssim_bicubic": float(ssim(bic, hr).mean())}
    m["val_psnr_gain"] = m["val_psnr"] - m["val_psnr_bicubic"]
    m["val_ssim_gain"] = m["val_ssim"] - m["val_ssim_bicubic"]
    nearest = F.interpolate(low, scale_factor=scale, mode="nearest")
    rows = [torch.cat([nearest[i], bic[i], out[i], hr[i]], dim=-1) for i in range(min(grid_rows, len(hr)))]
    grid = (torch.cat(rows, dim=-2).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return m, grid
