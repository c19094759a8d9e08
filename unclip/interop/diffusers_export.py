"""``unclip export-diffusers``: registered unclip models -> a diffusers ``UnCLIPPipeline`` folder.

The models are the ones ``unclip generate`` would use (``models:/unclip-<stage>@ALIAS`` from the
run's MLflow, or any URI or checkpoint folder per stage), resolved and loaded the same way. The
folder is written with ``save_pretrained(safe_serialization=True)``: safetensors, JSON and text
only. When the CLIP carries an image encoder, an ``UnCLIPImageVariationPipeline`` is written as a
second folder (``OUT-image-variations`` unless told otherwise), as Karlo publishes its two
pipelines; ``unclip import-diffusers OUT --image-encoder OUT-image-variations`` reads both back.

What maps (each component is checked before anything is written; the error names every one that
does not, and why):

* **imported models** (``import-diffusers``: the ``diffusers_unclip_*`` kinds and the transformers
  CLIP) hold diffusers' and transformers' modules themselves and are written back unchanged, with
  their ``UnCLIPScheduler`` configs: the round trip is exact.
* **our own models do not map** onto the pipeline's classes, each for reasons of function, not of
  weight layout (:data:`NOT_MAPPED`). diffusers' pipeline computes things our models do not: it
  feeds the prior and the decoder CLIP's *raw* projections and, for the unconditional branch of
  guidance, CLIP's encoding of the empty caption, where ours read unit-norm embeddings and learned
  null tokens; its decoder's text projection adds a *linear* map of z_i and z_t to the timestep
  embedding and leaves the four CLIP tokens un-normalised, ours runs z_i (and the caption's last
  token) through an MLP and normalises all context tokens; its super-resolution UNets take no
  noise-augmentation level and see the clean bicubic input (antialiased), ours are conditioned on
  ``t_aug`` and see the noised input; and it samples every stage with ``UnCLIPScheduler`` where
  ours use DDPM/DDIM/DPM-Solver++ on our schedules. A folder diffusers loads but that samples
  something else than our cascade would be a fake mapping, so the export refuses instead.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable, Iterator

from unclip import checkpoint, storage

VARIATIONS_SUFFIX = "-image-variations"
WRITTEN_FILES = (".json", ".txt", ".safetensors")

# kind in config.json -> (diffusers class it would have to become, why it does not map)
NOT_MAPPED = {
    "diffusion_prior": (
        "PriorTransformer + UnCLIPScheduler",
        "its token sequence is PriorTransformer's ([caption, z_t, t, x_t, query], pre-LN blocks), "
        "but the pipeline feeds it CLIP's raw text projection where ours reads the unit-norm z_t, guides it with the empty caption's encoding "
        "where ours uses learned null tokens, does not re-normalise its output, and samples with "
        "UnCLIPScheduler (fixed_small_log) where ours uses strided DDPM/DDIM on our schedule"),
    "ar_prior": (
        "PriorTransformer",
        "an autoregressive prior over quantised PCA codes is no diffusion prior: PriorTransformer "
        "has no equivalent"),
    "decoder": (
        "UNet2DConditionModel + UnCLIPTextProjModel",
        "UnCLIPTextProjModel adds a linear map of z_i and z_t to the timestep embedding and leaves "
        "the four CLIP tokens un-normalised, ours runs [z_i, last caption token] through an MLP "
        "(class_embed_type=projection) and LayerNorms every context token; the pipeline guides "
        "with the empty caption's encoding where ours uses a learned null token, always attends "
        "to caption tokens (use_caption=false has none), has no space-to-depth (patch_size), and "
        "samples with UnCLIPScheduler"),
    "upsampler": (
        "UNet2DModel (super_res_first / super_res_last)",
        "ours is conditioned on a noise-augmentation level (class_embed_type=timestep) and sees "
        "the noised low-resolution image, the pipeline's super-resolution UNets take no level and "
        "see the clean, antialiased bicubic upsampling; ours sample with DDIM on our schedule "
        "(the pipeline: UnCLIPScheduler), and the pipeline has one super-resolution stage only"),
    "clip": (
        "CLIPTextModelWithProjection + CLIPTokenizer",
        "an open_clip CLIP is not converted: no prior or decoder of ours maps onto the pipeline "
        "(see the other lines), so a converted CLIP alone would make no pipeline; the conversion of "
        "open_clip's text tower and BPE tokenizer to transformers' classes is not implemented"),
}


class DiffusersExportError(LookupError):
    """Models that cannot be exported; the message names each component and why (one line each)."""


def _not_mapped(stage: str, ref: str, kind: str) -> str:
    target, why = NOT_MAPPED.get(kind, ("an UnCLIPPipeline component", "no mapping is known"))
    return f"{stage} ({ref}, our {kind!r} model) does not map onto diffusers' {target}: {why}"


def load_for_export(refs, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """The cascade's models (``refs``: a :class:`~unclip.generation.models.ModelRefs`) as diffusers
    and transformers modules; DiffusersExportError naming every one that does not map."""
    from unclip.generation.models import load_stage, resolve
    from unclip.interop.karlo_models import DECODER_KIND, PRIOR_KIND, SUPER_RES_KIND
    from unclip.models.clip import load_clip

    folders: dict[str, str] = {}
    problems: list[str] = []
    want = {"prior": PRIOR_KIND, "decoder": DECODER_KIND, "upsampler1": SUPER_RES_KIND}
    for stage in ("prior", "decoder", "upsampler1"):
        ref = getattr(refs, stage)
        if not ref:
            problems.append(f"{stage}: none given; an UnCLIPPipeline needs one")
            continue
        folders[stage] = resolve(ref)
        kind = str(checkpoint.read_config(folders[stage]).get("kind"))
        if kind != want[stage]:
            problems.append(_not_mapped(stage, ref, kind))
    progress(f"loading CLIP {refs.clip}")
    clip = load_clip(resolve(refs.clip))
    if getattr(clip, "backend", None) != "transformers":
        problems.append(_not_mapped("clip", refs.clip, "clip"))
    if problems:
        raise DiffusersExportError("cannot export to diffusers' UnCLIPPipeline:\n  " + "\n  ".join(problems))
    prior = load_stage(folders["prior"], "prior")
    decoder = load_stage(folders["decoder"], "decoder")
    sr = load_stage(folders["upsampler1"], "upsampler")
    if refs.upsampler2:
        progress(f"{refs.upsampler1} ends the cascade (an imported super-resolution stage): "
                 f"{refs.upsampler2} is not exported")
    from diffusers import UnCLIPScheduler

    c = {"text_encoder": clip.text_model, "tokenizer": clip.tokenizer,
         "prior": prior.prior, "prior_scheduler": UnCLIPScheduler.from_config(prior.scheduler_config),
         "text_proj": decoder.text_proj, "decoder": decoder.unet,
         "decoder_scheduler": UnCLIPScheduler.from_config(decoder.scheduler_config),
         "super_res_first": sr.first, "super_res_last": sr.last,
         "super_res_scheduler": UnCLIPScheduler.from_config(sr.scheduler_config)}
    if clip.has_images:
        c["image_encoder"], c["feature_extractor"] = clip.model["vision"], clip.processor
    _check_dims(c)
    return c


def _check_dims(c: dict[str, Any]) -> None:
    """The models were imported separately: they must read the same CLIP and chain in size."""
    dim = int(c["text_encoder"].config.projection_dim)
    have = {"prior": int(c["prior"].config.embedding_dim),
            "text_proj": int(c["text_proj"].config.clip_embeddings_dim)}
    if "image_encoder" in c:
        have["image_encoder"] = int(c["image_encoder"].config.projection_dim)
    bad = {k: v for k, v in have.items() if v != dim}
    if bad:
        raise DiffusersExportError(f"the models read different CLIPs: embedding width {dim} (text "
                                   f"encoder) but {bad}")
    if int(c["super_res_first"].config.in_channels) != 2 * int(c["decoder"].config.in_channels):
        raise DiffusersExportError("the super-resolution stage does not take the decoder's images "
                                   f"({c['super_res_first'].config.in_channels} input channels for a "
                                   f"{c['decoder'].config.in_channels}-channel decoder)")


TEXT = ("prior", "decoder", "text_encoder", "tokenizer", "text_proj", "super_res_first", "super_res_last",
        "prior_scheduler", "decoder_scheduler", "super_res_scheduler")
VARIATION = ("decoder", "text_encoder", "tokenizer", "text_proj", "feature_extractor", "image_encoder",
             "super_res_first", "super_res_last", "decoder_scheduler", "super_res_scheduler")


def write_pipelines(c: dict[str, Any], out: str, variations: str | None) -> dict[str, str]:
    """``UnCLIPPipeline`` at ``out`` and, with an image encoder, ``UnCLIPImageVariationPipeline``
    at ``variations``: safetensors, JSON and text only. Returns {text, variations} -> folder."""
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline

    written = {"text": out}
    with _local_out(out) as local:
        UnCLIPPipeline(**{k: c[k] for k in TEXT}).save_pretrained(local, safe_serialization=True)
        _fix_text_proj_entry(local)
    if "image_encoder" in c and variations:
        with _local_out(variations) as local:
            UnCLIPImageVariationPipeline(**{k: c[k] for k in VARIATION}).save_pretrained(
                local, safe_serialization=True)
            _fix_text_proj_entry(local)
        written["variations"] = variations
    return written


# diffusers 0.42.1's save_pretrained records text_proj as ["diffusers", "UnCLIPTextProjModel"],
# which its own from_pretrained cannot resolve (the class lives in pipelines.deprecated.unclip and
# the top-level package does not export it), not even when the module is passed in. Recorded as
# a pipelines-submodule entry, from_pretrained accepts a passed-in text_proj (with a warning it
# cannot check its type): ``from_pretrained(out, text_proj=UnCLIPTextProjModel.from_pretrained(
# out, subfolder="text_proj"))``. Karlo's own folders (["unclip", ...], diffusers 0.12) need the
# same argument in this version.
TEXT_PROJ_ENTRY = ["deprecated", "UnCLIPTextProjModel"]


def _fix_text_proj_entry(folder: str) -> None:
    import json

    path = os.path.join(folder, "model_index.json")
    with open(path) as f:
        index = json.load(f)
    index["text_proj"] = TEXT_PROJ_ENTRY
    with open(path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


@contextlib.contextmanager
def _local_out(out: str) -> Iterator[str]:
    """A local folder to write ``out`` into (a temporary one uploaded after, for ``s3://``)."""
    if storage.is_remote(out):
        if storage.exists(storage.join(out, "model_index.json")):
            raise DiffusersExportError(f"{out}: a pipeline is already there; choose another folder")
        with tempfile.TemporaryDirectory() as tmp:
            yield tmp
            _check_written(tmp)
            for dirpath, _, files in os.walk(tmp):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), tmp)
                    with open(os.path.join(dirpath, name), "rb") as f:
                        storage.write_bytes(storage.join(out, *rel.split(os.sep)), f.read())
        return
    if os.path.isdir(out) and os.listdir(out):
        raise DiffusersExportError(f"{out}: exists and is not empty; choose another folder")
    yield out
    _check_written(out)


