"""Upsampler stages ``upsample1`` (Gaussian blur conditioning) and ``upsample2`` (BSR), one module.

Which one runs is ``ctx.name``; each has its own config group (``configs/upsample1``,
``configs/upsample2``) with ``kind: blur | bsr``. Both read only the filtered shards: the images
are resized to the stage's high resolution through Ray Data, training draws random crops of a
quarter of that side (corrupted on the fly, noise-level augmentation on top), and the EMA model is
validated on held-out images at full size against bicubic upsampling of the same corrupted input
(PSNR, SSIM, and a grid image), and of their uncorrupted downscale (``val_*_sharp*``: what the
cascade feeds it). The model is registered with its alias decided by the sharp-input PSNR.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Iterator

import numpy as np
import ray
import torch

from stages.contract import to_container
from stages.contract import StageContext, StageResult
from stages import training
from unclip import storage
from unclip.data.degradations import KINDS, config_for, degrade
from unclip.data.loading import iter_decoded
from unclip.data.shards import list_shards
from unclip.diffusion import GaussianDiffusion
from stages.init_from import InitSource, conflict, init_metrics, resolve_init
from unclip.interop.karlo_models import SUPER_RES_KIND as IMPORTED_KIND
from unclip.models.upsampler import KIND as UPSAMPLER_KIND
from unclip.models.upsampler import Upsampler, build_config
from unclip.registry import register_checkpoint
from unclip.training.loop import LoopConfig
from unclip.training.state import EMA
from unclip.training.upsampler import CropBatches, crop_each, make_step_loss

log = logging.getLogger("unclip")


def model_config(c: Any) -> dict[str, Any]:
    """The upsampler's own config (what its checkpoint stores) from the stage config."""
    return build_config({**to_container(c.model), "scale": int(c.scale), "kind": str(c.kind),
                         "diffusion": to_container(c.diffusion),
                         "sampler": str(c.sampling.sampler), "steps": int(c.sampling.steps)})


def init_config(init: InitSource, stage: str, scale: int, kind: str) -> dict[str, Any]:
    """The config of an upsampler fine-tuned from ``init``: the source's architecture, diffusion
    and sampler, with this stage's degradation kind; its scale must be the stage's."""
    conflict(stage, "scale", int(init.config.get("scale", 0)), scale, f"{stage}.scale")
    return build_config({**init.config, "kind": kind})


def imported_config(init: InitSource, stage: str, scale: int, high: int) -> dict[str, Any]:
    """The config of an imported (Karlo) super-resolution stage being fine-tuned: the checkpoint's
    own, at this stage's scale; it draws its UNets' side, which must be the stage's high_res."""
    cfg = dict(init.config)
    conflict(stage, "sample_size", int(cfg["super_res_first"].get("sample_size", 0)), high,
             f"{stage}.high_res (the side it draws)")
    conflict(stage, "scale", int(cfg.get("scale", scale)), scale, f"{stage}.scale")
    return {**cfg, "scale": scale}


def _multiple(mcfg: dict[str, Any], imported: bool) -> int:
    if imported:
        return 2 ** (len(mcfg["super_res_first"]["block_out_channels"]) - 1)
    return Upsampler.multiple_for(mcfg)


def _build(mcfg: dict[str, Any], imported: bool) -> torch.nn.Module:
    if imported:
        from unclip.interop.karlo_models import KarloSuperRes

        return KarloSuperRes.from_config(mcfg)
    return Upsampler(mcfg)


def sizes(c: Any) -> tuple[int, int, int]:
    """(high, low, crop) sides, checked: crops are ``crop_fraction`` of the high side."""
    high, scale = int(c.high_res), int(c.scale)
    crop = int(round(high * float(c.crop_fraction)))
    if c.kind not in KINDS:
        raise ValueError(f"{c.kind!r} is not a degradation kind ({', '.join(KINDS)})")
    if high % scale or crop % scale or not 0 < crop <= high:
        raise ValueError(f"high_res {high} and its crop {crop} must be divisible by the scale {scale}")
    return high, high // scale, crop


