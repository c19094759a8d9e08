"""Our models at the tiny preset's sizes (configs/preset/tiny.yaml and the stage configs), random
batches of the right shapes, and one training step done the way the stages do it.

A step is exactly the shared loop's (unclip/training/loop.py): the stage's loss
(``GaussianDiffusion.training_losses`` through the model's own loss code), ``zero_grad``,
``backward``, gradient clipping, ``make_optimizer``'s AdamW step and the EMA update. Inputs are
random tensors of the shapes the stages feed (the per-token caption encodings precomputed, as
dalle2-pytorch is fed them), so the step measures the model, not the data path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from unclip.training.loop import LoopConfig, make_optimizer
from unclip.training.state import EMA


@dataclass
class Sizes:
    """The tiny preset's shapes: CLIP embedding / text width / context, prior and decoder."""

    clip_dim: int
    text_width: int
    context: int
    caption_tokens: int            # valid tokens per caption (shapes captions: ~8-12)
    prior: dict[str, Any]
    prior_batch: int
    decoder: dict[str, Any]
    decoder_batch: int
    decoder_diffusion: dict[str, Any]
    decoder_sampling: dict[str, Any]
    prior_sampling: dict[str, Any]
    up_scale: int
    up_sides: tuple[int, ...]      # output sides of the upsamplers (tiny: 128, 512)
    up_batch: int
    ar_prior: dict[str, Any]       # the AR prior's model options, num_buckets from the pca stage
    # each upsampler's config as its stage builds it, and its training batch (empty: the library's
    # default upsampler at ``up_batch``)
    up_models: tuple[dict[str, Any], ...] = ()
    up_batches: tuple[int, ...] = ()


def tiny_sizes() -> Sizes:
    """Read the sizes from the composed tiny config, so the bench follows the presets."""
    from pipelines.config import load_config, to_container
    from stages.upsample import model_config

    cfg = load_config(["preset=tiny"])
    clip = to_container(cfg.clip.model)
    prior = to_container(cfg.prior.diffusion)
    ar = {**to_container(cfg.prior.autoregressive.model), "num_buckets": int(cfg.pca.num_buckets)}
    dec = to_container(cfg.decoder)
    res = int(dec["resolution"])
    return Sizes(clip_dim=int(clip["embed_dim"]), text_width=int(clip["text_cfg"]["width"]),
                 context=int(clip["text_cfg"]["context_length"]), caption_tokens=10,
                 prior={**prior["model"], "process": prior["process"]},
                 prior_batch=int(cfg.prior.train.batch_size),
                 decoder={**dec["model"], "resolution": res, "use_caption": bool(dec["use_caption"])},
                 decoder_batch=int(dec["train"]["batch_size"]), decoder_diffusion=dec["diffusion"],
                 decoder_sampling=dec["sampling"], prior_sampling=prior["sampling"],
                 up_scale=4, up_sides=(res * 4, res * 16), up_batch=8, ar_prior=ar,
                 up_models=tuple(model_config(cfg[st]) for st in ("upsample1", "upsample2")),
                 up_batches=tuple(int(cfg[st].train.batch_size) for st in ("upsample1", "upsample2")))


# ---- models ----------------------------------------------------------------------------------


def make_prior(s: Sizes, width: int | None = None, heads: int | None = None) -> torch.nn.Module:
    from unclip.models.prior import DiffusionPrior

    m = s.prior
    return DiffusionPrior({"dim": s.clip_dim, "text_width": s.text_width, "max_text_len": s.context,
                           "width": int(width or m["width"]), "layers": int(m["layers"]),
                           "heads": int(heads or m["heads"]), "dropout": float(m.get("dropout", 0.0)),
                           "cond_drop_prob": float(m.get("cond_drop_prob", 0.1)),
                           "embed_scale": s.clip_dim ** 0.5, "diffusion": dict(m["process"])})


def ar_prior_sizes(s: Sizes, mid_tokens: int = 319) -> dict[str, dict[str, Any]]:
    """AR prior configs by name: ``tiny`` (the tiny preset's model and PCA buckets, its CLIP's
    sizes) and ``mid`` (the prior stage's default model, as composed without a preset, over
    ``mid_tokens`` components of a 1024-d CLIP with 1024 buckets: the paper's 319 x 1024)."""
    from pipelines.config import load_config, to_container

    mid = to_container(load_config(["~preset"]).prior.autoregressive.model)
    return {"tiny": {**s.ar_prior, "dim": s.clip_dim, "text_width": s.text_width,
                     "max_text_len": s.context},
            "mid": {**mid, "n_components": int(mid_tokens), "num_buckets": 1024, "dim": 1024,
                    "text_width": 1024, "max_text_len": 77}}


