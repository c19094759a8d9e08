"""What an upsampler training step needs, framework-free: random crop batches and the loss.

Crops are a quarter of the target side (the paper's 256 crops of 1024 images); each crop is
corrupted on the fly with a fresh draw of the stage's degradation, so every epoch sees new
corruptions of new crops. The Ray Train worker (``stages/upsample.py``) and the in-process tests
use the same code.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from unclip.data.degradations import augment_low_res, config_for, degrade, sample_aug_levels
from unclip.devices import model_device
from unclip.diffusion import GaussianDiffusion

Batch = tuple[torch.Tensor, torch.Tensor]


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)


def crop_each(images: np.ndarray, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """One random ``crop`` x ``crop`` crop of every image, float (N, 3, crop, crop) in [0, 1]."""
    n, h, w, _ = images.shape
    if crop > min(h, w):
        raise ValueError(f"crop size {crop} is larger than the images ({h}x{w})")
    ys, xs = rng.integers(0, h - crop + 1, n), rng.integers(0, w - crop + 1, n)
    return to_unit(np.stack([im[y:y + crop, x:x + crop] for im, y, x in zip(images, ys, xs)]))


def random_crops(images: np.ndarray, n: int, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random ``crop`` x ``crop`` crops of random images, float (n, 3, crop, crop) in [0, 1]."""
    return crop_each(images[rng.integers(0, len(images), n)], crop, rng)


class CropBatches:
    """``batches(epoch)`` for the step loop: (high-res crops, degraded low-res crops) in [-1, 1].

    Deterministic per (seed, rank, epoch), so a resumed run draws the same crops as an unbroken one
    from its epoch on.
    """

    def __init__(self, images: np.ndarray, batch_size: int, crop: int, scale: int, kind: str,
                 degradation: Mapping[str, Any] | None = None, seed: int = 0, rank: int = 0,
                 steps_per_epoch: int | None = None):
        if len(images) == 0:
            raise ValueError("no training images")
        if crop % scale:
            raise ValueError(f"crop size {crop} is not divisible by the scale factor {scale}")
        self.images, self.batch_size, self.crop, self.scale = images, batch_size, crop, scale
        self.kind, self.cfg = kind, config_for(kind, degradation)
        self.seed, self.rank = seed, rank
        self.steps_per_epoch = steps_per_epoch or max(1, len(images) // batch_size)

    def __call__(self, epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        for _ in range(self.steps_per_epoch):
            hr = random_crops(self.images, self.batch_size, self.crop, rng)
            low = degrade(self.kind, hr, self.scale, rng, self.cfg)
            yield hr * 2 - 1, low * 2 - 1


def make_step_loss(diffusion: GaussianDiffusion, aug_max_level: int,
                   generator: torch.Generator | None = None
                   ) -> Callable[[torch.nn.Module, Batch], dict[str, torch.Tensor]]:
    """The epsilon-MSE of the upsampler on a batch, with noise-level conditioning augmentation:
    the low-res input is noised at a random level t_aug that the model is told."""

    def step_loss(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        hr, low = batch
        device = model_device(model)
        hr, low = hr.to(device), low.to(device)
        t_aug = sample_aug_levels(hr.shape[0], aug_max_level, generator).to(device)
        low_aug = augment_low_res(low, t_aug, diffusion, generator)
        losses = diffusion.training_losses(lambda x_t, t: model(x_t, t, low, t_aug, low_aug), hr,
                                           generator=generator)
        return {"loss": losses["loss"].mean()}

    return step_loss
