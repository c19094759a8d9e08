"""``unclip import-diffusers``: a diffusers unCLIP pipeline folder -> registered unclip models.

An ``UnCLIPPipeline`` folder (Karlo's layout: ``prior``, ``decoder``, ``text_proj``,
``super_res_first`` / ``super_res_last``, three ``UnCLIPScheduler``s, ``text_encoder``,
``tokenizer``), or an ``UnCLIPImageVariationPipeline`` one (no prior; ``image_encoder`` and
``feature_extractor``), local or under an ``s3://`` prefix, becomes four unclip checkpoints,
registered in the run's MLflow under the names the pipeline's stages use:

==================  =====================================================================
``unclip-clip``     text encoder + tokenizer (+ image encoder + image processor): the
                    transformers CLIP backend (:mod:`unclip.interop.hf_clip`)
``unclip-prior``    ``prior`` + ``prior_scheduler`` (text-to-image pipelines only)
``unclip-decoder``  ``text_proj`` + ``decoder`` + ``decoder_scheduler``
``unclip-upsampler1``  ``super_res_first`` + ``super_res_last`` + ``super_res_scheduler``: Karlo
                    has one super-resolution stage (64 -> 256) run by two UNets, so there is
                    no ``unclip-upsampler2``; the cascade ends after it
==================  =====================================================================

Only safetensors, JSON and text files are read (a remote prefix is staged with nothing else), so
a folder that holds pickled ``.bin`` weights only is refused, not unpickled. The image encoder of
variations may come from a second folder (``image_encoder``): Karlo publishes its text-to-image
and its variation pipelines separately, with the same decoder and super-resolution weights.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator

import torch

from unclip import storage

PIPELINES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")
STAGED_FILES = (".json", ".txt", ".safetensors")
INDEX = "model_index.json"


class DiffusersImportError(LookupError):
    """A folder that cannot be imported; the message names it and says why (one line)."""


@contextlib.contextmanager
def local_pipeline(source: str) -> Iterator[str]:
    """A local folder with ``source``'s pipeline: itself, or a temporary copy of an ``s3://``
    prefix holding its index and each component's safetensors, JSON and text files only."""
    if not storage.is_remote(source):
        if not os.path.isfile(os.path.join(source, INDEX)):
            raise DiffusersImportError(f"{source}: no {INDEX}; not a diffusers pipeline folder")
        yield source
        return
    if not storage.exists(storage.join(source, INDEX)):
        raise DiffusersImportError(f"{source}: no {INDEX}; not a diffusers pipeline folder")
    index = storage.read_json(storage.join(source, INDEX))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, INDEX), "wb") as f:
            f.write(storage.read_bytes(storage.join(source, INDEX)))
        for sub in (k for k, v in index.items() if isinstance(v, list)):
            for src in storage.list_files(storage.join(source, sub), STAGED_FILES):
                os.makedirs(os.path.join(tmp, sub), exist_ok=True)
                with open(os.path.join(tmp, sub, storage.basename(src)), "wb") as f:
                    f.write(storage.read_bytes(src))
        yield tmp


def read_index(folder: str) -> dict[str, Any]:
    index = storage.read_json(os.path.join(folder, INDEX))
    if index.get("_class_name") not in PIPELINES:
        raise DiffusersImportError(f"{folder}: a {index.get('_class_name')}, not one of {', '.join(PIPELINES)}")
    return index


def _weights(folder: str, sub: str) -> str:
    """``folder/sub``, checked to hold safetensors weights (pickled ones are never loaded)."""
    path = os.path.join(folder, sub)
    if not os.path.isdir(path):
        raise DiffusersImportError(f"{folder}: no {sub}/ component")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise DiffusersImportError(f"{path}: no .safetensors weights (pickled weights are not loaded; "
                                   "convert them with save_pretrained(safe_serialization=True))")
    return path