def make_ar_prior(cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """An AR prior of ``cfg`` (random weights) whose quantizer is a PCA fitted to random vectors
    with a decaying spectrum, so different codes decode to different embeddings."""
    import numpy as np

    from unclip.embeddings.pca import fit as fit_pca
    from unclip.models.ar_prior import ARPrior, similarity_edges

    rng = np.random.default_rng(seed)
    dim, buckets = int(cfg["dim"]), int(cfg["num_buckets"])
    rows = max(4 * buckets, 2 * dim)
    zi = rng.normal(size=(rows, dim)) * np.geomspace(1.0, 0.05, dim)
    zt = rng.normal(size=(rows, dim))
    sims = np.sum(zi * zt, 1) / np.linalg.norm(zi, axis=1) / np.linalg.norm(zt, axis=1)
    torch.manual_seed(seed)
    pca = fit_pca(zi, n_components=int(cfg["n_components"]), num_buckets=buckets)
    return ARPrior.from_pca(cfg, pca, similarity_edges(sims, int(cfg.get("sim_buckets", 16))))


def make_decoder(s: Sizes) -> torch.nn.Module:
    from unclip.diffusion import DiffusionConfig
    from unclip.models.decoder import Decoder, DecoderConfig

    cfg = DecoderConfig.from_dict({**s.decoder, "clip_dim": s.clip_dim, "text_width": s.text_width,
                                   "learn_variance": bool(s.decoder_diffusion["learn_variance"])})
    return Decoder(cfg, DiffusionConfig.from_dict(s.decoder_diffusion))


def make_upsampler(s: Sizes, i: int = 0) -> torch.nn.Module:
    """Upsampler ``i`` of the cascade (0: the first) as the preset configures it."""
    from unclip.models.upsampler import Upsampler

    return Upsampler(s.up_models[i] if s.up_models else {"scale": s.up_scale})


def up_batch(s: Sizes, i: int) -> int:
    return s.up_batches[i] if s.up_batches else (s.up_batch, 2)[i]


# ---- batches and steps -----------------------------------------------------------------------


def text_batch(s: Sizes, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token caption states (B, L, W) and mask (B, L): ``caption_tokens`` valid tokens."""
    states = torch.randn(b, s.caption_tokens, s.text_width, generator=g)
    return states, torch.ones(b, s.caption_tokens, dtype=torch.bool)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def prior_batch(s: Sizes, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    tokens, mask = text_batch(s, b, g)
    return {"z_i": unit(torch.randn(b, s.clip_dim, generator=g)),
            "z_t": unit(torch.randn(b, s.clip_dim, generator=g)), "tokens": tokens, "mask": mask}


def decoder_batch(s: Sizes, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    tokens, mask = text_batch(s, b, g)
    side = int(s.decoder["resolution"])
    return {"x0": torch.rand(b, 3, side, side, generator=g) * 2 - 1,
            "z_i": unit(torch.randn(b, s.clip_dim, generator=g)), "tokens": tokens, "mask": mask}


def upsampler_batch(side: int, scale: int, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A training batch of crops a quarter of the target side (the paper's crop rule)."""
    crop = side // 4
    return {"hr": torch.rand(b, 3, crop, crop, generator=g) * 2 - 1,
            "low": torch.rand(b, 3, crop // scale, crop // scale, generator=g) * 2 - 1}


def prior_loss(g: torch.Generator) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """The prior stage's step loss (stages/prior.py: ``model.losses``)."""
    return lambda m, b: m.losses(b["z_i"], b["tokens"], b["mask"], b["z_t"], g)["loss"]


def decoder_loss(g: torch.Generator) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """The decoder stage's step loss (stages/decoder.py: hybrid loss, z_i 10% / caption 50% drops)."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.models.decoder import dropout_masks

    gd: GaussianDiffusion | None = None

    def loss(m: torch.nn.Module, b: dict) -> torch.Tensor:
        nonlocal gd
        gd = gd or GaussianDiffusion(m.diffusion)
        dc, dt = dropout_masks(b["x0"].shape[0], 0.1, 0.5, g)
        out = gd.training_losses(lambda x, t: m(x, t, b["z_i"], b["tokens"], b["mask"], dc, dt),
                                 b["x0"], generator=g)
        return out["loss"].mean()

    return loss


def upsampler_loss(g: torch.Generator) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """The upsampler's step loss (unclip/training/upsampler.py: noise-level conditioning aug)."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.training.upsampler import make_step_loss

    fns: dict[int, Callable] = {}

    def loss(m: torch.nn.Module, b: dict) -> torch.Tensor:
        if id(m) not in fns:
            fns[id(m)] = make_step_loss(GaussianDiffusion(m.diffusion_config),
                                        int(m.config["aug_max_level"]), g)
        return fns[id(m)](m, (b["hr"], b["low"]))["loss"]

    return loss


class Stepper:
    """One training step of ``model`` as the shared loop does it (AdamW from make_optimizer,
    clipping, EMA)."""

    def __init__(self, model: torch.nn.Module, loss: Callable[[torch.nn.Module, dict], torch.Tensor],
                 batch: dict[str, torch.Tensor], lr: float = 1e-4, device: str = "cpu",
                 optimizer: Callable[[torch.nn.Module, LoopConfig], torch.optim.Optimizer] = make_optimizer):
        self.model = model.to(device).train()
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.cfg = LoopConfig(lr=lr, grad_clip=1.0, ema_decay=0.999)
        self.opt = optimizer(self.model, self.cfg)
        self.ema = EMA(self.model, self.cfg.ema_decay)
        self.loss = loss

    def forward_backward(self) -> torch.Tensor:
        loss = self.loss(self.model, self.batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def __call__(self) -> float:
        loss = self.forward_backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.ema.update(self.model)
        return float(loss.detach())


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
