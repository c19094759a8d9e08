"""Schema of the clip stage: a pretrained open_clip model when one is configured, else one trained
here.

``source``:

* null: train a CLIP on the filtered shards (``model``, ``train``);
* ``pretrained:<tag>``: open_clip pretrained weights by tag, with ``arch`` (from open_clip's
  download cache, filled once on a machine that reaches the hub);
* a path or ``s3://`` URI: a weights file (with ``arch``) or an unclip checkpoint folder;
* ``models:/<name>@<alias>``: a CLIP registered in MLflow by an earlier run.

The stage records what it resolved (architecture, source, pinned version, weights digest) in
``run_dir/clip/model/config.json``; every later stage loads CLIP from that record alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import II

from pipelines.schema.derive import added
from unclip.generation.models import DEFAULT_NAMES
from unclip.options import option
from unclip.training.loop import AMP_MODES

# Subtrees that take any other option of open_clip's CLIPVisionCfg / CLIPTextCfg (and CLIP's
# quick_gelu): their dataclasses use union types a structured config cannot hold. The keys
# below are typed; open_clip itself rejects an unknown one when the model is built.
OPEN = ("clip.model", "clip.model.vision_cfg", "clip.model.text_cfg")


@dataclass
class VisionTower:
    image_size: int = option(32, ge=1)
    patch_size: int = option(4, ge=1)
    width: int = option(128, ge=1)
    layers: int = option(4, ge=1)
    head_width: int = option(32, ge=1)


@dataclass
class TextTower:
    context_length: int = option(24, ge=1)
    width: int = option(128, ge=1)
    heads: int = option(4, ge=1)
    layers: int = option(3, ge=1)


@dataclass
class ClipModel:
    """A CLIP trained here: open_clip ``CLIP(embed_dim, vision_cfg, text_cfg)``."""

    embed_dim: int = option(128, ge=1)
    vision_cfg: VisionTower = field(default_factory=VisionTower)
    text_cfg: TextTower = field(default_factory=TextTower)


@dataclass
class ClipTrain:
    num_workers: int = option(1, ge=1)   # Ray Train data-parallel workers
    batch_size: int = option(128, ge=1)  # per worker
    epochs: int = option(20, ge=1)
    lr: float = option(1.0e-3, gt=0)
    weight_decay: float = option(0.1, ge=0)
    warmup_steps: int = option(50, ge=0)
    grad_clip: float = option(1.0, gt=0)
    holdout_fraction: float = II("holdout_fraction")  # the run's one held-out split (top level)
    max_holdout: int = option(1000, ge=1)  # cap on held-out samples evaluated
    log_every: int = option(20, ge=1)      # steps between console/MLflow loss lines
    seed: int = II("seed")
    # The decoded, resized training images are kept in Ray's object store for every epoch when they
    # take at most this many MB (tiny: 4000 x 32x32x3 = 12 MB; the paper's 256 px x millions never
    # fit), instead of decoding every epoch; 0: off. Operational: changing it re-runs nothing.
    cache_decoded_max_mb: int = option(1024, ge=0)
    # Added with the shared training template (unclip.training.loop), at defaults that train as
    # before, so they count in the stage's hash only once set: an EMA of the weights (null: none;
    # the EMA is then what is registered), mixed precision (unclip.training.loop.AMP_MODES), and
    # the consecutive non-finite steps skipped before training stops with a clear error.
    ema_decay: float | None = added(option(None, ge=0, le=1))
    amp: str = added(option("off", choices=AMP_MODES))
    max_nonfinite_steps: int = added(option(20, ge=1))


@dataclass
class ClipStage:
    source: str | None = None
    arch: str | None = None  # open_clip architecture name, e.g. ViT-H-14 (read by this stage only)
    register_name: str = DEFAULT_NAMES["clip"]  # MLflow registered model name for a CLIP trained here
    model: ClipModel = field(default_factory=ClipModel)
    train: ClipTrain = field(default_factory=ClipTrain)
    # fine-tune: train (source unset) starting from this CLIP checkpoint (models:/NAME@ALIAS,
    # /VERSION or a folder), built from its own config (model options ignored)
    init_from: str = added(option(""))