def load_components(folder: str, image_encoder: str | None = None) -> dict[str, Any]:
    """The pipeline's components, weights-only, in float32 (``image_encoder``: a second pipeline
    folder holding ``image_encoder/`` and ``feature_extractor/``)."""
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)

    from unclip.interop.karlo_models import text_proj_class

    index = read_index(folder)
    kw = dict(use_safetensors=True, local_files_only=True)
    where = image_encoder or (folder if "image_encoder" in index else None)
    needed = [(folder, sub) for sub in ("text_encoder", "text_proj", "decoder", "super_res_first",
                                        "super_res_last", *(("prior",) if "prior" in index else ()))]
    for path, sub in needed + ([(where, "image_encoder")] if where else []):
        _weights(path, sub)  # every component checked before any is loaded

    def model(cls, sub: str, where: str = folder):
        return cls.from_pretrained(_weights(where, sub), **kw).float().eval()

    def scheduler(sub: str):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise DiffusersImportError(f"{folder}: no {sub}/ component")
        return UnCLIPScheduler.from_pretrained(folder, subfolder=sub, local_files_only=True)

    if not os.path.isdir(os.path.join(folder, "tokenizer")):
        raise DiffusersImportError(f"{folder}: no tokenizer/ component")
    out: dict[str, Any] = {
        "class": index["_class_name"],
        "text_encoder": model(CLIPTextModelWithProjection, "text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True),
        "text_proj": model(text_proj_class(), "text_proj"),
        "decoder": model(UNet2DConditionModel, "decoder"),
        "decoder_scheduler": scheduler("decoder_scheduler"),
        "super_res_first": model(UNet2DModel, "super_res_first"),
        "super_res_last": model(UNet2DModel, "super_res_last"),
        "super_res_scheduler": scheduler("super_res_scheduler"),
    }
    if "prior" in index:
        out["prior"] = model(PriorTransformer, "prior")
        out["prior_scheduler"] = scheduler("prior_scheduler")
    if where is not None:
        out["image_encoder"] = model(CLIPVisionModelWithProjection, "image_encoder", where)
        if not os.path.isdir(os.path.join(where, "feature_extractor")):
            raise DiffusersImportError(f"{where}: no feature_extractor/ beside its image_encoder/")
        out["feature_extractor"] = CLIPImageProcessor.from_pretrained(
            os.path.join(where, "feature_extractor"), local_files_only=True)
    _check_dims(folder, out)
    return out


def _check_dims(folder: str, c: dict[str, Any]) -> None:
    dim = int(c["text_encoder"].config.projection_dim)
    have = {"text_proj": int(c["text_proj"].config.clip_embeddings_dim)}
    if "prior" in c:
        have["prior"] = int(c["prior"].config.embedding_dim)
    if "image_encoder" in c:
        have["image_encoder"] = int(c["image_encoder"].config.projection_dim)
    bad = {k: v for k, v in have.items() if v != dim}
    if bad:
        raise DiffusersImportError(f"{folder}: CLIP embedding width {dim} (text encoder) but {bad}")


def convert(folder: str, out: str, image_encoder: str | None = None,
            source: str | None = None) -> dict[str, str]:
    """Write the pipeline at ``folder`` as unclip checkpoints under ``out``; returns
    {clip, prior (if any), decoder, upsampler1} -> checkpoint folder."""
    import diffusers

    from unclip.interop.hf_clip import HFClipEncoder
    from unclip.interop.karlo_models import (DECODER_SAMPLING, PRIOR_SAMPLING, SUPER_RES_STEPS,
                                             KarloDecoder, KarloPrior, KarloSuperRes, config_json)

    c = load_components(folder, image_encoder)
    origin = {"source": source or folder, "pipeline": c["class"], "diffusers_version": diffusers.__version__,
              **({"image_encoder": image_encoder} if image_encoder else {})}
    clip = HFClipEncoder(c["text_encoder"], c["tokenizer"], c.get("image_encoder"), c.get("feature_extractor"))
    null = clip.null_caption()
    length, width = null[1].shape
    folders = {"clip": os.path.join(out, "clip")}
    clip.save(folders["clip"], {"imported_from": {**origin, "component": "text_encoder"}})
    if "prior" in c:
        prior = KarloPrior(c["prior"], config_json(c["prior_scheduler"]), length, width)
        prior.set_null_caption(*null)
        folders["prior"] = os.path.join(out, "prior")
        prior.save(folders["prior"], {"sampling": PRIOR_SAMPLING, "imported_from": {**origin, "component": "prior"}})
    decoder = KarloDecoder(c["text_proj"], c["decoder"], config_json(c["decoder_scheduler"]),
                           int(null[0].shape[0]), length, width)
    decoder.set_null_caption(*null)
    folders["decoder"] = os.path.join(out, "decoder")
    decoder.save(folders["decoder"], {"sampling": DECODER_SAMPLING,
                                      "imported_from": {**origin, "component": "decoder"}})
    sr = KarloSuperRes(c["super_res_first"], c["super_res_last"], config_json(c["super_res_scheduler"]),
                       SUPER_RES_STEPS)
    folders["upsampler1"] = os.path.join(out, "upsampler1")
    sr.save(folders["upsampler1"], {"imported_from": {**origin, "component": "super_res"}})
    return folders


def _experiment(run_dir: str, uri: str, name: str) -> str:
    """The run's experiment, created as the pipeline creates it (artifacts under the run dir for a
    database store, where the server decides for a tracking server)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not uri.startswith(("http://", "https://", "databricks")):
        loc = storage.join(run_dir, "mlartifacts")
        location = loc if storage.is_remote(loc) else "file://" + os.path.abspath(loc)
    return mlflow.create_experiment(name, artifact_location=location)


def import_diffusers(source: str, run_dir: str = "runs/tiny", alias: str = "champion",
                     image_encoder: str | None = None, experiment: str = "unclip",
                     progress=print) -> dict[str, str]:
    """Import the pipeline at ``source`` into the run's MLflow; returns stage -> ``models:/NAME/VERSION``.

    The store is MLFLOW_TRACKING_URI, else the sqlite store of ``run_dir`` (created if new), as
    ``make pipeline`` and ``unclip generate`` use; every model gets ``alias``."""
    import mlflow

    from unclip.generation.models import CASCADE_NAME, DEFAULT_NAMES, default_tracking_uri
    from unclip.registry import register_cascade, register_checkpoint

    uri = default_tracking_uri(run_dir)
    if uri.startswith("sqlite:///"):
        if storage.is_remote(run_dir):
            raise DiffusersImportError(f"--run-dir {run_dir}: a remote run directory needs a tracking "
                                       "server (MLFLOW_TRACKING_URI)")
        os.makedirs(run_dir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(local_pipeline(source))
        encoder = stack.enter_context(local_pipeline(image_encoder)) if image_encoder else None
        out = stack.enter_context(tempfile.TemporaryDirectory())
        progress(f"converting {source}")
        with torch.no_grad():
            folders = convert(folder, out, encoder, source)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=_experiment(run_dir, uri, experiment))
        registered = {}
        with mlflow.start_run(run_name="import-diffusers", tags={
                "unclip.stage": "import-diffusers", "unclip.run_dir": run_dir, "unclip.source": source}):
            mlflow.log_params({"source": source, "alias": alias, "image_encoder": image_encoder or ""})
            for stage, path in folders.items():
                name = DEFAULT_NAMES[stage]
                version, _ = register_checkpoint(path, name, None, alias=alias, tags={
                    "unclip.backend": "diffusers", "unclip.source": source},
                    clip=folders.get("clip") if stage in ("prior", "decoder") else None)
                registered[stage] = f"models:/{name}/{version}"
                progress(f"registered {name} version {version} as @{alias}")
            if all(k in registered for k in ("clip", "prior", "decoder")):
                # the whole cascade as one model (models:/unclip@ALIAS generates from a prompt)
                version, _ = register_cascade(registered, CASCADE_NAME, None, alias=alias, tags={
                    "unclip.backend": "diffusers", "unclip.source": source})
                registered["unclip"] = f"models:/{CASCADE_NAME}/{version}"
                progress(f"registered {CASCADE_NAME} version {version} as @{alias}")
    return registered
