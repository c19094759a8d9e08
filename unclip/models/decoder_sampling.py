"""Decoding CLIP image embeddings into images with a trained :class:`~unclip.models.decoder.Decoder`.

This is the API the generation commands (generate, vary, interpolate, edit) build on: tensors in,
images in [-1, 1] (B, 3, H, W) out. Classifier-free guidance runs the conditional and the
unconditional (CLIP embedding and caption both null) halves in one batched forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from unclip.diffusion import SAMPLERS, ddim_invert, guide, sample
from unclip.diffusion.noise import Generators
from unclip.devices import model_device, to_device, to_host, to_numpy
from unclip.models.decoder import Decoder
from unclip.options import option, validate


@dataclass(frozen=True)
class DecoderSampling:
    """How the decoder is sampled unless told otherwise: 50 DDIM steps at guidance 3."""

    sampler: str = option("ddim", choices=SAMPLERS)  # ddim | dpm (DPM-Solver++) | ddpm
    steps: int = option(50, ge=1)
    # classifier-free guidance on both the CLIP embedding and the caption (1.0 = off)
    guidance_scale: float = option(3.0, ge=0)

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class TextCondition:
    """The caption as the decoder reads it: CLIP text-tower token states and their mask."""

    states: torch.Tensor   # (B, L, text_width) float
    mask: torch.Tensor     # (B, L) bool, True where a token carries the caption

    def __post_init__(self) -> None:
        if self.states.ndim != 3 or self.mask.shape != self.states.shape[:2]:
            raise ValueError(f"text states (B, L, W) and mask (B, L) expected, got "
                             f"{tuple(self.states.shape)} and {tuple(self.mask.shape)}")

    def to(self, device: torch.device | str) -> "TextCondition":
        return TextCondition(self.states.to(device), self.mask.to(device))


@torch.no_grad()
def caption_condition(clip, captions: Sequence[str]) -> TextCondition:
    """Token states of ``captions`` from the frozen CLIP text tower (a ClipEncoder)."""
    from unclip.models.clip import text_tokens

    model = clip.model
    _, states, mask = text_tokens(model, to_device(clip.tokenize(captions), model_device(model)))
    return TextCondition(states, mask)


def make_denoiser(decoder: Decoder, image_embeddings: torch.Tensor,
                  text: TextCondition | None = None,
                  guidance_scale: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x_t, t) -> output`` for :func:`unclip.diffusion.sample`, guidance applied.

    Scale 1 is the conditional model alone (one forward); any other scale s gives
    ``uncond + s (cond - uncond)`` on the mean, the variance taken from the conditional half.
    """
    b = image_embeddings.shape[0]
    if text is not None and text.states.shape[0] != b:
        raise ValueError(f"{b} image embeddings but {text.states.shape[0]} captions")
    states = None if text is None else text.states
    mask = None if text is None else text.mask
    if guidance_scale == 1.0:
        return lambda x, t: decoder(x, t, image_embeddings, states, mask)
    pair = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
    z2, s2, m2 = pair(image_embeddings), pair(states), pair(mask)
    dropped = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)])
    dropped = dropped.to(image_embeddings.device)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = decoder(torch.cat([x, x]), torch.cat([t, t]), z2, s2, m2, dropped, dropped)
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, guidance_scale, channels=x.shape[1])

    return denoise


@torch.no_grad()
def decode(decoder: Decoder, image_embeddings: torch.Tensor, text: TextCondition | None = None,
           guidance_scale: float = DecoderSampling.guidance_scale,
           sampler: str = DecoderSampling.sampler, steps: int = DecoderSampling.steps,
           generator: Generators = None, x_T: torch.Tensor | None = None,
           eta: float = 0.0, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for CLIP image embeddings (B, D) [and their captions].

    ``sampler`` is ddpm, ddim or dpm (DPM-Solver++) with ``steps`` steps; ``x_T`` fixes the
    starting noise (variations keep z_i and vary x_T; DDIM with ``eta`` > 0 adds noise per step).
    """
    if image_embeddings.ndim != 2:
        raise ValueError(f"image_embeddings must be (B, D), got {tuple(image_embeddings.shape)}")
    device = model_device(decoder)
    side = decoder.cfg.resolution
    z = image_embeddings.to(device=device, dtype=torch.float32)
    text = None if text is None else text.to(device)
    was_training = decoder.training
    decoder.eval()
    try:
        x = sample(make_denoiser(decoder, z, text, guidance_scale), (z.shape[0], 3, side, side),
                   decoder.diffusion, sampler=sampler, steps=steps, generator=generator, x_T=x_T,
                   device=device, eta=eta, progress=progress)
    finally:
        decoder.train(was_training)
    return x.clamp(-1, 1)


@torch.no_grad()
def invert(decoder: Decoder, images: torch.Tensor, image_embeddings: torch.Tensor,
           text: TextCondition | None = None, steps: int = 50) -> torch.Tensor:
    """The x_T from which DDIM (eta 0, no guidance) decodes ``images`` (B, 3, H, W in [-1, 1])
    back: the second half of the paper's bipartite latent (z_i, x_T), for text diffs.

    Unguided on purpose: a guided step does not run backwards well (measured in docs/results.md,
    Generation)."""
    device = model_device(decoder)
    denoise = make_denoiser(decoder, image_embeddings.to(device).float(),
                            None if text is None else text.to(device), 1.0)
    return ddim_invert(denoise, images.to(device).float(), decoder.diffusion, steps)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((to_host(images).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return to_numpy(x.permute(0, 2, 3, 1))


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], the decoder's data space."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def image_grid(images: Sequence[Image.Image] | np.ndarray, cols: int, scale: int = 1) -> Image.Image:
    """Tile images row-major into one picture (each enlarged ``scale`` x, nearest neighbour)."""
    arrs = [np.asarray(im) for im in images]
    if not arrs:
        raise ValueError("no images to tile")
    h, w = arrs[0].shape[:2]
    rows = (len(arrs) + cols - 1) // cols
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, a in enumerate(arrs):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = a
    out = Image.fromarray(grid)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out
