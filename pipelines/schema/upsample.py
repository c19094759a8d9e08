"""Schemas of the two x4 diffusion upsamplers: ``upsample1`` (unCLIP's 64 -> 256, conditioned on a
Gaussian-blurred low-res image) and ``upsample2`` (256 -> 1024, on a BSR-degraded one: random blur
and resize kernels, Gaussian and Poisson-like noise, JPEG; unclip/data/degradations.py). Both read
only the filtered shards; the presets set the resolutions and the sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import II

from pipelines.schema.derive import SHARDING, Seed, added, combine, derive
from unclip.data.degradations import BlurConfig, BSRConfig
from unclip.diffusion.config import DiffusionConfig
from unclip.generation.models import DEFAULT_NAMES
from unclip.models.upsampler import UpsamplerConfig
from unclip.options import option
from unclip.training.loop import LoopConfig
from unclip.training.sharding import ShardingConfig

# The UNet's options (conv-only, no attention anywhere); the stage sets scale, kind, the diffusion
# and the sampling from its own keys.
UpsamplerModel = derive(UpsamplerConfig, "UpsamplerModel",
                        exclude=("scale", "diffusion", "sampler", "steps", "kind"))
# A fixed variance (few-step DDIM sampling does not use a learned one), hence no vlb_weight.
UpsamplerDiffusion = derive(DiffusionConfig, "UpsamplerDiffusion", exclude=("vlb_weight",),
                            added=("min_snr_gamma",))
UpsamplerSampling = derive(UpsamplerConfig, "UpsamplerSampling", only=("sampler", "steps"))
BlurDegradation = derive(BlurConfig, "BlurDegradation")
BSRDegradation = derive(BSRConfig, "BSRDegradation")


@dataclass
class _Workers:
    num_workers: int = option(1, ge=1)      # Ray Train data-parallel workers
    batch_size: int = option(32, ge=1)      # crops per worker per step
    max_train_images: int | None = option(None, ge=1)  # cap on training images (null: all)
    cache_images: bool = True               # keep decoded images in worker memory (false: stream)


UpsampleTrain = combine("UpsampleTrain", _Workers, derive(LoopConfig, "UpsamplerLoop"), Seed,
                        derive(ShardingConfig, "UpsamplerSharding", added=SHARDING),
                        doc="The data, the workers and the shared loop's options.")


@dataclass
class UpsampleValidation:
    max_images: int = option(16, ge=1)  # held-out images upsampled at full size
    batch_size: int = option(4, ge=1)
    grid_rows: int = option(4, ge=1)    # rows of [degraded input, bicubic, model, original] in samples.png
    seed: int = II("seed")              # seeds the held-out corruptions and the sampling noise


@dataclass
class Upsample1Stage:
    kind: str = option("blur", choices=("blur",))     # the conditioning corruption of this stage
    scale: int = option(UpsamplerConfig.scale, ge=1)  # low-res side = high_res / scale
    high_res: int = option(256, ge=1)                 # target side; images are resized to it
    crop_fraction: float = option(0.25, gt=0, le=1)   # training crops: this share of the target side
    degradation: BlurDegradation = field(default_factory=BlurDegradation)
    model: UpsamplerModel = field(default_factory=UpsamplerModel)
    diffusion: UpsamplerDiffusion = field(default_factory=UpsamplerDiffusion)
    sampling: UpsamplerSampling = field(default_factory=UpsamplerSampling)
    train: UpsampleTrain = field(default_factory=UpsampleTrain)
    validation: UpsampleValidation = field(default_factory=UpsampleValidation)
    holdout_fraction: float = II("holdout_fraction")  # the same held-out keys as every stage
    register_name: str = DEFAULT_NAMES["upsampler1"]
    # fine-tune: start from this upsampler (models:/NAME@ALIAS, /VERSION or a checkpoint folder),
    # built from its own config (model, diffusion and sampling options ignored; same scale)
    init_from: str = added(option(""))


@dataclass
class Upsample2Stage(Upsample1Stage):
    """upsample1's keys (in its order), with a BSR degradation and larger images."""

    kind: str = option("bsr", choices=("bsr",))
    high_res: int = option(1024, ge=1)
    degradation: BSRDegradation = field(default_factory=BSRDegradation)
    # decoded high-res images are large: cap what the workers keep
    train: UpsampleTrain = field(default_factory=lambda: UpsampleTrain(batch_size=16,
                                                                       max_train_images=1000))
    validation: UpsampleValidation = field(default_factory=lambda: UpsampleValidation(max_images=8,
                                                                                      batch_size=2))
    register_name: str = DEFAULT_NAMES["upsampler2"]
