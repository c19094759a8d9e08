"""Decoder stage: train the GLIDE-style diffusion decoder P(x | z_i, y) under Ray Train.

Data: the filtered shards joined by key with the embed stage's image embeddings, decoded and resized
once to the decoder's resolution by Ray Data and kept in the object store (``materialize``): every
epoch after the first reads 3 KB arrays instead of decoding 512 px PNGs again (bench/decoder_feed.py
measures both feeds). Caption token states come from the frozen CLIP text tower, per batch.

Evaluation on rank 0 decodes the true embeddings of fixed held-out images (the same held-out keys as
every stage) with the configured sampler and guidance, and scores them: the shapes detector against
each image's ground-truth scene (beside a mismatched-scene baseline) and the CLIP cosine to the
embedding decoded (beside mismatched pairs). How far dropping z_i or the caption moves the model's
x0 predictions at high noise shows whether it uses each condition yet. A grid of true | decoded
images goes to MLflow every ``eval.grid_every`` steps and at the end. The EMA weights are saved
and registered with an alias.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import ray
import torch

from stages.contract import to_container
from stages.contract import StageContext, StageResult
from stages import training
from stages.init_from import InitSource, conflict, init_metrics, resolve_init
from unclip import storage
from unclip.data.paired import PairedRows, iter_paired
from unclip.data.shards import list_shards
from unclip.diffusion import DiffusionConfig, GaussianDiffusion
from unclip.eval.decoder_eval import DecoderEvaluator, ImportedDecoderEvaluator
from unclip.eval.decoding import detector_scores, nearest_by_embedding, scenes_of
from unclip.models.decoder import KIND as DECODER_KIND
from unclip.models.decoder import Decoder, DecoderConfig, dropout_masks
from unclip.models.decoder_sampling import caption_condition
from unclip.interop.karlo_models import DECODER_KIND as IMPORTED_KIND
from unclip.registry import register_checkpoint

log = logging.getLogger("unclip")


def model_config(ctx: StageContext, clip_dim: int, text_width: int) -> dict[str, Any]:
    c = ctx.stage_cfg
    return {**to_container(c.model), "resolution": int(c.resolution), "clip_dim": clip_dim,
            "text_width": text_width, "use_caption": bool(c.use_caption),
            "learn_variance": bool(c.diffusion.learn_variance)}


def init_config(init: InitSource, mcfg: dict[str, Any], diffusion: dict[str, Any],
                clip: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, diffusion config) of a decoder fine-tuned from ``init``: the source's own
    architecture (its learned variance too: the output channels follow it); the stage's resolution
    and CLIP widths must agree with it, since the data and the CLIP are the stage's."""
    model = dict(init.config["model"])
    conflict("decoder", "clip_dim", model.get("clip_dim"), clip.dim, "this run's CLIP embedding")
    if model.get("use_caption"):
        conflict("decoder", "text_width", model.get("text_width"), clip.text_width,
                 "this run's CLIP text tower")
    conflict("decoder", "resolution", model.get("resolution"), mcfg["resolution"],
             "decoder.resolution (the training images' side)")
    was = (init.meta.get("clip") or {}).get("digest")
    now = (getattr(clip, "identity", None) or {}).get("digest")
    if was and now and was != now:  # same widths, another CLIP: the conditioning means other things
        log.warning("decoder: init_from was trained on CLIP %s, this run's CLIP is %s: its "
                    "conditioning starts from another embedding space", was, now)
    source_diffusion = dict(init.config.get("diffusion") or {})
    diffusion = {**diffusion, "learn_variance": bool(model.get("learn_variance"))}
    for key in ("num_train_timesteps", "prediction_type", "beta_schedule"):
        if key in source_diffusion and source_diffusion[key] != diffusion.get(key):
            log.warning("decoder: init_from was trained with diffusion.%s=%r, this stage trains "
                        "with %r", key, source_diffusion[key], diffusion.get(key))
    return model, diffusion


def imported_config(init: InitSource, resolution: int, clip: Any) -> dict[str, Any]:
    """The model config of a fine-tuned imported (Karlo) decoder: the checkpoint's own diffusers
    configs; the stage's resolution and the run's CLIP widths must agree with them."""
    cfg = dict(init.config)
    conflict("decoder", "clip_embeddings_dim", cfg["text_proj"].get("clip_embeddings_dim"), clip.dim,
             "this run's CLIP embedding")
    conflict("decoder", "text_width", cfg.get("text_width"), clip.text_width,
             "this run's CLIP text tower")
    conflict("decoder", "sample_size", cfg["decoder"].get("sample_size"), resolution,
             "decoder.resolution (the training images' side)")
    was = (init.meta.get("clip") or {}).get("digest")
    now = (getattr(clip, "identity", None) or {}).get("digest")
    if was and now and was != now:
        log.warning("decoder: the imported decoder was trained on CLIP %s, this run's CLIP is %s "
                    "(set clip.source to the CLIP imported with it)", was, now)
    return cfg


