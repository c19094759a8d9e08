"""Reverse process: DDPM and DPM-Solver++ from diffusers, and our own DDIM (sampling and
inversion on one schedule), driven by any denoiser.

A denoiser maps ``(x_t, t) -> model output`` with classifier-free guidance already applied (see
:func:`guide`), so the same loop serves the prior (x0-prediction on embeddings), the decoder and
the upsamplers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from unclip.diffusion.config import DiffusionConfig
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.noise import Generators, randn

SAMPLERS = ("ddpm", "ddim", "dpm")
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(cfg: DiffusionConfig, sampler: str, steps: int):
    """A diffusers scheduler for ``cfg``'s process, strided to ``steps`` evenly spaced steps."""
    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  prediction_type=cfg.prediction_type, timestep_spacing="trailing")
    if sampler == "ddpm":
        sched = DDPMScheduler(**common, clip_sample=cfg.clip_sample,
                              variance_type="learned_range" if cfg.learn_variance else "fixed_small")
    elif sampler == "ddim":
        sched = DDIMScheduler(**common, clip_sample=cfg.clip_sample, set_alpha_to_one=True)
    elif sampler == "dpm":
        # a learned variance is sliced off in ``sample`` (diffusers slices it only for epsilon)
        sched = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise ValueError(f"steps must be in [1, {cfg.num_train_timesteps}], got {steps}")
    return sched


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float,
          channels: int | None = None) -> torch.Tensor:
    """Classifier-free guidance ``uncond + s (cond - uncond)`` on the mean part of an output.

    With a learned variance (``channels`` = data channels, output has twice as many) the variance
    values are taken from the conditional output, as in GLIDE.
    """
    if channels is None or cond.shape[1] == channels:
        return uncond + scale * (cond - uncond)
    mean = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mean, cond[:, channels:]], dim=1)


def ddim_timesteps(cfg: DiffusionConfig, steps: int) -> list[int]:
    """The strided timesteps (descending, ``trailing`` spacing) that DDIM sampling visits and
    inversion climbs back up; each step goes to the next listed one, after the last to the clean
    sample (alpha_bar = 1)."""
    sched = make_scheduler(cfg, "ddim", steps)
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


def _ddim_step(gd: GaussianDiffusion, out: torch.Tensor, x: torch.Tensor, t: int, a_prev: float,
               eta: float, generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (Song et al. eq. 12) from level ``t`` to ``a_prev``: (x_prev, x0 estimate).

    With clip_sample, x0 is clamped to [-1, 1] and epsilon re-derived from it, so the step goes
    toward the clipped x0 (diffusers' ``use_clipped_model_output``)."""
    tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    x0 = gd.predict_x0(out, x, tb)
    a_t = float(gd.alphas_cumprod[t])
    if gd.cfg.clip_sample:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    else:
        eps = gd.predict_eps(out, x, tb)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) if eta else 0.0
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        noise = randn(x.shape, generator, dtype=x.dtype)
        x_prev = x_prev + sigma * noise.to(x.device)
    return x_prev, x0


@torch.no_grad()
def sample(denoise: Denoiser, shape: tuple[int, ...], cfg: DiffusionConfig, sampler: str = "ddim",
           steps: int = 50, generator: Generators = None,
           x_T: torch.Tensor | None = None, device: torch.device | str = "cpu", eta: float = 0.0,
           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Draw samples of ``shape``; ``x_T`` fixes the starting noise (variations, interpolation).

    DDIM is our own step over :func:`ddim_timesteps`, the schedule :func:`ddim_invert` climbs:
    diffusers' DDIM steps from t to ``t - T // steps``, which is not the next listed timestep when
    T / steps is not whole (15, 27, 64 of 1000), so its sampling and the inversion disagreed.
    """
    sched = make_scheduler(cfg, sampler, steps)
    if x_T is None:
        x_T = randn(shape, generator)
    x = x_T.to(device)
    channels = x.shape[1]
    if sampler == "ddim":  # its learned variance, if any, is not used
        gd = GaussianDiffusion(cfg)
        ts = ddim_timesteps(cfg, steps)
        for i, t in enumerate(ts):
            out = denoise(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long))
            a_prev = float(gd.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            x, _ = _ddim_step(gd, out[:, :channels].to(x.dtype), x, t, a_prev, eta, generator)
            if progress is not None:
                progress(i + 1, len(ts))
        return x
    sched.set_timesteps(steps, device=device)
    x = x * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        tb = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        out = denoise(sched.scale_model_input(x, t), tb)
        if cfg.learn_variance and sampler == "dpm":  # it uses the mean part only
            out = out[:, :channels]
        step = sched.step(out.to(x.dtype), t, x, generator=generator)
        # DDPM's last step goes from t_1 > 0 straight to the clean sample: its mean is the x0
        # estimate, and no noise is added (as improved DDPM's respacing). diffusers adds noise of
        # a learned variance there, read against bounds [1e-20, 1 - alpha_bar] the model was not
        # trained on: std 0.09 for a variance value of 0.9 at 6 steps.
        last = sampler == "ddpm" and i == len(sched.timesteps) - 1
        x = step.pred_original_sample if last else step.prev_sample
        if progress is not None:
            progress(i + 1, len(sched.timesteps))
    return x


@torch.no_grad()
def ddim_invert(denoise: Denoiser, x0: torch.Tensor, cfg: DiffusionConfig,
                steps: int = 50) -> torch.Tensor:
    """The x_T from which deterministic DDIM with ``steps`` steps returns (about) ``x0``.

    Climbs :func:`ddim_timesteps` (the schedule ``sample`` descends) with the DDIM update run
    backwards, evaluating the model at the current, lower noise level with the next timestep
    (the usual approximation; exact for a model whose epsilon is constant along the path).
    """
    gd = GaussianDiffusion(cfg)
    ac = gd.alphas_cumprod
    x = x0
    a_prev = 1.0
    for t in reversed(ddim_timesteps(cfg, steps)):
        tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = denoise(x, tb)
        eps = gd.predict_eps(out[:, : x.shape[1]].to(x.dtype), x, tb)
        a_t = float(ac[t])
        x0_pred = (x - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)
        x = math.sqrt(a_t) * x0_pred + math.sqrt(1 - a_t) * eps
        a_prev = a_t
    return x
