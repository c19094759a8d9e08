"""DPM-Solver++ on a model with a learned variance, for every parameterization (diffusers slices
the variance channels off only for epsilon-prediction; v-prediction crashed the decoder's dpm)."""

from __future__ import annotations

import pytest
import torch

from unclip.diffusion import DiffusionConfig, sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm", "ddpm"])
def test_learned_variance_samplers(prediction_type: str, sampler: str) -> None:
    cfg = DiffusionConfig.from_dict({"num_train_timesteps": 100, "prediction_type": prediction_type,
                                     "learn_variance": True})
    calls = []

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)  # mean, variance

    x = sample(denoise, (2, 3, 4, 4), cfg, sampler=sampler, steps=5,
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 4, 4) and torch.isfinite(x).all()
    assert len(calls) == 5