def _check_norms(embeddings: str) -> None:
    """An imported decoder reads raw CLIP embeddings: the embed stage's norms must be there."""
    from unclip.embeddings import io as eio

    files = eio.list_files(embeddings)
    if files:  # refused here, before any data work, rather than in a Ray Data task
        eio.image_matrix(eio.read_file(files[0]), f"decoder.init_from: {files[0]}", raw=True)


def run(ctx: StageContext) -> StageResult:
    from unclip.models.clip import load_clip

    c = ctx.stage_cfg
    size, frac = int(c.resolution), float(c.holdout_fraction)
    shards = list_shards(ctx.input("filter", "shards"))
    embeddings = ctx.input("embed", "embeddings")
    clip_ref = ctx.input("clip", "model")
    clip = load_clip(clip_ref)
    mcfg = model_config(ctx, clip.dim, clip.text_width)
    diffusion = to_container(c.diffusion)
    init = resolve_init(c.get("init_from"), "decoder", (DECODER_KIND, IMPORTED_KIND))
    imported = init is not None and init.kind == IMPORTED_KIND  # a Karlo decoder: raw embeddings
    if imported:
        mcfg = imported_config(init, size, clip)
        _check_norms(embeddings)
    elif init is not None:
        mcfg, diffusion = init_config(init, mcfg, diffusion, clip)
    if not imported:
        DecoderConfig.from_dict(mcfg).validate()  # a bad size fails here, before any data work

    t0 = time.monotonic()
    train_ds = (ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
                .flat_map(PairedRows(embeddings, size, "train", frac, raw=imported))
                .materialize())
    n_train = train_ds.count()
    prep_s = time.monotonic() - t0
    holdout = _holdout(shards, embeddings, size, frac, int(c.eval.num_images), raw=imported)
    if n_train < int(c.train.batch_size) * int(c.train.num_workers):
        raise ValueError(f"decoder: {n_train} training pairs, fewer than one batch per worker "
                         f"({c.train.batch_size} x {c.train.num_workers})")
    if len(holdout["captions"]) < 2:
        raise ValueError(f"decoder: {len(holdout['captions'])} held-out pairs; raise "
                         "holdout_fraction")
    log.info("decoder: %d training pairs at %d px prepared in %.1f s; %d held out", n_train, size,
             prep_s, len(holdout["captions"]))
    loop_config = {
        "model": mcfg, "diffusion": diffusion, "train": to_container(c.train), "imported": imported,
        "init": None if init is None else init.record(),
        "sampling": to_container(c.sampling), "eval": to_container(c.eval),
        "p_drop_clip": float(c.p_drop_clip), "p_drop_caption": float(c.p_drop_caption),
        "hflip": bool(c.hflip), "clip": clip_ref,
        "holdout": holdout, "grids": ctx.path("grids"),
    }
    result = training.fit(ctx, train_loop, loop_config, int(c.train.num_workers),
                          datasets={"train": train_ds})
    model = build_model(mcfg, diffusion, imported)
    from unclip.training.state import EMA

    ema = EMA(model, float(c.train.ema_decay))
    meta = training.load_result_state(result, model, ema)
    final = {k: float(v) for k, v in (meta.get("metrics") or {}).items()
             if isinstance(v, (int, float))}
    folder = ctx.path("model")
    # the sampling it was scored with travels with it: the cascade's "as trained" defaults
    ema.model.save(folder, extra={"trained_steps": meta.get("step"), "metrics": final,
                                  "clip": clip.identity, "sampling": to_container(c.sampling),
                                  **({} if init is None else {"init_from": init.record()})})
    if imported:  # where fine-tuning started and where it ended, on the same held-out draws
        from unclip.interop.karlo_models import KarloDecoder

        scorer = ImportedDecoderEvaluator(holdout, clip, to_container(c.sampling), to_container(c.eval))
        final["init_val_loss"] = scorer.heldout_loss(KarloDecoder.from_checkpoint(init.folder))
        log.info("decoder: held-out loss of the imported decoder %.4f, fine-tuned %.4f",
                 final["init_val_loss"], final.get("val_loss", float("nan")))
    if bool(c.eval.neighbour_reference) and not imported:
        final.update(_neighbour_reference(train_ds, holdout, int(c.eval.detector_size)))
    metric_name = str(c.register_metric)
    if metric_name not in final or not np.isfinite(final[metric_name]):
        metric_name = "val_clip_cosine"
    version, alias = register_checkpoint(folder, str(c.register_name), final.get(metric_name),
                                         clip=clip_ref)
    grids = storage.list_files(ctx.path("grids"), ".png") if storage.exists(ctx.path("grids")) else []
    metrics = {**final, **init_metrics(init), "n_train": n_train, "n_holdout": len(holdout["captions"]),
               "data_prep_s": round(prep_s, 2), "registered_version": int(version),
               "registered_alias": alias, "register_metric": metric_name, "grids": len(grids)}
    return StageResult(
        outputs={"model": folder, "registered": f"models:/{c.register_name}/{version}",
                 "grids": ctx.path("grids")},
        metrics=metrics,
        summary=_summary(final, version, alias, str(c.register_name)),
    )


