"""Which registered models a generation uses, and loading them once (cached on local disk)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

# The names the pipeline's stages register under: the default of each stage's `register_name`
# (pipelines/schema) and of the unclip command's model options.
DEFAULT_NAMES = {"clip": "unclip-clip", "pca": "unclip-pca", "prior": "unclip-prior",
                 "decoder": "unclip-decoder", "upsampler1": "unclip-upsampler1",
                 "upsampler2": "unclip-upsampler2"}
# The whole cascade, registered by the evaluate stage: its pyfunc generates from a prompt.
CASCADE_NAME = "unclip"


@dataclass(frozen=True)
class ModelRefs:
    """A URI per model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, or a checkpoint folder.
    ``prior`` or ``decoder`` None: that stage is not loaded (a registered stage model's own use)."""

    clip: str
    prior: str | None
    decoder: str | None
    upsampler1: str | None = None
    upsampler2: str | None = None
    pca: str | None = None

    @classmethod
    def registered(cls, alias: str = "champion", **overrides: str | None) -> "ModelRefs":
        refs = {f.name: f"models:/{DEFAULT_NAMES[f.name]}@{alias}" for f in fields(cls)}
        return replace(cls(**refs), **{k: v for k, v in overrides.items() if v is not None})


def default_tracking_uri(run_dir: str = "runs/tiny") -> str:
    """The store `make pipeline` wrote to: MLFLOW_TRACKING_URI, else the run directory's sqlite."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{os.path.abspath(os.path.join(run_dir, 'mlflow.db'))}"


def resolve(uri: str) -> str:
    """A local checkpoint folder for ``uri``; LookupError with a one-line reason if it is missing."""
    from unclip import checkpoint, storage
    from unclip.registry import resolve_checkpoint

    folder = resolve_checkpoint(uri)
    if not storage.exists(storage.join(folder, checkpoint.CONFIG)):
        raise LookupError(f"{uri}: no unclip checkpoint there (no {checkpoint.CONFIG})")
    return folder


def load_stage(folder: str, stage: str):
    """The model of ``stage`` (prior, decoder, upsampler) in a checkpoint folder, ours or imported:
    the ``kind`` in its config.json says which class loads it (imported diffusers models are
    adapters in :mod:`unclip.interop.karlo_models`, loaded only when a folder holds one)."""
    from unclip import checkpoint

    kind = checkpoint.read_config(folder).get("kind")
    if str(kind).startswith("diffusers_unclip_"):
        from unclip.interop.karlo_models import LOADERS, STAGE_KINDS

        if STAGE_KINDS.get(stage) != kind:
            raise checkpoint.CheckpointError(f"{folder}: holds an imported {kind!r}, not a {stage}")
        return LOADERS[kind](folder)
    if stage == "prior":
        from unclip.models.prior import load_prior

        return load_prior(folder)
    if stage == "decoder":
        from unclip.models.decoder import load_decoder

        return load_decoder(folder)
    if stage == "upsampler":
        from unclip.models.upsampler import Upsampler

        return Upsampler.from_checkpoint(folder)
    raise ValueError(f"unknown stage {stage!r}")
