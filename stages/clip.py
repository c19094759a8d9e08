"""CLIP stage: resolve a configured CLIP, or train one with open_clip's contrastive loss on Ray Train.

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
from unclip.devices import model_device, to_device
from unclip.data.shards import list_shards
from unclip.eval.clip_eval import heldout_retrieval
from unclip.models.clip import ClipEncoder, create_custom, load_clip, to_model_input
from unclip.registry import register_checkpoint
from unclip.training.loop import _kill_once
from unclip.training.parallel import DataParallelProbe, wait_for_main

log = logging.getLogger("unclip")
def run(ctx: StageContext) -> StageResult:
    c = ctx.stage_cfg
    if c.source:
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
    loop_config = {
        "model": model_cfg, "train": to_container(c.train), "n_train": n_train,
        "holdout": {"images": np.stack([r["image"] for r in holdout]),
                    "captions": [r["caption"] for r in holdout]},
    }
    log.info("clip: training on %d samples, %d held out, %d worker(s)", n_train, len(holdout),
             int(c.train.num_workers))
    result = training.fit(ctx, train_loop, loop_config, int(c.train.num_workers),
                          datasets={"train": train_ds})
    model = create_custom(model_cfg)
    meta = training.load_result_state(result, model)
    encoder = ClipEncoder(model, {"arch": "custom", "source": "trained", "kind": "trained"}, model_cfg)
    folder = ctx.path("model")
    encoder.save(folder, extra={"trained_steps": meta.get("step"), "metrics": meta.get("metrics")})
    final = {k: float(v) for k, v in (meta.get("metrics") or {}).items()}
    version, alias = register_checkpoint(folder, str(c.register_name), final.get("val_recall_at_5"))
    return StageResult(
        outputs={"model": folder, "registered": f"models:/{c.register_name}/{version}"},
        metrics={**final, "n_train": n_train, "n_holdout": len(holdout),
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


def _cache_decoded(ctx: StageContext, size: int) -> bool:
    """Keep the decoded, resized training images in memory when they fit
    ``clip.train.cache_decoded_max_mb`` (sized by the filter stage's kept count; 0 turns it off)."""
    limit_mb = float(ctx.stage_cfg.train.cache_decoded_max_mb)
    kept = ctx.upstream["filter"].metrics.get("kept") if "filter" in ctx.upstream else None
    if limit_mb <= 0 or kept is None:
        return False
    return int(kept) * size * size * 3 / 2**20 <= limit_mb


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: open_clip CLIP + ClipLoss (features gathered across workers)."""
    import ray.train
    import ray.train.torch
    from open_clip.loss import ClipLoss
    from open_clip.tokenizer import SimpleTokenizer

    t = config["train"]
    session = training.WorkerSession(config)
    training.seed_everything(int(t["seed"]) + session.rank)
    model = create_custom(config["model"])
    model = ray.train.torch.prepare_model(model)
    inner = training.unwrap(model)
    device = model_device(inner)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(t["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=float(t["lr"]), betas=(0.9, 0.98), eps=1e-6)
    meta = session.restore(model, opt, None)
    step, start_epoch = int(meta.get("step", 0)), int(meta.get("epoch", -1)) + 1
    resumed_from = step
    loss_fn = ClipLoss(gather_with_grad=True, rank=session.rank, world_size=session.world_size)
    tok = SimpleTokenizer(context_length=int(inner.context_length))
    per_worker = max(1, config["n_train"] // session.world_size)
    steps_per_epoch = max(1, per_worker // int(t["batch_size"]))
    total = steps_per_epoch * int(t["epochs"])
    shard = ray.train.get_dataset_shard("train")
    probe = DataParallelProbe()  # dp_* metrics: distinct data and weights across the ranks

    for epoch in range(start_epoch, int(t["epochs"])):
        losses = []
        for batch in shard.iter_batches(batch_size=int(t["batch_size"]), batch_format="numpy",
                                        drop_last=True, local_shuffle_buffer_size=2048,
                                        local_shuffle_seed=int(t["seed"]) + epoch):
            lr = _lr(step, total, float(t["lr"]), int(t["warmup_steps"]))
            for g in opt.param_groups:
                g["lr"] = lr
            out = model(*to_device((to_model_input(batch["image"]), tok(list(batch["caption"]))), device))
            img_f, txt_f, scale = out if isinstance(out, tuple) else \
                (out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(img_f, txt_f, scale)
            if not torch.isfinite(loss):
                training._say(f"[unclip] warning: non-finite loss at step {step}, batch skipped")
                opt.zero_grad(set_to_none=True)
                continue
            probe.before_first_step(batch, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(t["grad_clip"]))
            opt.step()
            with torch.no_grad():
                inner.logit_scale.clamp_(0, math.log(100))
            probe.after_first_step(inner)
            step += 1
            losses.append(float(loss))
            fault = config.get("fault")
            if fault and step == int(fault.get("kill_at_step", -1)):
                _kill_once(step, str(fault["marker"]))
            if step % int(t["log_every"]) == 0:
                session.log({"train_loss": float(loss), "lr": lr}, step)
                session.progress(step, total, {"loss": float(loss)})
        metrics = {"train_loss_epoch": float(np.mean(losses)) if losses else float("nan"),
                   "epoch": epoch, "step": step, "resumed_from_step": float(resumed_from),
                   **probe.at_end(inner, None)}
        if session.is_main:
            metrics.update(heldout_retrieval(inner, config["holdout"]))
            session.log({k: v for k, v in metrics.items() if k != "epoch"}, step)
            session.progress(step, total, {k: v for k, v in metrics.items()
                                           if k.startswith(("val_recall", "train_loss"))})
        wait_for_main(session.collective_timeout_s, "evaluation")
        session.report(metrics, model, opt, None, {"step": step, "epoch": epoch})


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
