"""Schema of the prior stage: P(z_i | caption), trained on the embed stage's Parquet embeddings
(Ray Train), as a diffusion prior or an autoregressive one (which reads the pca stage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import II

from pipelines.schema.derive import SHARDING, Seed, added, combine, derive
from unclip.diffusion.config import DiffusionConfig
from unclip.generation.models import DEFAULT_NAMES
from unclip.models.ar_prior import ARPriorConfig, ARPriorSampling
from unclip.models.prior import PriorConfig, PriorSampling
from unclip.models.priors import KINDS
from unclip.options import option
from unclip.training.loop import LoopConfig
from unclip.training.sharding import ShardingConfig


# The model options a user sets; the stage sets the rest from the CLIP it loads (dim, text width,
# context length), the embeddings (scale, mean) and the PCA (buckets).
DiffusionPriorModel = derive(PriorConfig, "DiffusionPriorModel",
                             exclude=("dim", "text_width", "max_text_len", "embed_scale",
                                      "embed_mean", "diffusion"))
# x0-prediction without clipping is fixed: only the schedule is an option.
PriorProcess = derive(DiffusionConfig, "PriorProcess", only=("num_train_timesteps", "beta_schedule"))
DiffusionPriorSampling = derive(PriorSampling, "DiffusionPriorSampling")
ARSampling = derive(ARPriorSampling, "ARPriorSamplingOptions")


@dataclass
class _Components:
    # leading PCA components modelled; null: every component the pca stage kept (the paper: 319)
    n_components: int | None = option(None, ge=1)


ARPriorModel = combine("ARPriorModel",
                       derive(ARPriorConfig, "ARPriorWidths",
                              only=("width", "layers", "heads", "dropout", "cond_drop_prob")),
                       _Components, derive(ARPriorConfig, "ARPriorSimilarity", only=("sim_buckets",)))


@dataclass
class PriorOptim:
    """AdamW per prior kind (the paper's Table 3: the diffusion prior's by default)."""

    lr: float = option(1.1e-4, gt=0)
    adam_beta2: float = option(0.96, gt=0, lt=1)
    adam_eps: float = option(1.0e-6, gt=0)
    weight_decay: float = option(6.0e-2, ge=0)
    ema_decay: float = option(0.9999, ge=0, le=1)


@dataclass
class DiffusionPriorSpec:
    # Causal Transformer over [caption tokens, z_t, timestep, noised z_i, query]; x0-prediction.
    model: DiffusionPriorModel = field(default_factory=DiffusionPriorModel)
    # x = embed_scale * z_i: a number (the paper: 17.2 for 1024-d), sqrt_dim (unit RMS per dim for
    # unit vectors) or unit_variance (unit per-dim variance about the training mean, measured).
    embed_scale: Any = "sqrt_dim"
    embed_center: bool = False  # subtract the training mean of z_i first (stored in the model)
    process: PriorProcess = field(default_factory=PriorProcess)
    sampling: DiffusionPriorSampling = field(default_factory=DiffusionPriorSampling)
    optim: PriorOptim = field(default_factory=PriorOptim)


@dataclass
class ARPriorSpec:
    # Causal Transformer over [caption tokens, z_t, z_i.z_t token, PCA bucket codes].
    model: ARPriorModel = field(default_factory=ARPriorModel)
    sampling: ARSampling = field(default_factory=ARSampling)
    optim: PriorOptim = field(default_factory=lambda: PriorOptim(
        lr=1.6e-4, adam_beta2=0.91, adam_eps=1.0e-10, weight_decay=4.0e-2, ema_decay=0.999))


@dataclass
class _Workers:
    num_workers: int = option(1, ge=1)   # Ray Train data-parallel workers
    batch_size: int = option(256, ge=1)  # per worker


PriorTrain = combine("PriorTrain", _Workers,
                     derive(LoopConfig, "PriorLoop", exclude=("lr", "weight_decay", "ema_decay"),
                            added=("max_nonfinite_steps",)), Seed,
                     derive(ShardingConfig, "PriorSharding", added=SHARDING),
                     doc="The shared loop's options (lr, weight decay and EMA: each kind's optim).")


@dataclass
class PriorStage:
    kind: str = option("diffusion", choices=KINDS)
    register_name: str = DEFAULT_NAMES["prior"]  # MLflow registered model; champion: best held-out cosine
    # Held-out captions: the CLIP stage's split, so no stage ever trains on another's validation set.
    holdout_fraction: float = II("holdout_fraction")
    max_holdout: int = option(1000, ge=1)  # held-out captions sampled for validation (cost: k x steps each)
    cache_text_encodings: bool = True      # keep each caption's CLIP token states per worker (small data)
    cache_data_in_memory: bool = True      # keep a worker's data shard after the first epoch (small data)
    diffusion: DiffusionPriorSpec = field(default_factory=DiffusionPriorSpec)
    autoregressive: ARPriorSpec = field(default_factory=ARPriorSpec)
    train: PriorTrain = field(default_factory=PriorTrain)
    # fine-tune: start from this diffusion prior (models:/NAME@ALIAS, /VERSION or a checkpoint
    # folder), built from its own config (the kind's model options ignored)
    init_from: str = added(option(""))