def run(ctx: StageContext) -> StageResult:
    c = ctx.stage_cfg
    high, low, crop = sizes(c)
    mcfg = model_config(c)
    init = resolve_init(c.get("init_from"), ctx.name, (UPSAMPLER_KIND, IMPORTED_KIND))
    imported = init is not None and init.kind == IMPORTED_KIND  # Karlo's super-resolution stage
    if imported:
        mcfg = imported_config(init, ctx.name, int(c.scale), high)
    elif init is not None:
        mcfg = init_config(init, ctx.name, int(c.scale), str(c.kind))
    multiple = _multiple(mcfg, imported)
    if crop % multiple or high % multiple:
        raise ValueError(f"{ctx.name}: crop {crop} and high_res {high} must be divisible by "
                         f"{multiple} for a UNet with {len(mcfg['channels'])} levels")
    config_for(str(c.kind), to_container(c.degradation))  # fail here, not in a worker
    frac = float(c.holdout_fraction)
    shards = list_shards(ctx.input("filter", "shards"))

    def decoded(row: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"image": r["image"]} for r in iter_decoded(row["shard"], high, "train", frac)]

    train_ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards)) \
        .flat_map(decoded)
    if c.train.max_train_images:
        train_ds = train_ds.limit(int(c.train.max_train_images))
    if c.train.cache_images:  # decode + resize once; the workers keep their share in memory
        train_ds = train_ds.materialize()
    n_train = train_ds.count()
    holdout = _holdout(shards, high, frac, int(c.validation.max_images))
    if n_train == 0 or len(holdout) == 0:
        raise ValueError(f"{ctx.name}: {n_train} training and {len(holdout)} held-out images; "
                         f"need both (check the filter output and holdout_fraction)")
    grid_uri = ctx.path("samples.png")
    loop_config = {
        "stage": ctx.name, "model": mcfg, "kind": str(c.kind), "crop": crop, "imported": imported,
        "init": None if init is None else init.record(),
        "degradation": to_container(c.degradation), "train": to_container(c.train),
        "validation": to_container(c.validation), "holdout": holdout, "grid_uri": grid_uri,
    }
    log.info("%s: %s x%d (%d -> %d), %d training images in %d px crops, %d held out", ctx.name,
             c.kind, int(c.scale), low, high, n_train, crop, len(holdout))
    result = training.fit(ctx, train_loop, loop_config, int(c.train.num_workers),
                          datasets={"train": train_ds})
    model = _build(mcfg, imported)
    ema = EMA(model, float(c.train.ema_decay))
    meta = training.load_result_state(result, model, ema)
    final = {k: float(v) for k, v in (meta.get("metrics") or {}).items()}
    if "val_psnr_sharp" not in final:
        raise RuntimeError(f"{ctx.name}: training ended without a validation ({sorted(final)})")
    if imported:  # where fine-tuning started, on the same held-out images and draws
        from unclip.eval.upsampling import validate
        from unclip.interop.karlo_models import KarloSuperRes

        v = c.validation
        before, _ = validate(KarloSuperRes.from_checkpoint(init.folder), holdout, str(c.kind),
                             to_container(c.degradation), seed=int(v.seed),
                             batch_size=int(v.batch_size), grid_rows=1)
        final.update({"init_" + k: before[k] for k in ("val_psnr", "val_psnr_sharp", "val_ssim_sharp")})
        log.info("%s: held-out PSNR on sharp inputs of the imported stage %.2f dB, fine-tuned %.2f",
                 ctx.name, final["init_val_psnr_sharp"], final["val_psnr_sharp"])
    folder = ctx.path("model")
    ema.model.save(folder, extra={"trained_steps": meta.get("step"), "metrics": final,
                                  **({} if init is None else {"init_from": init.record()})})
    _log_grid(grid_uri, ctx.name)
    # champion by the sharp-input score: it does not depend on the degradation config, and sharp
    # inputs are what the cascade gives
    version, alias = register_checkpoint(folder, str(c.register_name), final["val_psnr_sharp"])
    return StageResult(
        outputs={"model": folder, "registered": f"models:/{c.register_name}/{version}",
                 "samples": grid_uri},
        metrics={**final, **init_metrics(init), "n_train": n_train, "n_holdout": len(holdout), "low_res": low,
                 "high_res": high, "crop": crop, "registered_version": int(version),
                 "registered_alias": alias},
        summary=(f"{c.kind} x{c.scale} {low}->{high}: held-out PSNR {final['val_psnr']:.2f} dB "
                 f"(bicubic {final['val_psnr_bicubic']:.2f}), SSIM {final['val_ssim']:.3f} "
                 f"(bicubic {final['val_ssim_bicubic']:.3f}); on sharp inputs PSNR "
                 f"{final['val_psnr_sharp']:.2f} (bicubic {final['val_psnr_sharp_bicubic']:.2f}); "
                 f"{mcfg['steps']} {mcfg.get('sampler', 'unclip')} "
                 f"steps; registered {c.register_name} v{version} as {alias}"),
    )


