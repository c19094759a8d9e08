"""Forward process, training targets and losses (simple MSE, or hybrid with the variational bound).

Tensors are indexed by integer timesteps in [0, num_train_timesteps). Works for any shape whose
first axis is the batch: images (B, C, H, W) or CLIP embeddings (B, D).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from diffusers import DDPMScheduler

from unclip.diffusion.config import DiffusionConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = values.to(like.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """The DDPM forward process of a diffusers schedule, plus what training needs from it."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                       beta_schedule=cfg.beta_schedule,
                                       prediction_type=cfg.prediction_type)
        self.num_timesteps = cfg.num_train_timesteps
        betas = self.scheduler.betas.double()
        ac = self.scheduler.alphas_cumprod.double()
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.betas = betas
        self.alphas_cumprod = ac
        self.sqrt_ac = ac.sqrt()
        self.sqrt_1m_ac = (1 - ac).sqrt()
        self.posterior_variance = betas * (1 - ac_prev) / (1 - ac)
        # log of the posterior variance, with its first (zero) entry replaced, as in improved DDPM.
        self.posterior_log_var = torch.log(torch.cat([self.posterior_variance[1:2],
                                                      self.posterior_variance[1:]]))
        self.posterior_coef_x0 = betas * ac_prev.sqrt() / (1 - ac)
        self.posterior_coef_xt = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
        self.loss_weights = self._min_snr_weights(ac) if cfg.min_snr_gamma else None

    def _min_snr_weights(self, ac: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight of the target's MSE per timestep: an x0 error counts min(SNR, gamma)
        times its square. The plain MSE of epsilon counts it SNR times, of v SNR + 1, of x0 once."""
        snr = ac / (1 - ac)
        implied = {"epsilon": snr, "sample": torch.ones_like(snr), "v_prediction": snr + 1}
        p = self.cfg.prediction_type
        if p not in implied:
            raise ValueError(f"unknown prediction_type {p!r} (epsilon | sample | v_prediction)")
        return (snr.clamp(max=self.cfg.min_snr_gamma) / implied[p]).float()

    # ---- forward process ------------------------------------------------------------------

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator,
                             device="cpu").to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _bcast(self.sqrt_ac, t, x0) * x0 + _bcast(self.sqrt_1m_ac, t, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = self.cfg.prediction_type
        if p == "epsilon":
            return noise
        if p == "sample":
            return x0
        if p == "v_prediction":
            return _bcast(self.sqrt_ac, t, x0) * noise - _bcast(self.sqrt_1m_ac, t, x0) * x0
        raise ValueError(f"unknown prediction_type {p!r} (epsilon | sample | v_prediction)")

    def predict_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 implied by a model output (its mean part) under this parameterization."""
        a, s = _bcast(self.sqrt_ac, t, x_t), _bcast(self.sqrt_1m_ac, t, x_t)
        p = self.cfg.prediction_type
        if p == "epsilon":
            return (x_t - s * out) / a
        if p == "sample":
            return out
        return a * x_t - s * out

    def predict_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = _bcast(self.sqrt_ac, t, x_t), _bcast(self.sqrt_1m_ac, t, x_t)
        p = self.cfg.prediction_type
        if p == "epsilon":
            return out
        if p == "sample":
            return (x_t - a * out) / s
        return s * x_t + a * out

    # ---- losses ---------------------------------------------------------------------------

    def split(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean part and variance values of a model output (channels first after the batch)."""
        if not self.cfg.learn_variance:
            return out, None
        if out.shape[1] != 2 * channels:
            raise ValueError(f"learn_variance needs {2 * channels} output channels, got {out.shape[1]}")
        return out[:, :channels], out[:, channels:]

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses (shape (B,)): ``loss`` (what to minimize), ``mse`` and ``vlb``."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device="cpu",
                                dtype=x0.dtype).to(x0.device)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t)
        mean_out, var_values = self.split(out, x0.shape[1])
        dims = tuple(range(1, x0.ndim))
        mse = (mean_out.float() - self.target(x0, noise, t).float()).pow(2).mean(dim=dims)
        weighted = mse if self.loss_weights is None else mse * self.loss_weights[t.cpu()].to(mse.device)
        losses = {"mse": mse, "loss": weighted}
        if var_values is not None:
            # The bound trains only the variance: the mean is frozen (improved DDPM, Sec. 3.1).
            vlb = self.vlb_terms(mean_out.detach(), var_values, x0, x_t, t)
            losses["vlb"] = vlb
            losses["loss"] = losses["loss"] + self.cfg.vlb_weight * self.num_timesteps * vlb
        return losses

    def p_mean_log_var(self, mean_out: torch.Tensor, var_values: torch.Tensor, x_t: torch.Tensor,
                       t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.predict_x0(mean_out, x_t, t)
        if self.cfg.clip_sample:
            x0 = x0.clamp(-1, 1)
        mean = _bcast(self.posterior_coef_x0, t, x_t) * x0 + _bcast(self.posterior_coef_xt, t, x_t) * x_t
        frac = (var_values.float() + 1) / 2
        min_log = _bcast(self.posterior_log_var, t, x_t).float()
        max_log = _bcast(torch.log(self.betas), t, x_t).float()
        return mean, frac * max_log + (1 - frac) * min_log

    def vlb_terms(self, mean_out: torch.Tensor, var_values: torch.Tensor, x0: torch.Tensor,
                  x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_t in bits per dimension: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)); NLL of x0 at t=0."""
        true_mean = _bcast(self.posterior_coef_x0, t, x_t) * x0 + _bcast(self.posterior_coef_xt, t, x_t) * x_t
        true_log_var = _bcast(self.posterior_log_var, t, x_t).float()
        mean, log_var = self.p_mean_log_var(mean_out, var_values, x_t, t)
        dims = tuple(range(1, x0.ndim))
        kl = normal_kl(true_mean.float(), true_log_var, mean.float(), log_var).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0.float(), mean.float(), 0.5 * log_var)
        nll = nll.mean(dim=dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of 8-bit data scaled to [-1, 1] under a Gaussian discretized to its bins."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min,
                                   torch.log(cdf_delta.clamp(min=1e-12))))
