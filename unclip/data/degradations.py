"""Conditioning corruptions of the two upsamplers (unCLIP Sec. 2 / App. C), seeded and documented.

The upsamplers are trained on a *corrupted* low-resolution version of each target so that, at
generation time, they tolerate the artefacts of the stage before them instead of copying them:

* ``blur`` (first upsampler, 64->256 in the paper): the target is resized down by the scale factor
  with an anti-aliased bicubic kernel (as the decoder's training images are), then blurred with an
  isotropic Gaussian of random width.
* ``bsr`` (second upsampler, 256->1024): a BSRGAN-style pipeline (Zhang et al. 2021, "Designing a
  Practical Degradation Model for Deep Blind Image Super-Resolution"), step by step in
  :func:`bsr_degrade`: random isotropic / anisotropic Gaussian blur kernels, random resize kernels
  (bicubic, bilinear, area), Gaussian noise, Poisson-like (shot) noise, all in a random order, then
  a final resize to the exact low resolution and a JPEG re-encode at a random quality (PIL).

Every random choice comes from an explicit ``numpy.random.Generator``: the same seed gives the same
corruption on any machine, which makes the held-out validation reproducible. Images are float
tensors in [0, 1], (C, H, W) or (B, C, H, W); the output keeps the range, the channel count and the
batch size, with H and W divided by the scale factor.

The noise-level conditioning augmentation (:func:`augment_low_res`) is applied on top of either
corruption: the low-resolution image is noised with the model's own forward process at a random
level ``t_aug`` during training (the level is given to the model), and at a fixed small level when
sampling.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip.diffusion import GaussianDiffusion
from unclip.diffusion.noise import Generators, randn
from unclip.options import option, validate

KINDS = ("blur", "bsr")
RESIZE_MODES = ("bicubic", "bilinear", "area")


# ---- configuration ---------------------------------------------------------------------------


class _FromDict:
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None):
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _require_range(name: str, pair: tuple, lowest: float, highest: float = math.inf,
                   low_may_equal: bool = True) -> None:
    """A (low, high) option: low <= high within [lowest, highest] (low > lowest where it must)."""
    lo, hi = pair
    above = lo >= lowest if low_may_equal else lo > lowest
    if not (above and lo <= hi <= highest):
        bound = f"{lowest} {'<=' if low_may_equal else '<'} low <= high"
        bound += f" <= {highest}" if highest != math.inf else ""
        raise ValueError(f"{name} must be a range (low, high) with {bound}, got ({lo}, {hi})")


@dataclass(frozen=True)
class BlurConfig(_FromDict):
    # Gaussian sigma in *low-resolution* pixels, drawn uniformly per image.
    sigma: tuple[float, float] = (0.4, 1.2)
    # Share of images left unblurred (the anti-aliased downscale only). The paper always blurs; an
    # upsampler that never sees a sharp input sharpens the sharp ones it gets in the cascade.
    clean_prob: float = option(0.0, ge=0, le=1)

    def __post_init__(self) -> None:
        validate(self)
        _require_range("sigma", self.sigma, lowest=0.0, low_may_equal=False)


@dataclass(frozen=True)
class BSRConfig(_FromDict):
    # Blur kernel sigmas in pixels of the image they are applied to, drawn per axis.
    sigma: tuple[float, float] = (0.2, 2.0)
    isotropic_prob: float = option(0.5, ge=0, le=1)    # else anisotropic: two sigmas, a rotation
    second_blur_prob: float = option(0.5, ge=0, le=1)  # BSRGAN applies two blurs, the second optional
    # Intermediate resize by a factor drawn in [1, scale]: part of the reduction happens early,
    # so later steps act at a random intermediate resolution.
    intermediate_resize_prob: float = option(0.5, ge=0, le=1)
    gaussian_noise: tuple[float, float] = (1.0 / 255, 25.0 / 255)   # noise std range
    poisson_prob: float = option(0.5, ge=0, le=1)
    # Poisson-like noise: counts ~ Poisson(x * 10**u), u uniform in this range (fewer counts: more noise).
    poisson_log10_scale: tuple[float, float] = (2.0, 4.0)
    gray_noise_prob: float = option(0.4, ge=0, le=1)  # the same noise on every channel (luminance)
    jpeg_quality: tuple[int, int] = (30, 95)
    # Share of images given the plain anti-aliased downscale instead (see BlurConfig.clean_prob): the
    # cascade feeds this upsampler the first upsampler's sharp output, not a camera's degraded photo.
    clean_prob: float = option(0.0, ge=0, le=1)

    def __post_init__(self) -> None:
        validate(self)
        _require_range("sigma", self.sigma, lowest=0.0, low_may_equal=False)
        _require_range("gaussian_noise", self.gaussian_noise, lowest=0.0)
        _require_range("jpeg_quality", self.jpeg_quality, lowest=1, highest=100)


def config_for(kind: str, d: Mapping[str, Any] | None = None) -> BlurConfig | BSRConfig:
    """The degradation config of a stage kind (``blur`` or ``bsr``)."""
    if kind == "blur":
        return BlurConfig.from_dict(d)
    if kind == "bsr":
        return BSRConfig.from_dict(d)
    raise ValueError(f"unknown degradation kind {kind!r}; choose one of {', '.join(KINDS)}")


# ---- primitives ------------------------------------------------------------------------------


def gaussian_kernel(sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                    size: int | None = None) -> torch.Tensor:
    """A normalized 2-D Gaussian kernel; anisotropic when ``sigma_y`` differs, rotated by ``theta``."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be positive, got {sigma_x}, {sigma_y}")
    if size is None:
        size = 2 * min(10, math.ceil(3 * max(sigma_x, sigma_y))) + 1
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy          # coordinates along the rotated axes
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (k / k.sum()).float()