def _holdout(shards: list[str], size: int, frac: float, limit: int) -> np.ndarray:
    """The first ``limit`` held-out images (same key split as every stage), uint8 (N, S, S, 3)."""
    out = []
    for s in shards:
        for row in iter_decoded(s, size, "holdout", frac):
            out.append(row["image"])
            if len(out) >= limit:
                return np.stack(out)
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _log_grid(uri: str, stage: str) -> None:
    import mlflow
    from PIL import Image

    if storage.exists(uri):
        img = np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))
        mlflow.log_image(img, f"{stage}_samples.png")


# ---- inside the training workers -------------------------------------------------------------


def _cached_images(shard, batch_size: int = 64) -> np.ndarray:
    parts = [b["image"] for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy")]
    if not parts:
        raise ValueError("this training worker received no images; use fewer workers")
    return np.concatenate(parts)


def _streaming(shard, config: dict[str, Any], rank: int):
    """Batches straight from Ray Data each epoch, one random crop per image (data sets larger than
    memory), corrupted like :class:`CropBatches`."""
    t, crop, scale = config["train"], int(config["crop"]), int(config["model"]["scale"])
    cfg = config_for(config["kind"], config["degradation"])

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([int(t["seed"]), rank, epoch])
        for b in shard.iter_batches(batch_size=int(t["batch_size"]), batch_format="numpy",
                                    drop_last=True, local_shuffle_buffer_size=4 * int(t["batch_size"]),
                                    local_shuffle_seed=int(t["seed"]) + epoch):
            hr = crop_each(b["image"], crop, rng)
            yield hr * 2 - 1, degrade(config["kind"], hr, scale, rng, cfg) * 2 - 1

    return batches


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (:func:`stages.training.train_worker`): conv-only UNet on random
    crops; rank 0 validates the EMA at full size."""
    import ray.train

    from unclip.eval.upsampling import validate

    t, v = config["train"], config["validation"]

    def steps(w: training.Worker) -> training.Steps:
        shard = ray.train.get_dataset_shard("train")
        if t["cache_images"]:
            batches = CropBatches(_cached_images(shard), int(t["batch_size"]), int(config["crop"]),
                                  int(config["model"]["scale"]), config["kind"],
                                  config["degradation"], seed=int(t["seed"]), rank=w.session.rank)
        else:
            batches = _streaming(shard, config, w.session.rank)
        imported = bool(config.get("imported"))
        diffusion = GaussianDiffusion(training.unwrap(w.model).diffusion if imported
                                      else training.unwrap(w.model).diffusion_config)

        def evaluate(ema_model: torch.nn.Module, step: int) -> dict[str, float]:
            from PIL import Image

            metrics, grid = validate(ema_model, config["holdout"], config["kind"],
                                     config["degradation"], seed=int(v["seed"]),
                                     batch_size=int(v["batch_size"]), grid_rows=int(v["grid_rows"]))
            buf = io.BytesIO()
            Image.fromarray(grid).save(buf, format="PNG")
            storage.write_bytes(config["grid_uri"], buf.getvalue())
            return metrics

        if imported:  # no noise augmentation of the low-res input: Karlo's stage has none
            def step_loss(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
                hr, low = (v.to(w.device) for v in batch)
                return training.unwrap(m).losses(hr, low, w.generator, net=m)
        else:
            step_loss = make_step_loss(diffusion, int(config["model"]["aug_max_level"]), w.generator)
        return training.Steps(batches, step_loss, evaluate)

    training.train_worker(config, lambda: _build(config["model"], bool(config.get("imported"))),
                          LoopConfig.from_dict(t), steps)
