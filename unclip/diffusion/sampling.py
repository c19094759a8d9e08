"""Reverse process: diffusers samplers (DDPM, DDIM, DPM-Solver++) driven by any denoiser.

A denoiser maps ``(x_t, t) -> model output`` with classifier-free guidance already applied (see
:func:`guide`), so the same loop serves the prior (x0-prediction on embeddings), the decoder and
the upsamplers.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from unclip.diffusion.config import DiffusionConfig

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


@torch.no_grad()
def sample(denoise: Denoiser, shape: tuple[int, ...], cfg: DiffusionConfig, sampler: str = "ddim",
           steps: int = 50, generator: torch.Generator | None = None,
           x_T: torch.Tensor | None = None, device: torch.device | str = "cpu", eta: float = 0.0,
           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Draw samples of ``shape``; ``x_T`` fixes the starting noise (variations, interpolation)."""
    sched = make_scheduler(cfg, sampler, steps)
    sched.set_timesteps(steps, device=device)
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, device="cpu")
    x = x_T.to(device) * sched.init_noise_sigma
    channels = x.shape[1]
    for i, t in enumerate(sched.timesteps):
        tb = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        out = denoise(sched.scale_model_input(x, t), tb)
        if cfg.learn_variance and sampler in ("ddim", "dpm"):  # they use the mean part only
            out = out[:, :channels]
        kwargs = ({"eta": eta, "generator": generator, "use_clipped_model_output": True}
                  if sampler == "ddim" else {"generator": generator})
        step = sched.step(out.to(x.dtype), t, x, **kwargs)
        # diffusers' DDIM steps to ``t - T // steps``; where T / steps is not whole (15, 64 steps
        # of 1000) the last step then lands on t = 0, not on the clean sample, and leaves
        # sqrt(1 - alpha_bar_0) of noise (0.01 on the linear schedule). Its x0 is where it should end.
        last = i == len(sched.timesteps) - 1
        x = step.pred_original_sample if last and sampler == "ddim" else step.prev_sample
        if progress is not None:
            progress(i + 1, len(sched.timesteps))
    return x


@torch.no_grad()
def ddim_invert(denoise: Denoiser, x0: torch.Tensor, cfg: DiffusionConfig,
                steps: int = 50) -> torch.Tensor:
    """The x_T from which deterministic DDIM with ``steps`` steps returns (about) ``x0``.

    Runs the DDIM update backwards along the same strided timesteps, evaluating the model at the
    lower noise level (the usual approximation); any parameterization is converted to epsilon.
    """
    from unclip.diffusion.gaussian import GaussianDiffusion

    gd = GaussianDiffusion(cfg)
    sched = make_scheduler(cfg, "ddim", steps)
    sched.set_timesteps(steps)
    ac = gd.alphas_cumprod
    x = x0
    a_prev = torch.tensor(1.0, dtype=torch.float64)
    for t in sched.timesteps.flip(0).tolist():
        tb = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = denoise(x, tb)
        if cfg.learn_variance:
            out = out[:, : x.shape[1]]
        eps = gd.predict_eps(out.to(x.dtype), x, tb)
        a_t = ac[int(t)]
        x0_pred = (x - (1 - a_prev).sqrt().to(x.dtype) * eps) / a_prev.sqrt().to(x.dtype)
        x = a_t.sqrt().to(x.dtype) * x0_pred + (1 - a_t).sqrt().to(x.dtype) * eps
        a_prev = a_t
    return x
