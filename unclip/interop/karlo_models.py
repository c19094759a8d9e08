"""Karlo's prior, decoder and super-resolution stage as unclip models (diffusers modules inside).

Each adapter holds the diffusers modules themselves and samples exactly as diffusers'
``UnCLIPPipeline`` / ``UnCLIPImageVariationPipeline`` do (``tests/test_diffusers_interop.py``
checks it stage by stage against them), while exposing the interface the cascade
(:class:`unclip.generation.cascade.UnCLIP`) calls on our own models: ``sample`` for the prior,
``decode`` / ``invert`` / ``resolution`` for the decoder, ``upsample`` for an upsampler.

Sampler: the ``unclip`` sampler reuses diffusers' own ``UnCLIPScheduler`` objects (rebuilt from
the imported scheduler configs) for the step, and our code for the loop around it (classifier-free
guidance, the ``prev_timestep`` handed to each step, the variance taken from the conditional half,
the switch from ``super_res_first`` to ``super_res_last``, the final clamp). Why reuse rather than
make ours match: the scheduler's semantics differ from our DDPM in several small places (Karlo's
step ratio ``(T-1)/(n-1)`` rounded, betas re-derived from the skipped alpha_bar, the learned range
read between the posterior and the *re-derived* beta, noise at every step with t > 0), which is
exactly the kind of detail a re-implementation gets subtly wrong; diffusers is already a core
dependency, so reusing the reference costs nothing. Our own DDIM and DPM-Solver++ samplers drive
the imported decoder too (its schedule is the cosine one ours supports), which is what DDIM
inversion, variations from the inverted noise, edits and interpolations need.

Conditioning, as in Karlo: the prior and the decoder read the *raw* CLIP projections (not
unit-normalised: ``raw_embeddings``), and their unconditional branch is CLIP's encoding of the
empty caption (the decoder's also replaces the image embedding by its learned null embedding).
That encoding is a constant of the imported CLIP: it is computed once at import and stored with
the prior and the decoder (``null_*`` buffers), so each is self-contained like our models with
learned null tokens. A decoder called without a caption (variations) is conditioned on the empty
caption, as ``UnCLIPImageVariationPipeline`` does.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from unclip import checkpoint
from unclip.diffusion import DiffusionConfig, GaussianDiffusion, ddim_invert, guide, sample
from unclip.diffusion.noise import Generators, randn, repeat_rows

PRIOR_KIND = "diffusers_unclip_prior"
DECODER_KIND = "diffusers_unclip_decoder"
SUPER_RES_KIND = "diffusers_unclip_super_res"
KINDS = (PRIOR_KIND, DECODER_KIND, SUPER_RES_KIND)
UNCLIP_SAMPLER = "unclip"  # diffusers' UnCLIPScheduler, as Karlo samples

# Karlo's own defaults (those of diffusers' UnCLIPPipeline), recorded as the models' "as trained"
# sampling settings so that `unclip generate` samples as the reference does unless told otherwise.
PRIOR_SAMPLING = {"sampler": UNCLIP_SAMPLER, "steps": 25, "guidance_scale": 4.0, "num_candidates": 1}
DECODER_SAMPLING = {"sampler": UNCLIP_SAMPLER, "steps": 25, "guidance_scale": 8.0}
SUPER_RES_STEPS = 7

Text = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (raw text embedding, token states, mask)


def config_json(obj: Any) -> dict[str, Any]:
    """A diffusers model's or scheduler's config as plain JSON (what ``from_config`` rebuilds)."""
    return json.loads(obj.to_json_string())


def _scheduler(cfg: dict[str, Any]):
    from diffusers import UnCLIPScheduler

    return UnCLIPScheduler.from_config(cfg)


def _input_error(message: str) -> ValueError:
    """A bad setting, reported by the ``unclip`` CLI in one line (an InputError)."""
    from unclip.generation.images import InputError

    return InputError(message)


def _check_steps(steps: int, what: str) -> int:
    if int(steps) < 2:  # UnCLIPScheduler's step ratio (T-1)/(n-1) needs two steps at least
        raise _input_error(f"{what}: the unclip sampler needs at least 2 steps, got {steps}")
    return int(steps)


def _pairs(scheduler, steps: int, device: torch.device):
    """(t, prev_timestep) over the scheduler's timesteps, as the pipelines pass them to ``step``."""
    scheduler.set_timesteps(steps, device=device)
    ts = scheduler.timesteps
    return [(t, None if i + 1 == len(ts) else ts[i + 1]) for i, t in enumerate(ts)]


