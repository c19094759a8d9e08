"""The unCLIP cascade at inference: CLIP text encoder -> prior -> decoder -> two upsamplers.

Every manipulation of the paper (Sec. 3) works in CLIP image-embedding space and then decodes:
variations keep z_i and the DDIM-inverted x_T and add noise along the way (DDIM eta > 0); interpolations slerp two embeddings; text diffs
slerp z_i towards the normalized difference of two caption embeddings, from the DDIM-inverted x_T
of the image; PCA reconstructions keep the first k principal components of z_i.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip.devices import to_numpy
from unclip.diffusion.noise import Generators
from unclip.models.decoder_sampling import DecoderSampling, caption_condition, decode, invert
from unclip.models.prior import PriorSampling
from unclip.generation.images import InputError, check_prompt, from_pil, to_pil
from unclip.generation.models import ModelRefs, load_stage, resolve


def slerp(a: torch.Tensor, b: torch.Tensor, theta: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors (rows), theta in [0, 1]."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.acos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    out = (torch.sin((1 - theta) * omega) / so) * a + (torch.sin(theta * omega) / so) * b
    return F.normalize(out, dim=-1)


def slerp_scaled(a: torch.Tensor, b: torch.Tensor, theta: float) -> torch.Tensor:
    """:func:`slerp` of the directions, with the norm interpolated linearly: for models that read
    raw (not unit-norm) CLIP embeddings, whose norm carries information."""
    na, nb = a.float().norm(dim=-1, keepdim=True), b.float().norm(dim=-1, keepdim=True)
    return slerp(a, b, theta) * ((1 - theta) * na + theta * nb)


# DDIM eta of variations from the inverted x_T (0 gives the input back; see README "Variations").
VARY_ETA = 0.5
# Used only for a checkpoint that records no sampling settings (written before they were recorded):
# the library's sampling defaults.
FALLBACK = {"prior": asdict(PriorSampling()), "decoder": asdict(DecoderSampling())}


@dataclass
class Settings:
    """Sampling settings of one call. ``None`` means *as trained*: the settings the prior's and the
    decoder's stage validated with, recorded in their checkpoints (``sampling`` in config.json),
    so a paper-preset model samples as the paper does and a tiny one as tiny. Exceptions:
    ``decoder_guidance`` is 1 for DDIM-inverted noise (edits, variations, interpolated noise: the
    map that noise was inverted for) unless given; ``decoder_eta`` is 0 except for variations;
    ``upsampler_steps`` is the step count each upsampler was trained for. Why inverted noise is
    decoded at guidance 1: docs/results.md (Generation).
    """

    prior_guidance: float | None = None
    decoder_guidance: float | None = None
    prior_steps: int | None = None
    prior_candidates: int | None = None
    prior_sampler: str | None = None
    decoder_sampler: str | None = None
    decoder_steps: int | None = None
    decoder_eta: float | None = None
    upsampler_steps: int | None = None
    upsample: bool = True


def trained_sampling(folder: str, stage: str) -> dict:
    """The sampling settings a checkpoint's stage validated with (FALLBACK where it records none)."""
    from unclip import checkpoint

    recorded = checkpoint.read_config(folder).get("sampling") or {}
    return {**FALLBACK[stage], **recorded}


