"""Gaussian diffusion maths shared by the prior, the decoder and the upsamplers.

Kept apart from the models (which only map ``(x_t, t, conditioning) -> output``) and from the
training loops. Noise schedules and samplers are diffusers schedulers; what diffusers lacks for
training (the variational bound that learns the variance, DDIM inversion) lives here.
"""

from unclip.diffusion.config import DiffusionConfig
from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.sampling import SAMPLERS, ddim_invert, guide, make_scheduler, sample

__all__ = ["DiffusionConfig", "GaussianDiffusion", "SAMPLERS", "ddim_invert", "guide",
           "make_scheduler", "sample"]