class _NullCaption(nn.Module):
    """The imported CLIP's encoding of the empty caption: the unconditional branch of guidance."""

    def __init__(self, dim: int, length: int, width: int):
        super().__init__()
        self.register_buffer("null_text_embed", torch.zeros(dim))
        self.register_buffer("null_text_states", torch.zeros(length, width))
        self.register_buffer("null_text_mask", torch.zeros(length, dtype=torch.bool))

    def set_null_caption(self, embed: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> None:
        self.null_text_embed.copy_(embed.reshape(-1))
        self.null_text_states.copy_(states.reshape(self.null_text_states.shape))
        self.null_text_mask.copy_(mask.reshape(-1).bool())

    def null_text(self, b: int) -> Text:
        return (self.null_text_embed.expand(b, -1), self.null_text_states.expand(b, -1, -1),
                self.null_text_mask.expand(b, -1))

    def drop_caption(self, text: Text, drop: torch.Tensor | None) -> Text:
        """``text`` with the rows of ``drop`` replaced by the empty caption (guidance dropout)."""
        if drop is None:
            return text
        emb, states, mask = text
        d = drop.to(emb.device)
        n_emb, n_states, n_mask = self.null_text(emb.shape[0])
        return (torch.where(d[:, None], n_emb, emb), torch.where(d[:, None, None], n_states, states),
                torch.where(d[:, None], n_mask, mask))


def _text_shapes(cfg: dict[str, Any]) -> tuple[int, int, int]:
    return int(cfg["text_dim"]), int(cfg["text_length"]), int(cfg["text_width"])


class KarloPrior(_NullCaption):
    """Karlo's ``PriorTransformer`` (x0-prediction on the raw CLIP image embedding) and its scheduler."""

    raw_embeddings = True

    def __init__(self, prior: nn.Module, scheduler_config: dict[str, Any], text_length: int,
                 text_width: int):
        super().__init__(int(prior.config.embedding_dim), text_length, text_width)
        self.prior = prior
        self.scheduler_config = dict(scheduler_config)

    @property
    def dim(self) -> int:
        return int(self.prior.config.embedding_dim)

    @torch.no_grad()
    def sample(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, z_t: torch.Tensor,
               steps: int = PRIOR_SAMPLING["steps"], sampler: str = UNCLIP_SAMPLER,
               guidance_scale: float = PRIOR_SAMPLING["guidance_scale"], num_candidates: int = 1,
               generator: Generators = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """Raw image embeddings (B, dim) for captions given as (token states, mask, raw z_t), as
        ``UnCLIPPipeline``'s prior loop; ``num_candidates`` > 1 keeps, per caption, the draw with
        the largest cosine to z_t (Karlo draws one)."""
        if sampler != UNCLIP_SAMPLER:
            raise _input_error(f"the imported prior samples with the {UNCLIP_SAMPLER!r} sampler only, "
                               f"got {sampler!r}")
        if num_candidates < 1:
            raise _input_error(f"num_candidates must be >= 1, got {num_candidates}")
        steps = _check_steps(steps, "prior")
        device = self.null_text_embed.device
        k, b = int(num_candidates), z_t.shape[0]
        emb, states, mask = (v.to(device).repeat_interleave(k, 0) for v in (z_t, text_tokens, text_mask))
        emb, states, mask = emb.float(), states.float(), mask.bool()
        guided = guidance_scale != 1.0
        if guided:  # one batched pass, the unconditional half first as the pipeline does
            null = self.null_text(b * k)
            emb, states, mask = (torch.cat([u, c]) for u, c in zip(null, (emb, states, mask)))
        sched = _scheduler(self.scheduler_config)
        rows = repeat_rows(generator, k)  # each caption's generator for each of its candidates
        if x_T is None:
            x_T = randn((b * k, self.dim), rows)
        x = x_T.to(device).float() * sched.init_noise_sigma
        for t, prev in _pairs(sched, steps, device):
            pred = self.prior(torch.cat([x, x]) if guided else x, timestep=t, proj_embedding=emb,
                              encoder_hidden_states=states, attention_mask=mask).predicted_image_embedding
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            x = sched.step(pred, timestep=t, sample=x, generator=rows, prev_timestep=prev).prev_sample
        z = self.prior.post_process_latents(x)
        if k == 1:
            return z
        z = z.view(b, k, -1)
        score = F.cosine_similarity(z, z_t.to(device).float()[:, None], dim=-1)
        return z[torch.arange(b, device=device), score.argmax(1)]

    # ---- fine-tuning --------------------------------------------------------------------------

    @property
    def diffusion(self) -> DiffusionConfig:
        """The prior's process as our GaussianDiffusion trains it: x0 ("sample") prediction on the
        normalised latent ``(z - clip_mean) / clip_std``, the imported scheduler's schedule."""
        c = self.scheduler_config
        return DiffusionConfig(num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
                               beta_schedule=str(c.get("beta_schedule", "squaredcos_cap_v2")),
                               prediction_type=str(c.get("prediction_type", "sample")),
                               clip_sample=False)

    def freeze_statistics(self) -> "KarloPrior":
        """Keep ``clip_mean`` / ``clip_std`` (the embedding statistics the latents are normalised
        with) out of training: moving them would rescale the target rather than fit it."""
        for p in (self.prior.clip_mean, self.prior.clip_std):
            if p is not None:
                p.requires_grad_(False)
        return self

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Raw image embeddings -> the normalised latents the transformer denoises (the inverse of
        ``post_process_latents``)."""
        return (z.float() - self.prior.clip_mean.detach()) / self.prior.clip_std.detach()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text_embed: torch.Tensor,
                text_states: torch.Tensor, text_mask: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted latent x0 (B, dim) of one branch; rows of ``drop`` read the empty caption (the
        unconditional half of guidance, which fine-tuning keeps training)."""
        device = self.null_text_embed.device
        emb, states, mask = self.drop_caption(
            (text_embed.to(device).float(), text_states.to(device).float(), text_mask.to(device).bool()),
            drop)
        return self.prior(x_t, timestep=t, proj_embedding=emb, encoder_hidden_states=states,
                          attention_mask=mask).predicted_image_embedding

    def losses(self, z_i: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
               z_t: torch.Tensor, generator: torch.Generator | None = None,
               net: nn.Module | None = None, cond_drop_prob: float = 0.1) -> dict[str, torch.Tensor]:
        """Batch-mean x0 MSE (``loss``) on raw image embeddings ``z_i`` for captions given as (token
        states, mask, raw text embedding ``z_t``), the caption dropped ``cond_drop_prob`` of the
        time. ``net``: this prior as the step calls it (a DDP wrapper of it)."""
        net = self if net is None else net
        device = self.null_text_embed.device
        b = z_i.shape[0]
        drop = torch.rand(b, generator=generator).to(device) < cond_drop_prob
        out = GaussianDiffusion(self.diffusion).training_losses(
            lambda x, t: net(x, t, z_t, text_states, text_mask, drop),
            self.to_latent(z_i.to(device)), generator=generator)
        return {"loss": out["loss"].mean()}

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        dim, length, width = self.dim, *self.null_text_states.shape
        checkpoint.save(folder, self.state_dict(), PRIOR_KIND, {
            "prior": config_json(self.prior), "scheduler": self.scheduler_config,
            "text_dim": dim, "text_length": int(length), "text_width": int(width)}, extra)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "KarloPrior":
        """The architecture a checkpoint's ``config`` describes, with fresh weights."""
        from diffusers import PriorTransformer

        _, length, width = _text_shapes(cfg)
        return cls(PriorTransformer.from_config(cfg["prior"]), cfg["scheduler"], length, width)

    @classmethod
    def from_checkpoint(cls, folder: str) -> "KarloPrior":
        state, meta = checkpoint.load(folder, PRIOR_KIND)
        return checkpoint.load_into(cls.from_config(meta["config"]), state, folder, "imported prior")


class KarloDecoder(_NullCaption):
    """Karlo's ``UnCLIPTextProjModel`` + ``UNet2DConditionModel`` (epsilon, learned variance)."""

    raw_embeddings = True

    def __init__(self, text_proj: nn.Module, unet: nn.Module, scheduler_config: dict[str, Any],
                 text_dim: int, text_length: int, text_width: int):
        super().__init__(text_dim, text_length, text_width)
        self.text_proj = text_proj
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def use_caption(self) -> bool:
        return True

    @property
    def diffusion(self) -> DiffusionConfig:
        """The process as our samplers (DDIM, DPM-Solver++, inversion) read it."""
        c = self.scheduler_config
        return DiffusionConfig(num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
                               beta_schedule=str(c.get("beta_schedule", "squaredcos_cap_v2")),
                               prediction_type=str(c.get("prediction_type", "epsilon")),
                               learn_variance=c.get("variance_type") == "learned_range",
                               clip_sample=bool(c.get("clip_sample", True)))

    def _inputs(self, image_embeddings: torch.Tensor, text: Text | None) -> tuple[torch.Tensor, Text]:
        """The image embeddings and the caption (the empty one when None) on the model's device."""
        device = self.null_text_embed.device
        z = image_embeddings.to(device).float()
        b = z.shape[0]
        text = self.null_text(b) if text is None else \
            (text[0].to(device).float(), text[1].to(device).float(), text[2].to(device).bool())
        if text[0].shape[0] != b:
            raise ValueError(f"{b} image embeddings but {text[0].shape[0]} captions")
        return z, text

    def denoiser(self, image_embeddings: torch.Tensor, text: Text | None,
                 guidance_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x_t, t) -> output`` (mean and variance channels), guidance applied as the pipelines
        do: ``uncond + s (cond - uncond)`` on the mean, the variance from the conditional half."""
        z, (emb, states, mask) = self._inputs(image_embeddings, text)
        b = z.shape[0]
        guided = guidance_scale != 1.0
        if guided:
            emb, states, mask = (torch.cat([u, c]) for u, c in zip(self.null_text(b), (emb, states, mask)))
        context, time_embed = self.text_proj(image_embeddings=z, prompt_embeds=emb,
                                             text_encoder_hidden_states=states,
                                             do_classifier_free_guidance=guided)
        mask = F.pad(mask, (self.text_proj.clip_extra_context_tokens, 0), value=True)
        channels = int(self.unet.config.in_channels)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if guided:
                x = torch.cat([x, x])
                t = torch.cat([t, t]) if t.ndim == 1 else t
            out = self.unet(sample=x, timestep=t, encoder_hidden_states=context,
                            class_labels=time_embed, attention_mask=mask).sample
            if not guided:
                return out
            uncond, cond = out.chunk(2)
            return guide(cond, uncond, guidance_scale, channels=channels)

        return denoise

    def conditioning(self, image_embeddings: torch.Tensor, text: Text | None,
                     drop_image: torch.Tensor | None = None,
                     drop_text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context, time embedding, attention mask) of one branch, as the pipelines build them.

        Rows of ``drop_image`` take ``text_proj``'s learned unconditional image embedding and rows
        of ``drop_text`` the empty caption: the inputs of guidance's unconditional half, which
        fine-tuning must keep training (classifier-free guidance dropout)."""
        z, (emb, states, mask) = self._inputs(image_embeddings, text)
        device = z.device
        if drop_image is not None:
            null = self.text_proj.learned_classifier_free_guidance_embeddings.to(z.dtype)
            z = torch.where(drop_image.to(device)[:, None], null.expand_as(z), z)
        emb, states, mask = self.drop_caption((emb, states, mask), drop_text)
        context, time_embed = self.text_proj(image_embeddings=z, prompt_embeds=emb,
                                             text_encoder_hidden_states=states,
                                             do_classifier_free_guidance=False)
        return context, time_embed, F.pad(mask, (self.text_proj.clip_extra_context_tokens, 0), value=True)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image_embeddings: torch.Tensor,
                text: Text | None, drop_image: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's output (mean and variance channels) of one conditioning branch: what a
        training step calls through DDP (whose gradient hooks need the call to go through
        ``forward``)."""
        context, time_embed, mask = self.conditioning(image_embeddings, text, drop_image, drop_text)
        return self.unet(sample=x_t, timestep=t, encoder_hidden_states=context,
                         class_labels=time_embed, attention_mask=mask).sample

    def training_losses(self, x0: torch.Tensor, image_embeddings: torch.Tensor, text: Text | None,
                        drop_image: torch.Tensor | None = None, drop_text: torch.Tensor | None = None,
                        generator: torch.Generator | None = None,
                        model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses of images ``x0`` (B, 3, R, R) in [-1, 1]: epsilon MSE plus, with
        ``learned_range``, improved DDPM's variational bound on the variance channels (our
        :class:`GaussianDiffusion`, whose learned-range variance is UnCLIPScheduler's).
        ``model``: this decoder as the step calls it (a DDP wrapper of it); itself by default."""
        call = self if model is None else model
        device = self.null_text_embed.device
        return GaussianDiffusion(self.diffusion).training_losses(
            lambda x, t: call(x, t, image_embeddings, text, drop_image, drop_text),
            x0.to(device).float(), generator=generator)

    @torch.no_grad()
    def decode(self, image_embeddings: torch.Tensor, text: Text | None = None,
               guidance_scale: float = DECODER_SAMPLING["guidance_scale"],
               sampler: str = UNCLIP_SAMPLER, steps: int = DECODER_SAMPLING["steps"],
               generator: Generators = None, x_T: torch.Tensor | None = None,
               eta: float = 0.0, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1]: ``unclip`` is the pipelines' decoder loop; ``ddim``,
        ``dpm`` and ``ddpm`` are our samplers on the same process (the variance unused by DDIM)."""
        device = self.null_text_embed.device
        denoise = self.denoiser(image_embeddings, text, guidance_scale)
        shape = (image_embeddings.shape[0], int(self.unet.config.in_channels), self.resolution,
                 self.resolution)
        if sampler != UNCLIP_SAMPLER:
            x = sample(denoise, shape, self.diffusion, sampler=sampler, steps=steps,
                       generator=generator, x_T=x_T, device=device, eta=eta, progress=progress)
            return x.clamp(-1, 1)
        sched = _scheduler(self.scheduler_config)
        if x_T is None:
            x_T = randn(shape, generator)
        x = x_T.to(device).float() * sched.init_noise_sigma
        pairs = _pairs(sched, _check_steps(steps, "decoder"), device)
        for i, (t, prev) in enumerate(pairs):
            x = sched.step(denoise(x, t), t, x, prev_timestep=prev, generator=generator).prev_sample
            if progress is not None:
                progress(i + 1, len(pairs))
        return x.clamp(-1, 1)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, image_embeddings: torch.Tensor, steps: int) -> torch.Tensor:
        """DDIM-inverted x_T of ``images`` (unguided, empty caption, as variations condition)."""
        device = self.null_text_embed.device
        return ddim_invert(self.denoiser(image_embeddings, None, 1.0), images.to(device).float(),
                           self.diffusion, steps)

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        dim, (length, width) = int(self.null_text_embed.shape[0]), self.null_text_states.shape
        checkpoint.save(folder, self.state_dict(), DECODER_KIND, {
            "text_proj": config_json(self.text_proj), "decoder": config_json(self.unet),
            "scheduler": self.scheduler_config, "text_dim": dim, "text_length": int(length),
            "text_width": int(width)}, extra)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "KarloDecoder":
        """The architecture a checkpoint's ``config`` describes, with fresh weights (a training
        worker builds it, then loads the source's weights or its own checkpoint)."""
        from diffusers import UNet2DConditionModel

        return cls(text_proj_class().from_config(cfg["text_proj"]),
                   UNet2DConditionModel.from_config(cfg["decoder"]), cfg["scheduler"], *_text_shapes(cfg))

    @classmethod
    def from_checkpoint(cls, folder: str) -> "KarloDecoder":
        state, meta = checkpoint.load(folder, DECODER_KIND)
        return checkpoint.load_into(cls.from_config(meta["config"]), state, folder, "imported decoder")


def text_proj_class():
    """diffusers' ``UnCLIPTextProjModel`` (kept under its deprecated pipelines; no transformers)."""
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    return UnCLIPTextProjModel


class KarloSuperRes(nn.Module):
    """Karlo's super-resolution stage: ``super_res_first`` for every step but the last,
    ``super_res_last`` for the last, on ``concat(x_t, bicubic(low))``; no guidance, no noise
    augmentation of the low-resolution input. Its output side is the UNets' ``sample_size`` (256
    for Karlo, from 64), as in the pipelines. It is the last stage of Karlo's cascade (``final``):
    the cascade stops after it."""

    final = True

    def __init__(self, first: nn.Module, last: nn.Module, scheduler_config: dict[str, Any],
                 steps: int = SUPER_RES_STEPS, scale: int = 4):
        super().__init__()
        self.first = first
        self.last = last
        self.scheduler_config = dict(scheduler_config)
        self.steps = int(steps)
        self.scale = int(scale)  # the side ratio it was trained at (Karlo: 64 -> 256)

    @property
    def side(self) -> int:
        return int(self.first.config.sample_size)

    # ---- fine-tuning --------------------------------------------------------------------------

    @property
    def diffusion(self) -> DiffusionConfig:
        """The process as our GaussianDiffusion trains it (epsilon, the imported schedule)."""
        c = self.scheduler_config
        return DiffusionConfig(num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
                               beta_schedule=str(c.get("beta_schedule", "squaredcos_cap_v2")),
                               prediction_type=str(c.get("prediction_type", "epsilon")))

    @property
    def last_interval(self) -> int:
        """Timesteps below this are the last step's under the pipelines' spacing of ``steps``
        (``super_res_last`` runs there, at t = 0; ``super_res_first`` everywhere else)."""
        return max(1, (self.diffusion.num_train_timesteps - 1) // max(1, self.steps - 1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low: torch.Tensor,
                last: bool = False) -> torch.Tensor:
        """Predicted noise of ``x_t`` (B, 3, S, S) given ``low`` (B, 3, S / scale, ...) in [-1, 1],
        bicubic-upsampled to x_t's side and concatenated, as the pipelines do; S may be a crop."""
        up = F.interpolate(low.float(), size=list(x_t.shape[-2:]), mode="bicubic",
                           align_corners=False, antialias=True)
        unet = self.last if last else self.first
        return unet(sample=torch.cat([x_t, up], dim=1), timestep=t).sample

    def losses(self, hr: torch.Tensor, low: torch.Tensor, generator: torch.Generator | None = None,
               net: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Epsilon MSE of both UNets on the same crops: ``super_res_first`` at timesteps drawn over
        the whole schedule, ``super_res_last`` at timesteps of the last step's interval (where the
        sampler calls it). ``net``: this module as the step calls it (a DDP wrapper of it)."""
        net = self if net is None else net
        gd = GaussianDiffusion(self.diffusion)
        b, device = hr.shape[0], hr.device
        first = gd.training_losses(lambda x, t: net(x, t, low), hr, generator=generator)["loss"]
        t_last = torch.randint(0, self.last_interval, (b,), generator=generator).to(device)
        last = gd.training_losses(lambda x, t: net(x, t, low, True), hr, t=t_last,
                                  generator=generator)["loss"]
        return {"loss": first.mean() + last.mean(), "loss_first": first.mean().detach(),
                "loss_last": last.mean().detach()}

    @torch.no_grad()
    def upsample(self, low: torch.Tensor, steps: int | None = None, sampler: str | None = None,
                 generator: Generators = None, x_T: torch.Tensor | None = None,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """(B, 3, side, side) in [-1, 1] from ``low`` (B, 3, h, w) in [-1, 1]."""
        if sampler not in (None, UNCLIP_SAMPLER):
            raise _input_error(f"the imported super-resolution stage samples with {UNCLIP_SAMPLER!r} only")
        device = next(self.first.parameters()).device
        sched = _scheduler(self.scheduler_config)
        pairs = _pairs(sched, _check_steps(steps or self.steps, "super-resolution"), device)
        side, channels = self.side, int(self.first.config.in_channels) // 2
        if x_T is None:
            x_T = randn((low.shape[0], channels, side, side), generator)
        x = x_T.to(device).float() * sched.init_noise_sigma
        up = F.interpolate(low.to(device).float(), size=[side, side], mode="bicubic",
                           align_corners=False, antialias=True)
        for i, (t, prev) in enumerate(pairs):
            unet = self.last if i == len(pairs) - 1 else self.first
            out = unet(sample=torch.cat([x, up], dim=1), timestep=t).sample
            x = sched.step(out, t, x, prev_timestep=prev, generator=generator).prev_sample
            if progress is not None:
                progress(i + 1, len(pairs))
        return x.clamp(-1, 1)

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        checkpoint.save(folder, self.state_dict(), SUPER_RES_KIND, {
            "super_res_first": config_json(self.first), "super_res_last": config_json(self.last),
            "scheduler": self.scheduler_config, "steps": self.steps, "scale": self.scale}, extra)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "KarloSuperRes":
        """The architecture a checkpoint's ``config`` describes, with fresh weights."""
        from diffusers import UNet2DModel

        return cls(UNet2DModel.from_config(cfg["super_res_first"]),
                   UNet2DModel.from_config(cfg["super_res_last"]), cfg["scheduler"], cfg["steps"],
                   int(cfg.get("scale", 4)))

    @classmethod
    def from_checkpoint(cls, folder: str) -> "KarloSuperRes":
        state, meta = checkpoint.load(folder, SUPER_RES_KIND)
        return checkpoint.load_into(cls.from_config(meta["config"]), state, folder,
                                    "imported super-resolution stage")


LOADERS = {PRIOR_KIND: KarloPrior.from_checkpoint, DECODER_KIND: KarloDecoder.from_checkpoint,
           SUPER_RES_KIND: KarloSuperRes.from_checkpoint}
STAGE_KINDS = {"prior": PRIOR_KIND, "decoder": DECODER_KIND, "upsampler": SUPER_RES_KIND}
