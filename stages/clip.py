"""CLIP stage: resolve a configured CLIP, or train one with open_clip's contrastive loss on Ray Train
(the training stages' one worker template, :func:`stages.training.train_worker`).

Training data streams from the filtered shards through Ray Data (decoded and resized in parallel);
a fixed held-out split (by key hash) measures image->text recall@1/@5 beside its chance level.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import ray
import torch

from stages.contract import to_container
from stages.contract import StageContext, StageResult
from stages import training
from unclip.data.loading import iter_decoded
from unclip.devices import to_device
from unclip.data.shards import list_shards
from unclip.eval.clip_eval import heldout_retrieval
from stages.init_from import InitFromError, init_metrics, resolve_init
from unclip.models.clip import KIND as CLIP_KIND
from unclip.models.clip import ClipEncoder, create_custom, load_clip, to_model_input
from unclip.registry import register_checkpoint
from unclip.training.loop import LoopConfig
from unclip.training.state import EMA

log = logging.getLogger("unclip")


def run(ctx: StageContext) -> StageResult:
    c = ctx.stage_cfg
    if c.source:
        if c.get("init_from"):
            raise InitFromError("clip.init_from starts a CLIP training; clip.source uses a CLIP as "
                                "it is: set one, not both")
        return _resolve(ctx)
    return _train(ctx)


def _resolve(ctx: StageContext) -> StageResult:
    """Load the configured CLIP once and write what it is (architecture, source, pinned version,
    digest, dimensions) as a reference folder: the one thing every later stage loads CLIP from."""
    c = ctx.stage_cfg
    encoder = load_clip(str(c.source), None if c.arch is None else str(c.arch))
    folder = ctx.path("model")
    encoder.save_reference(folder)
    outputs = {"model": folder}
    metrics: dict[str, Any] = {"dim": encoder.dim, "text_width": encoder.text_width,
                               "context_length": encoder.context_length,
                               "image_size": encoder.image_size}
    if encoder.identity["kind"] == "registry":
        outputs["registered"] = encoder.identity["source"]
    else:  # so that `unclip generate` finds this run's CLIP under its usual name
        version, alias = register_checkpoint(folder, str(c.register_name), None)
        outputs["registered"] = f"models:/{c.register_name}/{version}"
        metrics.update(registered_version=int(version), registered_alias=alias)
    ident = encoder.identity
    return StageResult(outputs=outputs, metrics=metrics,
                       summary=(f"CLIP {ident['arch']} from {ident['source']} ({ident['kind']}, "
                                f"{ident.get('digest')}): {encoder.dim}-d embeddings, "
                                f"{encoder.image_size} px, context {encoder.context_length}"))


def _train(ctx: StageContext) -> StageResult:
    c = ctx.stage_cfg
    model_cfg = to_container(c.model)
    init = resolve_init(c.get("init_from"), "clip", (CLIP_KIND,))
    imported = init is not None and init.config.get("backend") == "transformers"
    if imported:  # an imported transformers CLIP: its towers, at its image side
        model_cfg = dict(init.config)
        size = int(model_cfg["vision"]["image_size"]) if model_cfg.get("vision") else 0
        if not size:
            raise InitFromError(f"clip.init_from={init.uri}: the imported CLIP has no image tower "
                                "(import it with --image-encoder)")
    else:
        if init is not None:
            model_cfg = dict(init.config)  # the source's architecture
        size = int(model_cfg["vision_cfg"]["image_size"])
    shards = list_shards(ctx.input("filter", "shards"))
    frac = float(c.train.holdout_fraction)
    train_ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards)) \
        .flat_map(lambda r: list(iter_decoded(r["shard"], size, "train", frac)))
    holdout = [row for s in shards for row in iter_decoded(s, size, "holdout", frac)]
    holdout = holdout[: int(c.train.max_holdout)]
    if len(holdout) < 10:
        raise ValueError(f"clip: only {len(holdout)} held-out samples; raise holdout_fraction")
    if _cache_decoded(ctx, size):
        # decode + resize once; every epoch (and the count) then reads the small images from Ray's
        # object store instead of decoding full-size images again (bench/README.md: CLIP stage)
        train_ds = train_ds.materialize()
    n_train = train_ds.count()
    per_worker = n_train // int(c.train.num_workers)
    config = {
        "model": model_cfg, "train": to_container(c.train), "n_train": n_train,
        # an imported CLIP is built from its folder (towers, tokenizer, processor), digest-checked
        "init": None if init is None or imported else init.record(),
        "imported": None if not imported else init.record(),
        "steps_per_epoch": max(1, per_worker // int(c.train.batch_size)),
        "holdout": {"images": np.stack([r["image"] for r in holdout]),
                    "captions": [r["caption"] for r in holdout]},
    }
    log.info("clip: training on %d samples, %d held out, %d worker(s)", n_train, len(holdout),
             int(c.train.num_workers))
    result = training.fit(ctx, train_loop, config, int(c.train.num_workers),
                          datasets={"train": train_ds})
    model = build_model(config)
    ema = None if c.train.get("ema_decay") is None else EMA(model, float(c.train.ema_decay))
    meta = training.load_result_state(result, model, ema)
    if ema is not None:  # the averaged weights are the ones registered
        model = ema.model
    if imported:  # saved back in the imported layout (the temperature is the training's own)
        encoder = model.encoder({"arch": "transformers:CLIP", "source": "trained", "kind": "trained"})
    else:
        encoder = ClipEncoder(model, {"arch": "custom", "source": "trained", "kind": "trained"},
                              model_cfg)
    folder = ctx.path("model")
    encoder.save(folder, extra={"trained_steps": meta.get("step"), "metrics": meta.get("metrics"),
                                **({} if init is None else {"init_from": init.record()})})
    final = {k: float(v) for k, v in (meta.get("metrics") or {}).items()}
    version, alias = register_checkpoint(folder, str(c.register_name), final.get("val_recall_at_5"))
    return StageResult(
        outputs={"model": folder, "registered": f"models:/{c.register_name}/{version}"},
        metrics={**final, **init_metrics(init), "n_train": n_train, "n_holdout": len(holdout),
                 "registered_version": int(version), "registered_alias": alias},
        summary=(f"held-out recall@1 {final.get('val_recall_at_1', float('nan')):.3f} "
                 f"(chance {final.get('val_chance_at_1', float('nan')):.3f}), recall@5 "
                 f"{final.get('val_recall_at_5', float('nan')):.3f} "
                 f"(chance {final.get('val_chance_at_5', float('nan')):.3f}); "
                 + (f"zero-shot colour {final['val_zeroshot_color']:.2f} (chance "
                    f"{final['val_zeroshot_color_chance']:.2f}), shape {final['val_zeroshot_shape']:.2f} "
                    f"(chance {final['val_zeroshot_shape_chance']:.2f}); "
                    if "val_zeroshot_shape" in final else "")
                 + f"registered {c.register_name} v{version} as {alias}"),
    )


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """The CLIP the workers train: open_clip's from its config, or an imported transformers CLIP
    (:class:`TrainableHFClip`) from the folder the stage resolved, refused if its weights changed."""
    source = config.get("imported")
    if not source:
        return create_custom(config["model"])
    from stages.init_from import _digest
    from unclip import checkpoint, storage
    from unclip.interop.hf_clip import TrainableHFClip, load_hf_clip
    from unclip.registry import resolve_checkpoint

    folder = resolve_checkpoint(source["pinned"])
    digest = _digest(storage.read_bytes(storage.join(folder, checkpoint.WEIGHTS)))
    if digest != source["digest"]:
        raise InitFromError(f"clip.init_from={source['uri']}: the weights at {source['pinned']} "
                            f"changed since the stage resolved them")
    return TrainableHFClip(load_hf_clip(folder)).train()


def _cache_decoded(ctx: StageContext, size: int) -> bool:
    """Keep the decoded, resized training images in memory when they fit
    ``clip.train.cache_decoded_max_mb`` (sized by the filter stage's kept count; 0 turns it off)."""
    limit_mb = float(ctx.stage_cfg.train.cache_decoded_max_mb)
    kept = ctx.upstream["filter"].metrics.get("kept") if "filter" in ctx.upstream else None
    if limit_mb <= 0 or kept is None:
        return False
    return int(kept) * size * size * 3 / 2**20 <= limit_mb


def loop_config(t: dict[str, Any], steps_per_epoch: int) -> LoopConfig:
    """CLIP's ``train`` options in the shared loop: ``epochs`` of ``steps_per_epoch`` steps, the
    cosine schedule after warm-up, a checkpoint and a held-out evaluation at every epoch's end.
    EMA (``ema_decay``) and mixed precision (``amp``) stay off unless set."""
    return LoopConfig(total_steps=steps_per_epoch * int(t["epochs"]), lr=float(t["lr"]),
                      warmup_steps=int(t["warmup_steps"]), lr_schedule="cosine",
                      weight_decay=float(t["weight_decay"]), grad_clip=float(t["grad_clip"]),
                      ema_decay=float(t.get("ema_decay") or 0.0), log_every=int(t["log_every"]),
                      checkpoint_every=steps_per_epoch, eval_every=steps_per_epoch,
                      max_nonfinite_steps=int(t.get("max_nonfinite_steps", 20)),
                      amp=str(t.get("amp", "off")))


def contrastive_loss(loss_fn, tokenizer, device: torch.device):
    """``loss(model, batch)`` of open_clip's ClipLoss on a batch of uint8 images and captions."""
    def step_loss(m: torch.nn.Module, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = m(*to_device((to_model_input(batch["image"]), tokenizer(list(batch["caption"]))), device))
        img_f, txt_f, scale = out if isinstance(out, tuple) else \
            (out["image_features"], out["text_features"], out["logit_scale"])
        return {"loss": loss_fn(img_f, txt_f, scale)}
    return step_loss


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    """CLIP's temperature stays at most 100 (after every optimizer step, as open_clip trains)."""
    model.logit_scale.clamp_(0, math.log(100))


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (:func:`stages.training.train_worker`): open_clip CLIP + ClipLoss
    (features gathered across workers); rank 0 measures held-out retrieval every epoch."""
    import ray.train
    from open_clip.loss import ClipLoss
    from open_clip.tokenizer import SimpleTokenizer

    t = config["train"]
    cfg = loop_config(t, int(config["steps_per_epoch"]))

    def steps(w: training.Worker) -> training.Steps:
        inner = training.unwrap(w.model)
        loss_fn = ClipLoss(gather_with_grad=True, rank=w.session.rank, world_size=w.session.world_size)
        # an imported CLIP tokenizes with its own tokenizer (ids and mask in one tensor)
        tok = getattr(inner, "tokenize", None) or SimpleTokenizer(context_length=int(inner.context_length))
        shard = ray.train.get_dataset_shard("train")

        def batches(epoch: int):
            return shard.iter_batches(batch_size=int(t["batch_size"]), batch_format="numpy",
                                      drop_last=True, local_shuffle_buffer_size=2048,
                                      local_shuffle_seed=int(t["seed"]) + epoch)

        return training.Steps(batches, contrastive_loss(loss_fn, tok, w.device),
                              lambda m, step: heldout_retrieval(m, config["holdout"]),
                              clamp_logit_scale)

    training.train_worker(config, lambda: build_model(config), cfg, steps,
                          ema=t.get("ema_decay") is not None, betas=(0.9, 0.98), eps=1e-6)
