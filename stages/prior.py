"""Prior stage: train P(z_i | caption), a diffusion prior or an autoregressive prior (``prior.kind``).

The embed stage's Parquet files stream through Ray Data into Ray Train workers (data-parallel,
``prior.train.num_workers``). The per-token caption encodings are not stored in those files: each
worker recomputes them with the frozen CLIP text tower (cached per caption when
``prior.cache_text_encodings``). The shared step loop gives EMA, clipping, mixed precision on
CUDA and resumable checkpoints.

Validation (rank 0, EMA weights): mean cosine similarity between sampled and true z_i on held-out
captions (the CLIP stage's held-out keys), beside two trivial baselines: z_t itself, and the mean
training z_i. The EMA model is saved as a checkpoint folder and registered in MLflow.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import numpy as np
import torch

from stages.contract import to_container
from stages.contract import StageContext, StageResult
from stages import training
from stages.prior_data import read_holdout, read_split, split_dataset, train_statistics
from unclip.embeddings import io as eio
from unclip.eval.prior_eval import heldout_loss, validate, validate_imported
from unclip.interop.karlo_models import PRIOR_KIND as IMPORTED_KIND
from unclip.models.captions import CaptionEncoder
from unclip.models.priors import KINDS, build_model
from unclip.models.clip import load_clip
from unclip.models.prior import KIND as DIFFUSION_PRIOR_KIND
from unclip.models.prior import resolve_embed_scale
from stages.init_from import InitFromError, InitSource, conflict, init_metrics, resolve_init
from unclip.registry import register_checkpoint
from unclip.training.loop import LoopConfig
from unclip.training.state import EMA, unwrap

log = logging.getLogger("unclip")


# ---- the stage -------------------------------------------------------------------------------


def init_config(init: InitSource, clip: Any) -> dict[str, Any]:
    """The model config of a diffusion prior fine-tuned from ``init``: the source's own (its
    architecture, and the embedding scale and mean its weights were trained with); its CLIP widths
    must be this run's CLIP's."""
    source = dict(init.config)
    for key, needed, why in (("dim", clip.dim, "this run's CLIP embedding"),
                             ("text_width", clip.text_width, "this run's CLIP text tower"),
                             ("max_text_len", clip.context_length, "this run's CLIP context")):
        conflict("prior", key, source.get(key), needed, why)
    return source


def imported_config(init: InitSource, clip: Any) -> dict[str, Any]:
    """The config of an imported (Karlo) prior being fine-tuned: the checkpoint's own; the run's
    CLIP (the one imported with it) must have its widths and context."""
    cfg = dict(init.config)
    for key, needed, why in (("text_dim", clip.dim, "this run's CLIP embedding"),
                             ("text_width", clip.text_width, "this run's CLIP text tower"),
                             ("text_length", clip.context_length, "this run's CLIP context")):
        conflict("prior", key, cfg.get(key), needed, why + " (set clip.source to the CLIP imported "
                                                       "with the prior)")
    return cfg


def imported_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """What validates an imported prior: its own sampler (diffusers' UnCLIPScheduler), at the
    stage's steps (2 at least), guidance and candidates."""
    from unclip.interop.karlo_models import UNCLIP_SAMPLER

    return {**sampling, "sampler": UNCLIP_SAMPLER, "steps": max(2, int(sampling["steps"]))}


def run(ctx: StageContext) -> StageResult:
    c = ctx.stage_cfg
    kind = str(c.kind)
    if kind not in KINDS:
        raise ValueError(f"prior.kind must be one of {KINDS}, got {kind!r}")
    files = eio.list_files(ctx.input("embed", "embeddings"))
    if not files:
        raise FileNotFoundError(f"prior: no embedding files in {ctx.input('embed', 'embeddings')}")
    frac = float(c.holdout_fraction)
    clip_source = str(ctx.input("clip", "model"))
    clip = load_clip(clip_source)
    init = None
    if c.get("init_from"):
        if kind != "diffusion":
            raise InitFromError(f"prior.init_from: fine-tuning prior.kind={kind} is not supported "
                                "yet (only the diffusion prior)")
        init = resolve_init(c.init_from, "prior", (DIFFUSION_PRIOR_KIND, IMPORTED_KIND))
    imported = init is not None and init.kind == IMPORTED_KIND  # Karlo's: raw embeddings
    train_ds = split_dataset(files, "train", frac, raw=imported)
    # driver-side, one file at a time (bounded memory): cheaper than starting Ray Data workers
    stats = train_statistics(read_split({"uri": np.array([u])}, "train", frac) for u in files)
    holdout = read_holdout(files, frac, int(c.max_holdout), raw=imported)
    if len(holdout["captions"]) < 5:
        raise ValueError(f"prior: only {len(holdout['captions'])} held-out rows; raise "
                         "holdout_fraction")
    holdout["mean_train_image"] = stats["mean"]
    spec = to_container(c[kind])
    model_cfg = {**spec["model"], "dim": clip.dim, "text_width": clip.text_width,
                 "max_text_len": clip.context_length}
    pca_folder, sim_edges, extra = None, None, {}
    if kind == "diffusion":
        model_cfg["embed_scale"] = resolve_embed_scale(spec["embed_scale"], clip.dim,
                                                       stats["per_dim_variance"])
        if spec.get("embed_center"):
            model_cfg["embed_mean"] = [float(v) for v in stats["mean"]]
        model_cfg["diffusion"] = spec["process"]
    else:
        from unclip.embeddings.pca import PCA
        from unclip.models.ar_prior import similarity_edges

        pca_folder = ctx.input("pca", "pca")
        pca = PCA.load(pca_folder)
        if pca.num_buckets is None:
            raise ValueError(f"prior: the PCA in {pca_folder} has no bucket edges")
        model_cfg["n_components"] = int(model_cfg.get("n_components") or pca.n_components)
        model_cfg["num_buckets"] = pca.num_buckets
        sim_edges = similarity_edges(stats["sims"], int(model_cfg["sim_buckets"]))
        extra["pca"] = pca_folder
    if imported:
        model_cfg = imported_config(init, clip)
        spec["sampling"] = imported_sampling(spec["sampling"])
    elif init is not None:
        model_cfg = init_config(init, clip)
    loop_config = {
        "init": None if init is None else init.record(), "imported": imported,
        "cond_drop_prob": float(spec["model"].get("cond_drop_prob", 0.1)),
        "kind": kind, "model": model_cfg, "sampling": spec["sampling"], "optim": spec["optim"],
        "train": to_container(c.train), "clip": clip_source, "pca": pca_folder,
        "sim_edges": None if sim_edges is None else sim_edges.tolist(),
        "cache_text_encodings": bool(c.cache_text_encodings),
        "cache_data_in_memory": bool(c.cache_data_in_memory), "holdout": holdout,
    }
    log.info("prior (%s): %d training rows, %d held out, %d worker(s)", kind, stats["n"],
             len(holdout["captions"]), int(c.train.num_workers))
    result = training.fit(ctx, train_loop, loop_config, int(c.train.num_workers),
                          datasets={"train": train_ds})

    model = _imported(model_cfg) if imported else build_model(kind, model_cfg)
    ema = EMA(model, 0.0)
    meta = training.load_result_state(result, model, ema)
    final = {k: float(v) for k, v in (meta.get("metrics") or {}).items()}
    if imported:  # where fine-tuning started, on the same held-out draws as the result's val_loss
        from unclip.interop.karlo_models import KarloPrior

        final["init_val_loss"] = heldout_loss(KarloPrior.from_checkpoint(init.folder), clip, holdout,
                                              int(c.train.seed))
        log.info("prior: held-out loss of the imported prior %.4f, fine-tuned %.4f",
                 final["init_val_loss"], final.get("val_loss", math.nan))
    folder = ctx.path("model")
    ema.model.save(folder, extra={"trained_steps": meta.get("step"), "metrics": final,
                                  "clip": clip.identity, "sampling": spec["sampling"], **extra,
                                  **({} if init is None else {"init_from": init.record()})})
    version, alias = register_checkpoint(folder, str(c.register_name), final.get("val_cosine"),
                                         clip=clip_source)
    metrics = {**final, **init_metrics(init), "n_train": stats["n"], "n_holdout": len(holdout["captions"]),
               "trained_steps": int(meta.get("step", 0)), "registered_version": int(version),
               "registered_alias": alias}
    if kind == "diffusion" and not imported:
        metrics["embed_scale"] = model_cfg["embed_scale"]
    return StageResult(
        outputs={"prior": folder, "registered": f"models:/{c.register_name}/{version}"},
        metrics=metrics,
        summary=(f"{kind} prior: held-out cosine {final.get('val_cosine', math.nan):.3f} vs "
                 f"baselines z_t {final.get('val_baseline_text', math.nan):.3f}, mean z_i "
                 f"{final.get('val_baseline_mean', math.nan):.3f}; registered "
                 f"{c.register_name} v{version} as {alias}"))


def _imported(cfg: dict[str, Any]) -> torch.nn.Module:
    from unclip.interop.karlo_models import KarloPrior

    return KarloPrior.from_config(cfg).freeze_statistics()


# ---- inside the Ray Train workers -------------------------------------------------------------


def _epochs_from_shard(shard, batch_size: int, seed: int, in_memory: bool):
    """``batches(epoch)`` over a Ray Data shard; with ``in_memory`` the first pass is kept and
    later epochs are shuffled in-process (no per-epoch Ray Data start-up for small data sets)."""
    cache: dict[str, np.ndarray] = {}

    def stream(epoch: int) -> Iterator[dict[str, np.ndarray]]:
        return shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=max(4 * batch_size, 4096),
                                  local_shuffle_seed=seed + epoch)

    def batches(epoch: int) -> Iterator[dict[str, np.ndarray]]:
        if not in_memory:
            yield from stream(epoch)
            return
        if not cache:
            parts = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
            parts = [p for p in parts if len(p["caption"])]
            if not parts:
                raise ValueError("prior: this worker's data shard is empty")
            for k in ("caption", "image_embedding", "text_embedding"):
                cache[k] = np.concatenate([p[k] for p in parts])
        n = len(cache["caption"])
        if n < batch_size:
            raise ValueError(f"prior: {n} rows on this worker, fewer than prior.train.batch_size "
                             f"{batch_size}")
        order = np.random.default_rng(seed + epoch).permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield {k: v[idx] for k, v in cache.items()}

    return batches


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (:func:`stages.training.train_worker`): the prior's own losses on
    cached caption encodings; rank 0 validates the EMA on held-out captions."""
    import ray.train

    t, o, kind = config["train"], config["optim"], config["kind"]
    cfg = LoopConfig.from_dict({**t, "lr": o["lr"], "weight_decay": o["weight_decay"],
                                "ema_decay": o["ema_decay"]})

    imported = bool(config.get("imported"))

    def build() -> torch.nn.Module:
        if imported:
            return _imported(config["model"])
        sim_edges = None if config["sim_edges"] is None else np.asarray(config["sim_edges"])
        return build_model(kind, config["model"], config["pca"], sim_edges)

    def steps(w: training.Worker) -> training.Steps:
        if imported:
            return _imported_steps(w)

        encoder = CaptionEncoder(load_clip(config["clip"]), w.device,
                                 cache=config["cache_text_encodings"])
        batches = _epochs_from_shard(ray.train.get_dataset_shard("train"), int(t["batch_size"]),
                                     int(t["seed"]) + 1000 * w.session.rank,
                                     config["cache_data_in_memory"])

        def step_loss(m: torch.nn.Module, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            tokens, mask = encoder(batch["caption"])
            zi = torch.as_tensor(batch["image_embedding"], device=w.device)
            zt = torch.as_tensor(batch["text_embedding"], device=w.device)
            return unwrap(m).losses(zi, tokens, mask, zt, w.generator, net=m)

        def evaluate(ema_model: torch.nn.Module, step: int) -> dict[str, float]:
            return validate(ema_model, kind, config["sampling"], encoder, config["holdout"],
                            int(t["seed"]))

        return training.Steps(batches, step_loss, evaluate)

    def _imported_steps(w: training.Worker) -> training.Steps:
        """An imported prior: the caption at the CLIP's full context (Karlo's positions are fixed)
        with its raw text embedding, raw image embeddings, Karlo's own x0 loss."""
        from unclip.eval.prior_eval import caption_inputs

        clip = load_clip(config["clip"])
        clip.model.requires_grad_(False)
        clip.to(w.device)
        batches = _epochs_from_shard(ray.train.get_dataset_shard("train"), int(t["batch_size"]),
                                     int(t["seed"]) + 1000 * w.session.rank,
                                     config["cache_data_in_memory"])

        def step_loss(m: torch.nn.Module, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            emb, states, mask = caption_inputs(clip, [str(c) for c in batch["caption"]], w.device)
            zi = torch.as_tensor(batch["image_embedding"], device=w.device)
            return unwrap(m).losses(zi, states, mask, emb, w.generator, net=m,
                                    cond_drop_prob=float(config["cond_drop_prob"]))

        def evaluate(ema_model: torch.nn.Module, step: int) -> dict[str, float]:
            return validate_imported(ema_model, config["sampling"], clip, config["holdout"],
                                     int(t["seed"]))

        return training.Steps(batches, step_loss, evaluate)

    # the paper's Adam settings differ per prior (Table 3)
    training.train_worker(config, build, cfg, steps, betas=(0.9, float(o["adam_beta2"])),
                          eps=float(o["adam_eps"]))
