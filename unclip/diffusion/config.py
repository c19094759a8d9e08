"""The diffusion process of one model: schedule, parameterization, variance."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from unclip.options import option, validate

# diffusers' beta schedules ("squaredcos_cap_v2" is the cosine schedule the paper uses)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = option(1000, ge=1)
    beta_schedule: str = option("squaredcos_cap_v2", choices=BETA_SCHEDULES)
    # What the model predicts: "epsilon", "sample" (x0, the prior) or "v_prediction".
    prediction_type: str = option("epsilon", choices=PREDICTION_TYPES)
    # True: the model also outputs per-pixel interpolation values between the two bounds of the
    # reverse variance (Nichol & Dhariwal), trained with the variational bound, output channels x2.
    learn_variance: bool = False
    # Weight of the variational-bound term when the variance is learned (the "hybrid" loss).
    vlb_weight: float = option(0.001, ge=0)
    # Clamp predicted x0 to [-1, 1] while sampling (images: yes; CLIP embeddings: no).
    clip_sample: bool = True
    # Min-SNR-gamma loss weighting (Hang et al., 2023): 0 keeps the plain MSE of the prediction
    # target; gamma > 0 weights each timestep's MSE so that, measured as an error on x0, its
    # weight is min(SNR_t, gamma), whatever the parameterization. It stops the many easy low-noise
    # steps from outvoting the high- and mid-noise ones where layout and shape are decided.
    min_snr_gamma: float = option(0.0, ge=0)

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DiffusionConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown diffusion option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
