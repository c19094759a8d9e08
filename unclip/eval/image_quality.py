"""Full-reference image quality: PSNR and SSIM (Wang et al. 2004), in torch, per image.

Written here instead of adding scikit-image/torchmetrics for two formulas. Inputs are float images
in [0, 1], (B, C, H, W); SSIM uses the usual 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, computed per channel and averaged over channels and the valid (unpadded) positions, as
``skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (B,); identical images give +inf."""
    _check(a, b)
    mse = (a.double() - b.double()).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def _window(size: int, sigma: float, channels: int) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity per image (B,); images must be at least ``win_size`` pixels."""
    _check(a, b)
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got "
                         f"{a.shape[-2]}x{a.shape[-1]}; pass a smaller win_size")
    c = a.shape[1]
    w = _window(win_size, sigma, c)
    x, y = a.double(), b.double()

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, w, groups=c)

    mx, my = filt(x), filt(y)
    vx = filt(x * x) - mx * mx
    vy = filt(y * y) - my * my
    cxy = filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


def mean_finite(values: torch.Tensor, cap: float = 100.0) -> float:
    """Mean of per-image PSNRs with +inf (exact copies) capped, so one perfect image is not inf."""
    v = values.clamp(max=cap)
    return float(v.mean()) if v.numel() else math.nan