def _neighbour_reference(train_ds: "ray.data.Dataset", holdout: dict[str, Any],
                         detector_size: int) -> dict[str, float]:
    """Detector scores of the training image nearest each scored held-out z_i (``nn_<score>``):
    what the embedding alone pins down, the level a decoder that draws well reaches from z_i."""
    scenes = scenes_of(holdout["metas"])
    if scenes is None or len(scenes) < 2:
        return {}
    t0 = time.monotonic()
    pool = train_ds.select_columns(["image_embedding", "image"]).iter_batches(
        batch_size=1024, batch_format="numpy")
    nearest = nearest_by_embedding(holdout["embeddings"],
                                   ((b["image_embedding"], b["image"]) for b in pool))
    out = {"nn_" + k[4:]: v for k, v in detector_scores(nearest, scenes, detector_size).items()
           if k.startswith("val_")}
    log.info("decoder: nearest training image by z_i scored in %.1f s: %s", time.monotonic() - t0,
             ", ".join(f"{k} {v:.2f}" for k, v in out.items()))
    return out


def _summary(m: dict[str, float], version: str, alias: str, name: str) -> str:
    nan = float("nan")
    parts = [f"held-out decodes: CLIP cosine {m.get('val_clip_cosine', nan):.3f} "
             f"(mismatched {m.get('val_clip_cosine_mismatched', nan):.3f})"]
    if "val_color" in m:
        parts.append("detector " + ", ".join(
            f"{k} {m.get('val_' + k, nan):.2f} (chance {m.get('chance_' + k, nan):.2f})"
            for k in ("color", "shape", "position", "binding")))
    if "nn_shape" in m:
        parts.append("nearest training image by z_i " + ", ".join(
            f"{k} {m['nn_' + k]:.2f}" for k in ("color", "shape", "position")))
    if "val_clip_effect" in m:
        parts.append(f"x0 moves {m['val_clip_effect']:.3f} without z_i, "
                     f"{m.get('val_caption_effect', nan):.3f} without the caption")
    parts.append(f"registered {name} v{version} as {alias}")
    return "; ".join(parts)


def build_model(mcfg: dict[str, Any], diffusion: dict[str, Any], imported: bool) -> torch.nn.Module:
    """The decoder a config describes, fresh weights: ours, or an imported (Karlo) one."""
    if imported:
        from unclip.interop.karlo_models import KarloDecoder

        return KarloDecoder.from_config(mcfg)
    return Decoder(DecoderConfig.from_dict(mcfg), DiffusionConfig.from_dict(diffusion))


def _holdout(shards: list[str], embeddings: str, size: int, frac: float, n: int,
             raw: bool = False) -> dict[str, Any]:
    """The first ``n`` held-out pairs in shard order: the same fixed set in every run."""
    rows: list[dict[str, Any]] = []
    for s in shards:
        for r in iter_paired(s, embeddings, size, "holdout", frac, with_meta=True, raw=raw):
            rows.append(r)
            if len(rows) >= n:
                break
        if len(rows) >= n:
            break
    return {"images": np.stack([r["image"] for r in rows]) if rows else np.zeros((0, size, size, 3), np.uint8),
            "embeddings": np.stack([r["image_embedding"] for r in rows]) if rows else np.zeros((0, 1)),
            "captions": [r["caption"] for r in rows], "metas": [r["meta"] for r in rows]}


# ---- inside the training workers -----------------------------------------------------------------