class UnCLIP:
    """Loads the models named by ``refs`` once; every method returns PIL images."""

    def __init__(self, refs: ModelRefs, device: str | None = None,
                 progress: Callable[[str], None] | None = None):
        from unclip.models.clip import load_clip

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.refs = refs
        self._say = progress or (lambda _msg: None)
        self._say(f"loading CLIP {refs.clip}")
        self.clip = load_clip(resolve(refs.clip))
        self.clip.model.to(self.device)
        # a stage left out (``None``: the registry's stage models load only what they need) is
        # refused by the method that needs it
        self.prior = self.decoder = None
        folders = {}
        for stage in ("prior", "decoder"):
            ref = getattr(refs, stage)
            if ref:
                self._say(f"loading {stage} {ref}")
                folders[stage] = resolve(ref)
                setattr(self, stage, load_stage(folders[stage], stage).to(self.device))
        from unclip.interop.karlo_models import KarloDecoder  # torch and diffusers only

        # imported (diffusers) models: own sampling loops, and raw rather than unit CLIP embeddings
        self.imported = isinstance(self.decoder, KarloDecoder)
        self.raw = bool(getattr(self.decoder if self.decoder is not None else self.prior,
                                "raw_embeddings", False))
        # "as trained": what each stage validated with, the defaults of every Settings field
        self.trained = {stage: trained_sampling(folders[stage], stage) if stage in folders
                        else dict(FALLBACK[stage]) for stage in ("prior", "decoder")}
        self.upsamplers = []
        for ref in (refs.upsampler1, refs.upsampler2):
            if ref and self.upsamplers and getattr(self.upsamplers[-1], "final", False):
                self._say(f"the upsampler before {ref} ends its cascade (an imported one): not loaded")
                break
            if ref:
                self._say(f"loading upsampler {ref}")
                self.upsamplers.append(load_stage(resolve(ref), "upsampler").to(self.device))
        self._pca = None

    # ---- building blocks ----------------------------------------------------------------------

    def _need(self, stage: str) -> None:
        if getattr(self, stage) is None:
            raise InputError(f"no {stage} model loaded (ModelRefs.{stage} is None)")

    @property
    def resolution(self) -> int:
        return int(self.decoder.resolution)

    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t (B, D) unit-norm (raw for imported models), token states (B, L, W), token mask
        (B, L)). Each distinct prompt is encoded once and repeated, as diffusers' pipelines do for
        ``num_images_per_prompt``: the same numbers whatever the batch (float sums depend on it)."""
        prompts = [check_prompt(p) for p in prompts]
        distinct = list(dict.fromkeys(prompts))
        index = torch.tensor([distinct.index(p) for p in prompts])
        encoded = self.clip.encode_text_tokens(distinct, normalize=not self.raw)
        z_t, states, mask = (torch.from_numpy(v)[index].to(self.device) for v in encoded)
        return z_t, states, mask

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings, unit-norm (raw for imported models that read them raw)."""
        return torch.from_numpy(self.clip.encode_images(list(images), normalize=not self.raw)).to(self.device)

    def _slerp(self, a: torch.Tensor, b: torch.Tensor, theta: float) -> torch.Tensor:
        return slerp_scaled(a, b, theta) if self.raw else slerp(a, b, theta)

    def resolve(self, s: Settings | None = None, inverted: bool = False) -> Settings:
        """``s`` with every ``None`` replaced by the value the models were trained with."""
        s = s or Settings()
        p, d = self.trained["prior"], self.trained["decoder"]
        pick = lambda given, default: default if given is None else given  # noqa: E731
        guidance = s.decoder_guidance
        if guidance is None:
            guidance = 1.0 if inverted else float(d["guidance_scale"])
        return replace(
            s, prior_guidance=float(pick(s.prior_guidance, p["guidance_scale"])),
            prior_steps=int(pick(s.prior_steps, p["steps"])),
            prior_candidates=int(pick(s.prior_candidates, p["num_candidates"])),
            prior_sampler=str(pick(s.prior_sampler, p["sampler"])),
            decoder_sampler=str(pick(s.decoder_sampler, d["sampler"])),
            decoder_steps=int(pick(s.decoder_steps, d["steps"])), decoder_guidance=float(guidance),
            decoder_eta=float(pick(s.decoder_eta, d.get("eta", 0.0))))

    def prior_sample(self, prompts: Sequence[str], s: Settings | None = None,
                     generator: Generators = None) -> torch.Tensor:
        from unclip.models.ar_prior import ARPrior

        self._need("prior")
        s = self.resolve(s)
        z_t, states, mask = self.encode_text(prompts)
        kwargs = dict(guidance_scale=s.prior_guidance, num_candidates=s.prior_candidates,
                      generator=generator)
        if not isinstance(self.prior, ARPrior):  # diffusion priors, ours or imported
            kwargs.update(steps=s.prior_steps, sampler=s.prior_sampler)
        else:  # the AR prior's own recorded options (temperature, similarity quantile)
            for key in ("temperature", "sim_quantile"):
                if key in self.trained["prior"]:
                    value = self.trained["prior"][key]
                    kwargs[key] = tuple(value) if key == "sim_quantile" else value
        return self.prior.sample(states, mask, z_t, **kwargs)

    @torch.no_grad()
    def decode(self, z_i: torch.Tensor, prompts: Sequence[str] | None, s: Settings,
               generator: Generators = None, x_T: torch.Tensor | None = None,
               inverted: bool = False) -> torch.Tensor:
        """Decoder samples (B, 3, R, R) in [-1, 1] for image embeddings (and captions); ``inverted``
        says ``x_T`` came from :meth:`invert`."""
        self._need("decoder")
        s = self.resolve(s, inverted)
        if self.imported:  # its own loop (the ``unclip`` sampler) or ours, on its conditioning
            text = None if prompts is None else self.encode_text(prompts)
            return self.decoder.decode(z_i, text, s.decoder_guidance, s.decoder_sampler, s.decoder_steps,
                                       generator=generator, x_T=x_T, eta=s.decoder_eta)
        if s.decoder_sampler == "unclip":
            raise InputError("the unclip sampler is diffusers' UnCLIPScheduler, for imported decoders "
                             "only (unclip import-diffusers); this decoder samples with ddim, dpm or ddpm")
        text = None
        if prompts is not None and self.decoder.cfg.use_caption:
            text = caption_condition(self.clip, [check_prompt(p) for p in prompts])
        return decode(self.decoder, z_i, text, s.decoder_guidance, s.decoder_sampler, s.decoder_steps,
                      generator=generator, x_T=x_T, eta=s.decoder_eta)

    @torch.no_grad()
    def invert(self, images: Sequence[Image.Image], z_i: torch.Tensor, s: Settings) -> torch.Tensor:
        """DDIM-inverted decoder noise x_T of images (unguided), conditioned on their own
        embeddings, for the steps that will decode it."""
        x = from_pil(images, self.resolution)
        if self.imported:
            return self.decoder.invert(x, z_i, self.resolve(s).decoder_steps)
        return invert(self.decoder, x, z_i, None, self.resolve(s).decoder_steps)

    @torch.no_grad()
    def upsample(self, base: torch.Tensor, s: Settings,
                 generator: Generators = None) -> list[torch.Tensor]:
        """The base images followed by each upsampler's output."""
        out = [base]
        for up in self.upsamplers:
            out.append(up.upsample(out[-1], steps=s.upsampler_steps, generator=generator))
        return out

    def _finish(self, base: torch.Tensor, s: Settings, generator) -> list[list[Image.Image]]:
        stages = self.upsample(base, s, generator) if s.upsample else [base]
        return [to_pil(x) for x in stages]

    # ---- what users call ----------------------------------------------------------------------

    def generate(self, prompt: str, num_images: int = 1, seed: int = 0,
                 settings: Settings | None = None) -> list[list[Image.Image]]:
        """Images for ``prompt``: a list per resolution (base first, final last)."""
        return self.generate_batch([(prompt, num_images, seed)], settings)[0]

    def generate_batch(self, jobs: Sequence[tuple[str, int, int]],
                       settings: Settings | None = None) -> list[list[list[Image.Image]]]:
        """Several ``(prompt, num_images, seed)`` requests as one cascade batch (what ``unclip
        serve`` runs for concurrent requests); per request, a list per resolution.

        Each request's rows draw only from its own seed's generator, so it gets the images it gets
        alone (up to the float rounding of a larger batch's matmuls)."""
        s = settings or Settings()
        prompts: list[str] = []
        rows: list[torch.Generator] = []
        for prompt, n, seed in jobs:
            g = torch.Generator().manual_seed(int(seed))
            prompts += [check_prompt(prompt)] * int(n)
            rows += [g] * int(n)
        z_i = self.prior_sample(prompts, s, rows)
        stages = self._finish(self.decode(z_i, prompts, s, rows), s, rows)
        out, start = [], 0
        for _prompt, n, _seed in jobs:
            out.append([images[start:start + int(n)] for images in stages])
            start += int(n)
        return out

    def vary(self, image: Image.Image, num_images: int = 4, seed: int = 0,
             settings: Settings | None = None, noise: str = "inverted") -> list[list[Image.Image]]:
        """Variations as in the paper (Sec. 3.1): the image's own bipartite latent (z_i, x_T), x_T
        from DDIM inversion, decoded by DDIM with ``eta`` > 0 (``decoder_eta``, default
        :data:`VARY_ETA`), so that variations stay centred on the input: at eta 0 it comes back.
        ``noise="fresh"`` draws a new x_T per variation instead (the image's z_i alone)."""
        if noise not in ("inverted", "fresh"):
            raise InputError(f"noise must be 'inverted' or 'fresh', got {noise!r}")
        g = torch.Generator().manual_seed(seed)
        z_i = self.encode_images([image])
        if noise == "fresh":
            s = settings or Settings()
            return self._finish(self.decode(z_i.repeat(num_images, 1), None, s, g), s, g)
        s = replace(settings or Settings(), decoder_sampler="ddim")  # inversion's map is DDIM's
        if s.decoder_eta is None:
            s = replace(s, decoder_eta=VARY_ETA)
        if s.decoder_eta < 0:
            raise InputError(f"--eta must be >= 0, got {s.decoder_eta}")
        x_T = self.invert([image], z_i, s).repeat(num_images, 1, 1, 1)
        return self._finish(self.decode(z_i.repeat(num_images, 1), None, s, g, x_T=x_T, inverted=True),
                            s, g)

    def interpolate(self, image_a: Image.Image, image_b: Image.Image, frames: int = 5, seed: int = 0,
                    noise: str = "fixed", settings: Settings | None = None) -> list[list[Image.Image]]:
        """Frames along slerp(z_a, z_b); decoder noise fixed, or slerped between both inversions."""
        if frames < 2:
            raise InputError("--frames must be at least 2")
        if noise not in ("fixed", "interpolated"):
            raise InputError(f"noise must be 'fixed' or 'interpolated', got {noise!r}")
        s = settings or Settings(decoder_sampler="ddim")
        if noise == "interpolated":  # inverted noise only means something to the DDIM map
            s = replace(s, decoder_sampler="ddim")
        g = torch.Generator().manual_seed(seed)
        z = self.encode_images([image_a, image_b])
        thetas = np.linspace(0, 1, frames)
        zs = torch.cat([self._slerp(z[:1], z[1:], float(th)) for th in thetas])
        shape = (1, 3, self.resolution, self.resolution)
        if noise == "fixed":
            x_T = torch.randn(shape, generator=g).repeat(frames, 1, 1, 1)
        else:
            inv = self.invert([image_a, image_b], z, s).cpu().flatten(1)
            norms = inv.norm(dim=1)
            x_T = torch.cat([slerp(inv[:1], inv[1:], float(th)) * (norms[0] * (1 - th) + norms[1] * th)
                             for th in thetas]).view(frames, *shape[1:])
        return self._finish(self.decode(zs, None, s, g, x_T=x_T, inverted=noise == "interpolated"), s, g)

    def edit(self, image: Image.Image, source: str, target: str, frames: int = 5,
             max_theta: float = 0.5, settings: Settings | None = None,
             seed: int = 0) -> list[list[Image.Image]]:
        """Text diff: z = slerp(z_i, normalize(z_t(target) - z_t(source)), theta), decoded by DDIM
        from the image's inverted noise, theta from 0 to ``max_theta`` (the paper uses <= 0.5)."""
        # inversion and decoding must be the same deterministic map (the caller's settings stay)
        s = replace(settings or Settings(), decoder_sampler="ddim")
        z_src, _, _ = self.encode_text([source])
        z_tgt, _, _ = self.encode_text([target])
        if self.raw:  # the paper's difference is between unit embeddings
            z_src, z_tgt = F.normalize(z_src, dim=-1), F.normalize(z_tgt, dim=-1)
        z_d = F.normalize(z_tgt - z_src, dim=-1)
        if not torch.isfinite(z_d).all() or (z_tgt - z_src).norm() < 1e-6:
            raise InputError("--from and --to give the same CLIP embedding: nothing to edit")
        z_i = self.encode_images([image])
        x_T = self.invert([image], z_i, s).repeat(frames, 1, 1, 1)
        if self.raw:  # raw embeddings: the direction moves, the image's own norm stays
            z_d = z_d * z_i.norm(dim=-1, keepdim=True)
        zs = torch.cat([self._slerp(z_i, z_d, float(th)) for th in np.linspace(0, max_theta, frames)])
        g = torch.Generator().manual_seed(seed)
        return self._finish(self.decode(zs, None, s, g, x_T=x_T, inverted=True), s, g)

    def pca_reconstruct(self, image: Image.Image, dims: Sequence[int], seed: int = 0,
                        settings: Settings | None = None) -> list[list[Image.Image]]:
        """Decodings of z_i kept to its first k principal components, for each k (fixed noise)."""
        from unclip.embeddings.pca import PCA

        if self.refs.pca is None:
            raise InputError("no PCA model given (it comes from the pca stage: models:/unclip-pca@...)")
        if self._pca is None:
            self._pca = PCA.load(resolve(self.refs.pca))
        pca = self._pca
        bad = [k for k in dims if not 1 <= k <= pca.n_components]
        if bad:
            raise InputError(f"--dims {bad}: each must be between 1 and {pca.n_components}")
        s = settings or Settings(decoder_sampler="ddim")
        z = to_numpy(self.encode_images([image]), np.float64)
        zs = []
        for k in dims:
            zs.append(pca.inverse_transform(pca.transform(z, n=k)))
        zk = F.normalize(torch.from_numpy(np.concatenate(zs)).float(), dim=-1).to(self.device)
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn((1, 3, self.resolution, self.resolution), generator=g).repeat(len(dims), 1, 1, 1)
        return self._finish(self.decode(zk, None, s, g, x_T=x_T), s, g)
