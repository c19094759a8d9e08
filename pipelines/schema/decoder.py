"""Schema of the decoder stage: a GLIDE-style diffusion UNet that turns CLIP image embeddings (and
captions) into images at ``resolution`` px, trained under Ray Train on the filtered shards joined
by key with the embed stage's Parquet."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import II

from pipelines.schema.derive import SHARDING, Seed, added, combine, derive
from unclip.diffusion.config import DiffusionConfig
from unclip.generation.models import DEFAULT_NAMES
from unclip.models.decoder import DecoderConfig
from unclip.models.decoder_sampling import DecoderSampling
from unclip.options import option
from unclip.training.loop import LoopConfig
from unclip.training.sharding import ShardingConfig

# The UNet's options; the stage sets resolution and use_caption from its own keys, learn_variance
# from diffusion.learn_variance and the CLIP widths from the CLIP it loads.
DecoderModel = derive(DecoderConfig, "DecoderModel",
                      exclude=("resolution", "clip_dim", "text_width", "use_caption", "learn_variance"))
DecoderDiffusion = derive(DiffusionConfig, "DecoderDiffusion")
# How held-out embeddings are decoded for evaluation and grids (and recorded with the model).
DecoderSamplingOptions = derive(DecoderSampling, "DecoderSamplingOptions")


@dataclass
class _Workers:
    num_workers: int = option(1, ge=1)   # Ray Train workers
    batch_size: int = option(32, ge=1)   # per worker
    # intra-op threads per worker; null: the node's cores / its workers (not Ray's 1)
    torch_threads: int | None = option(None, ge=1)
    shuffle_buffer: int = option(4096, ge=1)  # rows in each worker's local shuffle buffer


DecoderTrain = combine("DecoderTrain", _Workers, derive(LoopConfig, "DecoderLoop", exclude=("eval_every",)),
                       Seed, derive(ShardingConfig, "DecoderSharding", added=SHARDING),
                       doc="Data parallelism and the shared loop's options (evaluation "
                           "follows eval.grid_every).")


@dataclass
class DecoderEval:
    grid_every: int = option(500, ge=0)  # steps between sample grids (+ quick scores) in MLflow; 0: end only
    grid_images: int = option(16, ge=1)  # fixed held-out embeddings in every grid
    num_images: int = option(200, ge=1)  # held-out embeddings decoded and scored at the end
    detector_size: int = option(64, ge=1)  # decoded images are upscaled (bicubic) to this side first
    # also score the training image nearest each held-out z_i (nn_<score>): how much colour / shape
    # / position the embedding alone pins down
    neighbour_reference: bool = True
    seed: int = 1234   # starting noise of the evaluation decodes (chunk i*batch_size: seed + i*batch_size)
    batch_size: int = option(64, ge=1)  # held-out images decoded at once (bounded memory)


@dataclass
class DecoderStage(derive(DecoderConfig, "DecoderOutput", only=("resolution", "use_caption"))):
    """``resolution``: the output side in px (the upsamplers take it x4 then x4); ``use_caption``:
    also condition on the caption's CLIP token states (cross-attention)."""

    p_drop_clip: float = option(0.1, ge=0, le=1)     # training dropout of z_i, for guidance (the paper: 10%)
    p_drop_caption: float = option(0.5, ge=0, le=1)  # training dropout of the caption (the paper: 50%)
    hflip: bool = False  # random horizontal flips: off, captions say "left" and "right"
    holdout_fraction: float = II("holdout_fraction")  # the same held-out keys in every stage
    register_name: str = DEFAULT_NAMES["decoder"]
    # the champion alias follows this held-out score (val_clip_cosine without ground-truth scenes)
    register_metric: str = "val_object"
    # fine-tune: start from this decoder (models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint
    # folder), built from its own config (model options and diffusion.learn_variance ignored)
    init_from: str = added(option(""))
    model: DecoderModel = field(default_factory=DecoderModel)
    diffusion: DecoderDiffusion = field(default_factory=DecoderDiffusion)
    train: DecoderTrain = field(default_factory=DecoderTrain)
    sampling: DecoderSamplingOptions = field(default_factory=DecoderSamplingOptions)
    eval: DecoderEval = field(default_factory=DecoderEval)