def apply_kernel(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel of ``img`` (C, H, W) with ``kernel``; edge pixels are replicated
    (works for crops smaller than the kernel)."""
    c = img.shape[0]
    p = kernel.shape[-1] // 2
    x = F.pad(img[None], (p, p, p, p), mode="replicate")
    w = kernel.to(img.dtype)[None, None].expand(c, 1, -1, -1)
    return F.conv2d(x, w, groups=c)[0]


def resize(img: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Anti-aliased resize of (C, H, W) or (B, C, H, W) to ``size`` = (H, W), clamped to [0, 1]."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    x = img[None] if img.ndim == 3 else img
    if tuple(x.shape[-2:]) == tuple(size):
        out = x
    elif mode == "area":
        out = F.interpolate(x, size=size, mode="area")
    else:
        out = F.interpolate(x, size=size, mode=mode, align_corners=False,
                            antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])
    out = out.clamp(0, 1)
    return out[0] if img.ndim == 3 else out


def add_gaussian_noise(img: torch.Tensor, std: float, gray: bool,
                       rng: np.random.Generator) -> torch.Tensor:
    """Additive white noise of ``std``; ``gray`` uses one noise plane for every channel."""
    c, h, w = img.shape
    n = rng.standard_normal((1 if gray else c, h, w)).astype(np.float32)
    return (img + std * torch.from_numpy(n).to(img.dtype)).clamp(0, 1)


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool,
                      rng: np.random.Generator) -> torch.Tensor:
    """Shot noise: photon counts ~ Poisson(intensity * scale), rescaled; ``gray`` draws it on the
    luminance and adds the same deviation to every channel."""
    x = img.detach().cpu().double().numpy()
    if gray:
        lum = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]) if x.shape[0] == 3 else x.mean(0)
        noise = rng.poisson(np.clip(lum, 0, 1) * scale) / scale - lum
        out = x + noise[None]
    else:
        out = rng.poisson(np.clip(x, 0, 1) * scale) / scale
    return torch.from_numpy(out).to(img.dtype).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Re-encode (3, H, W) as JPEG at ``quality`` (PIL, 4:2:0 as most encoders) and decode it."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    arr = (img.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1).to(img.dtype)


def random_kernel(rng: np.random.Generator, sigma: tuple[float, float],
                  isotropic_prob: float) -> torch.Tensor:
    """An isotropic Gaussian, or an anisotropic one at a random angle (BSRGAN's blur kernels)."""
    lo, hi = sigma
    if rng.random() < isotropic_prob:
        return gaussian_kernel(float(rng.uniform(lo, hi)))
    return gaussian_kernel(float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)),
                           float(rng.uniform(0, math.pi)))


# ---- the two pipelines -----------------------------------------------------------------------


def _check(img: torch.Tensor, scale: int, batch_ok: bool = False) -> None:
    if not (img.ndim == 3 or (batch_ok and img.ndim == 4)) or img.shape[-3] != 3:
        raise ValueError(f"expected {'(B, 3, H, W) or ' if batch_ok else 'one '}RGB image (3, H, W), "
                         f"got shape {tuple(img.shape)}")
    h, w = img.shape[-2:]
    if scale < 1 or h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by the scale factor {scale}")
    if not torch.is_floating_point(img):
        raise ValueError(f"expected a float image in [0, 1], got dtype {img.dtype}")


def downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The uncorrupted input: an anti-aliased bicubic downscale by ``scale`` (how the stage before
    was trained to draw its images, so what a cascade hands over). (3, H, W) or (B, 3, H, W)."""
    _check(hr, scale, batch_ok=True)
    h, w = hr.shape[-2:]
    return resize(hr, (h // scale, w // scale), "bicubic")


def blur_degrade(hr: torch.Tensor, scale: int, rng: np.random.Generator,
                 cfg: BlurConfig = BlurConfig()) -> torch.Tensor:
    """First upsampler's conditioning: :func:`downscale`, then a Gaussian blur of random sigma in
    low-resolution pixels (none for a ``clean_prob`` share)."""
    _check(hr, scale)  # one image: the blur and the rng draws are per image
    low = downscale(hr, scale)
    if cfg.clean_prob and rng.random() < cfg.clean_prob:
        return low
    return apply_kernel(low, gaussian_kernel(float(rng.uniform(*cfg.sigma)))).clamp(0, 1)


def bsr_degrade(hr: torch.Tensor, scale: int, rng: np.random.Generator,
                cfg: BSRConfig = BSRConfig()) -> torch.Tensor:
    """Second upsampler's conditioning, BSRGAN-style. Step by step:

    1. draw the optional steps: a second blur (``second_blur_prob``), an intermediate resize
       (``intermediate_resize_prob``, factor uniform in [1, scale], random kernel) and Poisson-like
       noise (``poisson_prob``); a first blur and Gaussian noise always happen;
    2. apply them in a random order (a permutation from ``rng``): blur = a random isotropic or
       anisotropic Gaussian kernel; Gaussian noise = std uniform in ``gaussian_noise``, grey with
       ``gray_noise_prob``; Poisson-like = counts at 10**uniform(``poisson_log10_scale``) per unit;
    3. resize to exactly H/scale x W/scale with a random kernel (bicubic, bilinear or area);
    4. re-encode as JPEG with quality uniform in ``jpeg_quality``.

    A ``clean_prob`` share skips all of it: :func:`downscale` only.
    """
    _check(hr, scale)
    h, w = hr.shape[-2:]
    if cfg.clean_prob and rng.random() < cfg.clean_prob:
        return downscale(hr, scale)
    steps = ["blur", "noise"]
    if rng.random() < cfg.second_blur_prob:
        steps.append("blur")
    if rng.random() < cfg.intermediate_resize_prob:
        steps.append("resize")
    if rng.random() < cfg.poisson_prob:
        steps.append("poisson")
    x = hr
    for i in rng.permutation(len(steps)):
        step = steps[i]
        if step == "blur":
            x = apply_kernel(x, random_kernel(rng, cfg.sigma, cfg.isotropic_prob)).clamp(0, 1)
        elif step == "resize":
            f = float(rng.uniform(1.0, scale))
            size = (max(h // scale, round(h / f)), max(w // scale, round(w / f)))
            x = resize(x, size, RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))])
        elif step == "noise":
            x = add_gaussian_noise(x, float(rng.uniform(*cfg.gaussian_noise)),
                                   bool(rng.random() < cfg.gray_noise_prob), rng)
        else:
            x = add_poisson_noise(x, float(10 ** rng.uniform(*cfg.poisson_log10_scale)),
                                  bool(rng.random() < cfg.gray_noise_prob), rng)
    x = resize(x, (h // scale, w // scale), RESIZE_MODES[int(rng.integers(len(RESIZE_MODES)))])
    return jpeg(x, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))


def degrade(kind: str, hr: torch.Tensor, scale: int, rng: np.random.Generator,
            cfg: BlurConfig | BSRConfig | Mapping[str, Any] | None = None) -> torch.Tensor:
    """Low-resolution conditioning images for a batch (B, 3, H, W) or one image (3, H, W) in [0, 1]."""
    if not isinstance(cfg, (BlurConfig, BSRConfig)):
        cfg = config_for(kind, cfg)
    fn = blur_degrade if kind == "blur" else bsr_degrade
    if hr.ndim == 3:
        return fn(hr, scale, rng, cfg)
    if hr.ndim != 4:
        raise ValueError(f"expected (B, 3, H, W) or (3, H, W) images, got shape {tuple(hr.shape)}")
    return torch.stack([fn(im, scale, rng, cfg) for im in hr])


# ---- noise-level conditioning augmentation ---------------------------------------------------


def sample_aug_levels(n: int, max_level: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time augmentation levels ``t_aug``, uniform in [0, max_level] (0: clean input)."""
    if max_level < 0:
        raise ValueError(f"max augmentation level must be >= 0, got {max_level}")
    return torch.randint(0, max_level + 1, (n,), generator=generator)


def augment_low_res(low: torch.Tensor, t_aug: torch.Tensor, diffusion: GaussianDiffusion,
                    generator: Generators = None) -> torch.Tensor:
    """The low-resolution image in [-1, 1] noised by the forward process at levels ``t_aug`` (B,);
    level 0 of a diffusion schedule is still a tiny amount of noise, so pass exactly the
    ``t_aug`` the model is told."""
    if t_aug.shape != (low.shape[0],):
        raise ValueError(f"t_aug must have shape ({low.shape[0]},), got {tuple(t_aug.shape)}")
    noise = randn(low.shape, generator, dtype=low.dtype).to(low.device)
    return diffusion.q_sample(low, t_aug.to(low.device), noise)