def publish_grid(config: dict[str, Any]):
    """Where the evaluator's grids go: the stage's grid folder, and the worker's MLflow run."""
    def publish(name: str, png: bytes) -> None:
        storage.write_bytes(storage.join(config["grids"], name), png)
        ml = config.get("mlflow") or {}
        if not ml.get("run_id"):
            return
        import tempfile

        from mlflow import MlflowClient

        try:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, name)
                with open(path, "wb") as f:
                    f.write(png)
                MlflowClient(tracking_uri=ml["tracking_uri"]).log_artifact(ml["run_id"], path, "grids")
        except Exception as exc:  # a tracking hiccup must not kill training
            training._say(f"[unclip] warning: could not log grid {name} to MLflow: "
                          f"{str(exc).splitlines()[0][:200]}")
    return publish


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (:func:`stages.training.train_worker`): the decoder's hybrid diffusion
    loss with guidance dropouts; rank 0 decodes held-out embeddings with the EMA."""
    import ray.train

    from unclip.models.clip import load_clip
    from unclip.models.decoder_sampling import from_uint8
    from unclip.training.loop import LoopConfig
    from unclip.training.state import unwrap

    t = config["train"]
    torch.set_num_threads(training.worker_threads(t.get("torch_threads")))
    cfg = LoopConfig.from_dict({**t, "eval_every": int(config["eval"]["grid_every"])})

    imported = bool(config.get("imported"))

    def build() -> torch.nn.Module:
        return build_model(config["model"], config["diffusion"], imported)

    def steps(w: training.Worker) -> training.Steps:
        if w.session.rank == 0:
            training._say(f"[unclip] decoder worker: {torch.get_num_threads()} torch thread(s)")
        clip = load_clip(config["clip"])
        clip.model.requires_grad_(False)
        clip.to(w.device)
        gd = GaussianDiffusion(unwrap(w.model).diffusion)
        use_caption = imported or unwrap(w.model).cfg.use_caption
        gen, device = w.generator, w.device
        shard = ray.train.get_dataset_shard("train")

        def batches(epoch: int):
            return shard.iter_batches(batch_size=int(t["batch_size"]), batch_format="numpy",
                                      drop_last=True, local_shuffle_buffer_size=int(t["shuffle_buffer"]),
                                      local_shuffle_seed=int(t["seed"]) + 7919 * epoch + w.session.rank)

        def step_loss(m: torch.nn.Module, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            x0 = from_uint8(batch["image"]).to(device)
            if config["hflip"]:
                flip = torch.rand(x0.shape[0], generator=gen) < 0.5
                x0 = torch.where(flip.view(-1, 1, 1, 1).to(device), x0.flip(-1), x0)
            z = torch.from_numpy(np.asarray(batch["image_embedding"], np.float32)).to(device)
            drop_clip, drop_caption = dropout_masks(x0.shape[0], config["p_drop_clip"],
                                                    config["p_drop_caption"], gen)
            if imported:  # Karlo's caption: raw text embedding, token states, mask
                captions = [str(s) for s in batch["caption"]]
                text3 = tuple(torch.as_tensor(np.asarray(v)).to(device)
                              for v in clip.encode_text_tokens(captions, normalize=False))
                losses = unwrap(m).training_losses(x0, z, text3, drop_clip, drop_caption,
                                                   generator=gen, model=m)
                return {k: v.mean() for k, v in losses.items()}
            text = caption_condition(clip, [str(s) for s in batch["caption"]]) if use_caption else None
            losses = gd.training_losses(
                lambda x, tt: m(x, tt, z, None if text is None else text.states,
                                None if text is None else text.mask, drop_clip, drop_caption),
                x0, generator=gen)
            return {k: v.mean() for k, v in losses.items()}

        if not w.session.is_main:
            evaluator = None
        elif imported:
            evaluator = ImportedDecoderEvaluator(config["holdout"], clip, config["sampling"],
                                                 config["eval"], publish_grid(config))
        else:
            evaluator = DecoderEvaluator(config["holdout"], clip, config["sampling"], config["eval"],
                                         bool(config["model"]["use_caption"]), publish_grid(config))
        t_start = time.monotonic()

        def evaluate(ema_model: torch.nn.Module, step: int) -> dict[str, float]:
            final = step >= cfg.total_steps
            out = evaluator(ema_model, step, final)
            if final:
                train_s = time.monotonic() - t_start - evaluator.seconds
                out.update({"resumed_from_step": float(w.start_step), "eval_seconds": evaluator.seconds,
                            "train_steps_per_s": (step - w.start_step) / max(train_s, 1e-9)})
            return out

        return training.Steps(batches, step_loss, evaluate)

    training.train_worker(config, build, cfg, steps)
