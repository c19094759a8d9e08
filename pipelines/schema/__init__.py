"""The run configuration's schema: one structured config whose every key has a type, a default and,
where it has one, a range.

A model, diffusion, training-loop or sampling default is the library's own dataclass field
(:mod:`pipelines.schema.derive`); a stage's own options are the dataclasses of this package.
``configs/<stage>/default.yaml`` holds only the pipeline's choices where they differ from the
library's, and a preset only what differs from those. Hydra composes ``configs/config.yaml`` onto
this schema (registered in its ConfigStore as ``schema``), so an unknown key or an ill-typed value
fails when the config is composed, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from pipelines.schema import clip
from pipelines.schema.clip import ClipStage
from pipelines.schema.data import DataStage, EmbedStage, FilterStage, PcaStage
from pipelines.schema.decoder import DecoderStage
from pipelines.schema.evaluate import EvaluateStage
from pipelines.schema.prior import PriorStage
from pipelines.schema.upsample import Upsample1Stage, Upsample2Stage
from unclip.options import option

# Subtrees that also take keys the schema does not list (see pipelines.schema.clip.OPEN).
OPEN = clip.OPEN


@dataclass
class Lock:
    """One run at a time per run directory (run_dir/.lock; pipelines/lock.py). On s3:// the lock
    object is refreshed every refresh_s and taken over once not refreshed for stale_after_s."""

    stale_after_s: float = option(120, gt=0)
    refresh_s: float = option(30, gt=0)


@dataclass
class Pipeline:
    # When true, a change of the code version alone marks a stage stale (it is always recorded).
    code_version_invalidates: bool = False
    lock: Lock = field(default_factory=Lock)
    # true: show Ray Data's per-dataset execution plans and progress and Ray Train's controller lines
    # on the console (they are always in Ray's log files under /tmp/ray/session_*/logs).
    verbose: bool = False


@dataclass
class Ray:
    # null: local Ray in-process (or the cluster named by RAY_ADDRESS, which wins).
    address: str | None = "${oc.env:RAY_ADDRESS,null}"
    # Resources of the local in-process Ray; null means all cores of this machine.
    num_cpus: int | None = option(None, ge=1)
    num_gpus: float | None = option(None, ge=0)
    object_store_memory: int | None = option(None, ge=1)
    # Worker processes for parallel work (shard writing, filtering); null = one per CPU.
    parallelism: int | None = option(None, ge=1)
    # Seconds a training worker waits in a collective (and the others at a barrier while rank 0
    # evaluates) before the run fails with a message naming this key; bound it by one evaluation.
    collective_timeout_s: float = option(1800, gt=0)


@dataclass
class Mlflow:
    # null: MLFLOW_TRACKING_URI, else a local sqlite store inside the run directory.
    tracking_uri: str | None = "${oc.env:MLFLOW_TRACKING_URI,null}"
    experiment: str = "unclip"


@dataclass
class Config:
    data: DataStage = field(default_factory=DataStage)
    filter: FilterStage = field(default_factory=FilterStage)
    clip: ClipStage = field(default_factory=ClipStage)
    embed: EmbedStage = field(default_factory=EmbedStage)
    pca: PcaStage = field(default_factory=PcaStage)
    prior: PriorStage = field(default_factory=PriorStage)
    decoder: DecoderStage = field(default_factory=DecoderStage)
    upsample1: Upsample1Stage = field(default_factory=Upsample1Stage)
    upsample2: Upsample2Stage = field(default_factory=Upsample2Stage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    # Set by each preset; names the default run directory.
    preset_name: str = "tiny"
    # Everything a run writes: shards, embeddings, checkpoints, manifests, the local MLflow store.
    # Any fsspec URI (local path or s3://bucket/prefix).
    run_dir: str = "runs/${preset_name}"
    seed: int = 0
    # Share of samples (by key hash) held out of every stage's training: clip's recall@k, the
    # priors' and the decoder's held-out scores and evaluate all use the same keys. The one place
    # to set it; each stage's holdout_fraction follows it (setting a stage's own is refused).
    holdout_fraction: float = option(0.1, gt=0, lt=1)
    pipeline: Pipeline = field(default_factory=Pipeline)
    ray: Ray = field(default_factory=Ray)
    mlflow: Mlflow = field(default_factory=Mlflow)


def node() -> DictConfig:
    """The schema as a config: every default, typed, the :data:`OPEN` subtrees open."""
    cfg = OmegaConf.structured(Config)
    for path in OPEN:
        OmegaConf.set_struct(OmegaConf.select(cfg, path), False)
    return cfg


def register() -> None:
    """Make the schema Hydra's ``schema`` config (the first entry of configs/config.yaml's defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=node())
