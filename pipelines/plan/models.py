"""Every trained model of the pipeline, built on the meta device the way its stage builds it.

Meta tensors have shapes and no storage: the paper's 2B-parameter decoder costs nothing to build,
and nothing is downloaded (a pretrained CLIP is built from open_clip's architecture config,
without weights). The stages build their model configs inline in ``run`` from the CLIP they load;
here the same library functions are called with the dimensions the configured CLIP implies.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from pipelines.config import ConfigError, to_container
from pipelines.context import StageContext
from unclip import checkpoint, storage

META = torch.device("meta")


@dataclass(frozen=True)
class Built:
    """One model as a stage trains (or only holds) it."""

    stage: str          # the stage (config group) that trains or loads it
    name: str           # what the plan's row calls it
    params: int
    paper: str          # key of its figure in plan.PAPER_PARAMS
    trained: bool       # False: a frozen pretrained CLIP, or the prior kind not configured
    ema: bool           # the stage keeps an EMA copy on every worker
    note: str = ""
    module: torch.nn.Module | None = field(default=None, compare=False, repr=False)  # on meta


def named(key: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)``, its ValueError / TypeError / KeyError turned into a ConfigError naming ``key``
    (and diffusers' NotImplementedError for an unknown beta_schedule)."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        msg = str(exc.args[0] if exc.args else exc).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from exc


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- CLIP --------------------------------------------------------------------------------------


def clip_encoder(cfg: DictConfig, device: torch.device = META):
    """(ClipEncoder on meta, how it was sized, trained here?) for ``clip.source`` / ``clip.arch``.

    ``device``: another device builds the same model there with random weights (bench.gpu_check)."""
    from unclip.models.clip import ClipEncoder, create_custom

    c = cfg.clip
    if not c.source:  # the clip stage trains clip.model
        model_cfg = to_container(c.model)
        with device:
            model = named("clip.model", create_custom, model_cfg)
        return ClipEncoder(model, {"arch": "custom"}, model_cfg), "clip.model", True
    source = str(c.source)
    if source.startswith("models:/"):
        raise ConfigError(f"clip.source: plan does not read the MLflow registry ({source}); point "
                          "clip.source at the checkpoint folder, or a weights file with clip.arch")
    folder_cfg = storage.join(source, checkpoint.CONFIG)
    if not storage.is_remote(source) and storage.exists(folder_cfg):  # an unclip checkpoint folder
        model_cfg = named("clip.source", checkpoint.read_config, source, "clip")["config"]
        with device:
            model = named("clip.source", create_custom, model_cfg)
        return ClipEncoder(model, {"arch": "custom"}, model_cfg), f"checkpoint {source}", False
    return _open_clip(source, c.arch, device), f"open_clip {c.arch} ({source})", False


def _open_clip(source: str, arch: str | None, device: torch.device = META):
    import open_clip

    from unclip.models.clip import ClipEncoder

    if not arch and storage.is_remote(source):
        raise ConfigError(f"clip.source: plan reads nothing remote ({source}); set clip.arch when it "
                          "is a weights file, or plan with a local copy of the checkpoint folder")
    if not arch:
        raise ConfigError(f"clip.arch: required with clip.source {source!r} (an open_clip "
                          "architecture name, e.g. ViT-H-14)")
    arch_cfg = open_clip.get_model_config(arch)
    if arch_cfg is None:
        raise ConfigError(f"clip.arch: {arch!r} is not an open_clip architecture "
                          "(see open_clip.list_models())")
    if "hf_model_name" in arch_cfg.get("text_cfg", {}):
        raise ConfigError(f"clip.arch: {arch}'s text tower is a Hugging Face model whose config "
                          "needs a download; plan sizes only open_clip's own towers")
    if source.startswith("pretrained:"):
        tag, tags = source.split(":", 1)[1], open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            raise ConfigError(f"clip.source: open_clip has no pretrained tag {tag!r} for {arch} "
                              f"(it has {', '.join(tags) or 'none'})")
    elif not storage.is_remote(source) and not os.path.exists(source):
        raise ConfigError(f"clip.source: {source!r} is not pretrained:<tag>, nor an existing weights "
                          "file or checkpoint folder")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights loaded": none were asked for
    try:
        with device:
            model = open_clip.create_model(arch, pretrained=None, device=device)
    finally:
        root.setLevel(level)
    return ClipEncoder(model, {"arch": arch})


# ---- the trained models -------------------------------------------------------------------------


def priors(cfg: DictConfig, clip, device: torch.device = META, only: str | None = None) -> list[Built]:
    """Both prior kinds (the configured one first), with the prior stage's model config (built on
    ``device``: meta unless a benchmark asks for real weights; ``only``: that kind alone)."""
    from unclip.models.priors import KINDS, build_model
    from unclip.diffusion import GaussianDiffusion
    from unclip.models.prior import PriorConfig, resolve_embed_scale

    kind = str(cfg.prior.kind)
    out = []
    for k in sorted(KINDS, key=lambda x: x != kind):
        if only is not None and k != only:
            continue
        spec = to_container(cfg.prior[k])
        model_cfg = {**spec["model"], "dim": clip.dim, "text_width": clip.text_width,
                     "max_text_len": clip.context_length}
        note = ""
        if k == "diffusion":
            rule = spec["embed_scale"]
            if rule == "unit_variance":  # measured on the training embeddings at run time
                model_cfg["embed_scale"], note = 1.0, "embed_scale measured at run time"
            else:
                model_cfg["embed_scale"] = named("prior.diffusion.embed_scale", resolve_embed_scale,
                                                 rule, clip.dim)
            if spec.get("embed_center"):
                model_cfg["embed_mean"] = [0.0] * clip.dim
            model_cfg["diffusion"] = spec["process"]
            pcfg = named("prior.diffusion.model", PriorConfig.from_dict, model_cfg)
            named("prior.diffusion.process", lambda: GaussianDiffusion(pcfg.diffusion_config))
        else:
            kept = int(cfg.pca.n_components or clip.dim)
            if kept > clip.dim:
                raise ConfigError(f"pca.n_components: {kept} > the CLIP's embedding dim {clip.dim}")
            model_cfg["n_components"] = int(model_cfg.get("n_components") or kept)
            if model_cfg["n_components"] > kept:
                raise ConfigError(f"prior.autoregressive.model.n_components: "
                                  f"{model_cfg['n_components']} > the {kept} the pca stage keeps")
            model_cfg["num_buckets"] = int(cfg.pca.num_buckets)
        with device:
            model = named(f"prior.{k}.model", build_model, k, model_cfg)
        label = "diffusion prior" if k == "diffusion" else "AR prior"
        out.append(Built("prior", label, count(model), f"prior/{k}", k == kind, True,
                         note if k == kind else f"not trained: prior.kind is {kind}", model))
    return out


def decoder(cfg: DictConfig, clip, device: torch.device = META) -> Built:
    from stages.decoder import model_config
    from unclip.diffusion import DiffusionConfig, GaussianDiffusion
    from unclip.models.decoder import Decoder, DecoderConfig

    mcfg = model_config(StageContext(cfg, "decoder", "", {}), clip.dim, clip.text_width)
    dcfg = named("decoder.model", DecoderConfig.from_dict, mcfg)
    named("decoder.model", dcfg.validate)
    diffusion = named("decoder.diffusion", DiffusionConfig.from_dict, to_container(cfg.decoder.diffusion))
    named("decoder.diffusion", GaussianDiffusion, diffusion)
    with device:
        model = named("decoder.model", Decoder, dcfg, diffusion)
    return Built("decoder", "decoder", count(model), "decoder", True, True,
                 "paper: GLIDE's, with its ~1.2B text transformer; this one reads CLIP's", model)


def upsampler(cfg: DictConfig, name: str, device: torch.device = META) -> Built:
    from stages.upsample import model_config, sizes
    from unclip.data.degradations import config_for
    from unclip.diffusion import DiffusionConfig, GaussianDiffusion
    from unclip.models.upsampler import Upsampler

    c = cfg[name]
    high, low, crop = named(name, sizes, c)
    diffusion = named(f"{name}.diffusion", DiffusionConfig.from_dict, to_container(c.diffusion))
    named(f"{name}.diffusion", GaussianDiffusion, diffusion)
    mcfg = named(f"{name}.model", model_config, c)
    multiple = Upsampler.multiple_for(mcfg)
    if crop % multiple or high % multiple:
        raise ConfigError(f"{name}.high_res: crop {crop} and high_res {high} must be divisible by "
                          f"{multiple} for a UNet with {len(mcfg['channels'])} levels")
    named(f"{name}.degradation", config_for, str(c.kind), to_container(c.degradation))
    with device:
        model = named(f"{name}.model", Upsampler, mcfg)
    return Built(name, f"upsampler {low}->{high}", count(model), name, True, True,
                 f"{crop} px training crops", model)