def _check_written(folder: str) -> None:
    """Everything written is safetensors, JSON or text (nothing pickled)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(WRITTEN_FILES):
                raise DiffusersExportError(f"{os.path.join(dirpath, name)}: not safetensors, JSON or "
                                           "text; refusing to publish it")


def export_diffusers(out: str, refs, variations: str | None = None,
                     progress: Callable[[str], None] = print) -> dict[str, str]:
    """Write the models ``refs`` names as diffusers pipeline folders; returns what was written.

    ``variations``: the folder of the image-variation pipeline (default ``OUT-image-variations``
    when the CLIP has an image encoder)."""
    import torch

    with torch.no_grad():
        c = load_for_export(refs, progress)
    if "image_encoder" in c and not variations:
        variations = out.rstrip("/") + VARIATIONS_SUFFIX
    for folder in (out, variations):  # refuse before writing either
        if not folder:
            continue
        if storage.is_remote(folder) and storage.exists(storage.join(folder, "model_index.json")):
            raise DiffusersExportError(f"{folder}: a pipeline is already there; choose another folder")
        if not storage.is_remote(folder) and os.path.isdir(folder) and os.listdir(folder):
            raise DiffusersExportError(f"{folder}: exists and is not empty; choose another folder")
    progress(f"writing UnCLIPPipeline to {out}")
    written = write_pipelines(c, out, variations)
    if "variations" in written:
        progress(f"writing UnCLIPImageVariationPipeline to {written['variations']}")
    return written
