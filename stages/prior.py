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
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from pipelines.config import to_container
from pipelines.context import StageContext, StageResult
from pipelines.schema.prior import KINDS
from stages import training
from stages.prior_data import read_holdout, read_split, split_dataset, train_statistics
from unclip.devices import model_device, to_device, to_host, to_numpy
from unclip.embeddings import io as eio
from unclip.models.clip import ClipEncoder, load_clip, text_tokens
from unclip.models.prior import mean_cosine, resolve_embed_scale
from unclip.registry import register_checkpoint
from unclip.training.loop import LoopConfig, make_optimizer, train
from unclip.training.state import EMA, unwrap

log = logging.getLogger("unclip")


# ---- caption encodings ---------------------------------------------------------------------


class CaptionEncoder:
    """Per-token caption encodings from the frozen CLIP text tower, optionally cached per caption
    (captions repeat a lot in small data sets; the tower is the costliest part of a tiny step)."""

    def __init__(self, clip: ClipEncoder, device: torch.device | str = "cpu", cache: bool = True):
        self.clip = clip
        self.model = clip.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.cache: dict[str, tuple[torch.Tensor, int]] | None = {} if cache else None

    @torch.no_grad()
    def _compute(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 even inside the training autocast: a cached caption's states must not depend on
        # whether a step (autocast) or validation first saw it
        with torch.autocast(self.device.type, enabled=False):
            _, states, mask = text_tokens(self.model, to_device(self.clip.tokenize(captions),
                                                                self.device))
        return states, mask

    @torch.no_grad()
    def __call__(self, captions: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states (B, L, W), mask (B, L)), trimmed to the longest caption in the batch."""
        captions = [str(c) for c in captions]
        if self.cache is None:
            states, mask = self._compute(captions)
        else:
            missing = sorted({c for c in captions if c not in self.cache})
            for i in range(0, len(missing), 512):
                st, mk = self._compute(missing[i:i + 512])
                for j, c in enumerate(missing[i:i + 512]):
                    n = int(mk[j].sum())
                    self.cache[c] = (st[j, :n].cpu().clone(), n)
            length = max(self.cache[c][1] for c in captions)
            states = torch.zeros(len(captions), length, self.clip.text_width)
            mask = torch.zeros(len(captions), length, dtype=torch.bool)
            for i, c in enumerate(captions):
                st, n = self.cache[c]
                states[i, :n], mask[i, :n] = st, True
        length = int(mask.sum(1).max())
        return states[:, :length].to(self.device), mask[:, :length].to(self.device)


# ---- models ----------------------------------------------------------------------------------


def build_model(kind: str, model_cfg: dict[str, Any], pca_folder: str | None = None,
                sim_edges: np.ndarray | None = None) -> torch.nn.Module:
    if kind == "diffusion":
        from unclip.models.prior import DiffusionPrior

        return DiffusionPrior(model_cfg)
    if kind == "autoregressive":
        from unclip.embeddings.pca import PCA
        from unclip.models.ar_prior import ARPrior

        if pca_folder is None or sim_edges is None:
            return ARPrior(model_cfg)  # buffers come from a checkpoint
        return ARPrior.from_pca(model_cfg, PCA.load(pca_folder), sim_edges)
    raise ValueError(f"prior.kind must be one of {KINDS}, got {kind!r}")


def sample(model: torch.nn.Module, kind: str, sampling: dict[str, Any], tokens: torch.Tensor,
           mask: torch.Tensor, z_t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    s = dict(sampling)
    if kind == "autoregressive" and "sim_quantile" in s:
        s["sim_quantile"] = tuple(s["sim_quantile"])
    return model.sample(tokens, mask, z_t, generator=generator, **s)


def validate(model: torch.nn.Module, kind: str, sampling: dict[str, Any], encoder: CaptionEncoder,
             holdout: dict[str, Any], seed: int, batch_size: int = 256) -> dict[str, float]:
    """Mean cosine of sampled vs true z_i on held-out captions, and the two baselines."""
    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(holdout["captions"]), batch_size):
        tokens, mask = encoder(holdout["captions"][i:i + batch_size])
        zt = torch.as_tensor(holdout["text"][i:i + batch_size], device=device)
        out.append(to_host(sample(model, kind, sampling, tokens, mask, zt, g)))
    z = to_numpy(torch.cat(out))
    cos = mean_cosine(z, holdout["image"])
    base_text = mean_cosine(holdout["text"], holdout["image"])
    base_mean = mean_cosine(holdout["mean_train_image"], holdout["image"])
    return {"val_cosine": cos, "val_baseline_text": base_text, "val_baseline_mean": base_mean,
            "val_delta": cos - max(base_text, base_mean)}


# ---- the stage -------------------------------------------------------------------------------


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
    train_ds = split_dataset(files, "train", frac)
    # driver-side, one file at a time (bounded memory): cheaper than starting Ray Data workers
    stats = train_statistics(read_split({"uri": np.array([u])}, "train", frac) for u in files)
    holdout = read_holdout(files, frac, int(c.max_holdout))
    if len(holdout["captions"]) < 5:
        raise ValueError(f"prior: only {len(holdout['captions'])} held-out rows; raise "
                         "clip.train.holdout_fraction")
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
    loop_config = {
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

    model = build_model(kind, model_cfg)
    ema = EMA(model, 0.0)
    meta = training.load_result_state(result, model, ema)
    final = {k: float(v) for k, v in (meta.get("metrics") or {}).items()}
    folder = ctx.path("model")
    ema.model.save(folder, extra={"trained_steps": meta.get("step"), "metrics": final,
                                  "clip": clip.identity, "sampling": spec["sampling"], **extra})
    version, alias = register_checkpoint(folder, str(c.register_name), final.get("val_cosine"))
    metrics = {**final, "n_train": stats["n"], "n_holdout": len(holdout["captions"]),
               "trained_steps": int(meta.get("step", 0)), "registered_version": int(version),
               "registered_alias": alias}
    if kind == "diffusion":
        metrics["embed_scale"] = model_cfg["embed_scale"]
    return StageResult(
        outputs={"prior": folder, "registered": f"models:/{c.register_name}/{version}"},
        metrics=metrics,
        summary=(f"{kind} prior: held-out cosine {final.get('val_cosine', math.nan):.3f} vs "
                 f"baselines z_t {final.get('val_baseline_text', math.nan):.3f}, mean z_i "
                 f"{final.get('val_baseline_mean', math.nan):.3f}; registered "
                 f"{c.register_name} v{version} as {alias}"))


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
    """One Ray Train worker: build -> prepare_model -> optimizer -> EMA -> restore -> loop.train."""
    import mlflow
    import ray.train
    import ray.train.torch

    t, o, kind = config["train"], config["optim"], config["kind"]
    session = training.WorkerSession(config)
    training.seed_everything(int(t["seed"]) + session.rank)
    device = ray.train.torch.get_device()
    if config["mlflow"].get("tracking_uri"):
        mlflow.set_tracking_uri(config["mlflow"]["tracking_uri"])  # a models:/ CLIP resolves here
    encoder = CaptionEncoder(load_clip(config["clip"]), device,
                             cache=config["cache_text_encodings"])
    sim_edges = None if config["sim_edges"] is None else np.asarray(config["sim_edges"])
    model = build_model(kind, config["model"], config["pca"], sim_edges)
    model = ray.train.torch.prepare_model(model)
    loop_cfg = LoopConfig.from_dict({**t, "lr": o["lr"], "weight_decay": o["weight_decay"],
                                     "ema_decay": o["ema_decay"]})
    opt = make_optimizer(model, loop_cfg)
    for g in opt.param_groups:  # the paper's Adam settings differ per prior (Table 3)
        g["betas"], g["eps"] = (0.9, float(o["adam_beta2"])), float(o["adam_eps"])
    ema = EMA(unwrap(model), loop_cfg.ema_decay)
    meta = session.restore(model, opt, ema)
    batches = _epochs_from_shard(ray.train.get_dataset_shard("train"), int(t["batch_size"]),
                                 int(t["seed"]) + 1000 * session.rank, config["cache_data_in_memory"])
    gen = torch.Generator().manual_seed(int(t["seed"]) + session.rank + int(meta.get("step", 0)))

    def step_loss(m: torch.nn.Module, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tokens, mask = encoder(batch["caption"])
        zi = torch.as_tensor(batch["image_embedding"], device=device)
        zt = torch.as_tensor(batch["text_embedding"], device=device)
        return unwrap(m).losses(zi, tokens, mask, zt, gen, net=m)

    holdout = config["holdout"]

    def evaluate(ema_model: torch.nn.Module, step: int) -> dict[str, float]:
        return validate(ema_model, kind, config["sampling"], encoder, holdout, int(t["seed"]))

    train(session, model, opt, ema, batches, step_loss, loop_cfg,
          start_step=int(meta.get("step", 0)), start_epoch=int(meta.get("epoch", 0)),
          evaluate=evaluate, fault=config.get("fault"), generator=gen)

