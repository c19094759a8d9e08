"""Scores of images decoded from held-out CLIP embeddings, each beside the baseline it must beat.

* Detector scores (colour, shape, object, position, binding) against each image's true scene, and
  the same images against another image's scene (the held-out list rotated by one): what a decoder
  that ignores its embedding would get.
* CLIP cosine between the decoded images' embeddings and the true embeddings they were decoded from,
  and against the other images' embeddings (mismatched pairs).
* How much each condition (z_i, the caption) moves the decoder's predictions: whether it uses them.
* The reference from above: the training image whose embedding is nearest each held-out z_i. Its
  detector scores say how much of colour, shape and position the embedding itself pins down.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from unclip.data.shapes import Scene
from unclip.eval.detector import accuracy


def scene_of(meta: str | dict | None) -> Scene | None:
    """The ground-truth scene in a sample's JSON (the synthetic data set's ``scene``), else None."""
    if not meta:
        return None
    d = json.loads(meta) if isinstance(meta, str) else meta
    scene = d.get("scene") if isinstance(d, dict) else None
    try:
        return Scene.from_json(scene) if scene else None
    except (KeyError, TypeError):
        return None


def scenes_of(metas: Sequence[str | dict | None]) -> list[Scene] | None:
    """Every sample's ground-truth scene, or None when any lacks one: detector scores and their
    references need all of them (a mixed set would score a different subset each time)."""
    scenes = [scene_of(m) for m in metas]
    return scenes if all(s is not None for s in scenes) else None


def upscale(images: np.ndarray, size: int) -> list[np.ndarray]:
    """(B, H, W, 3) uint8 -> bicubic resized to ``size``: the detector needs >= 32 px, and reads
    small decodes more reliably at 64 (measured on 32 px renders: 0.995 -> 1.0 binding)."""
    if images.shape[1] == size:
        return list(images)
    return [np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in images]


def detector_scores(images: np.ndarray, scenes: Sequence[Scene], size: int = 64) -> dict[str, float]:
    """``val_<score>`` of images against their scenes, and ``chance_<score>`` against rotated ones."""
    if len(scenes) < 2:
        raise ValueError(f"need at least 2 scenes to score against a baseline, got {len(scenes)}")
    ims = upscale(images, size)
    true = accuracy(list(scenes), ims)
    rotated = accuracy(list(scenes[1:]) + [scenes[0]], ims)
    out = {f"val_{k}": v for k, v in true.items()}
    out.update({f"chance_{k}": v for k, v in rotated.items()})
    return out


def clip_cosines(clip: Any, images: np.ndarray, embeddings: np.ndarray) -> dict[str, float]:
    """Mean cosine of CLIP(decoded image) with its own embedding, and with the others'."""
    z = clip.encode_images([Image.fromarray(a) for a in images])
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = z @ e.T
    n = len(z)
    off = (sims.sum() - np.trace(sims)) / max(1, n * (n - 1))
    return {"val_clip_cosine": float(np.trace(sims) / n), "val_clip_cosine_mismatched": float(off)}


def nearest_by_embedding(queries: np.ndarray,
                         batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """For each query embedding (Q, D), the image whose embedding is most cosine-similar, streamed
    over ``(embeddings (B, D), images (B, H, W, 3))`` batches so the pool never sits in memory."""
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    q = unit(np.asarray(queries, np.float32))
    best = np.full(len(q), -np.inf, np.float32)
    found: np.ndarray | None = None
    for emb, images in batches:
        e = np.asarray(emb, np.float32)
        if e.ndim != 2 or e.shape[1] != q.shape[1] or len(e) != len(images):
            raise ValueError(f"pool batch of embeddings {e.shape} and {len(images)} images does "
                             f"not match queries of width {q.shape[1]}")
        if not len(e):
            continue
        sims = q @ unit(e).T
        idx = sims.argmax(1)
        top = np.take_along_axis(sims, idx[:, None], 1)[:, 0]
        better = top > best
        images = np.asarray(images)
        if found is None:
            found = np.zeros((len(q), *images.shape[1:]), images.dtype)
        found[better] = images[idx[better]]
        best[better] = top[better]
    if found is None:
        raise ValueError("nearest_by_embedding: the pool is empty")
    return found


def conditioning_effects(decoder: Any, images: np.ndarray, embeddings: np.ndarray,
                         text: Any = None, fractions: Sequence[float] = (0.9, 0.7, 0.5),
                         seed: int = 0, forward: Any = None) -> dict[str, float]:
    """How much the decoder's x0 prediction for noised held-out images moves when z_i or the
    caption is dropped (RMS over pixels, in [-1, 1] units), at high and mid noise where layout and
    shape are decided; and its x0 error with everything given. A condition whose effect stays
    near 0 while training goes on is one the decoder ignores: the detector can then only score
    what the other condition carries. ``forward(x_t, t, drop_clip, drop_caption)``: how to call a
    decoder whose conditioning is not ours (an imported one); by default
    ``decoder(x_t, t, z, states, mask, drop_clip, drop_caption)``.
    """
    import torch

    from unclip.diffusion import GaussianDiffusion
    from unclip.models.decoder_sampling import from_uint8

    device = next(decoder.parameters()).device
    gd = GaussianDiffusion(decoder.diffusion)
    x0 = from_uint8(images).to(device)
    if forward is None:
        z = torch.as_tensor(np.asarray(embeddings, np.float32), device=device)
        states = None if text is None else text.states.to(device)
        mask = None if text is None else text.mask.to(device)

        def forward(x_t, t, drop_clip, drop_caption):
            return decoder(x_t, t, z, states, mask, drop_clip, drop_caption)
    b = x0.shape[0]
    yes, no = torch.ones(b, dtype=torch.bool, device=device), torch.zeros(b, dtype=torch.bool, device=device)
    gen = torch.Generator().manual_seed(seed)
    sq = {"clip": 0.0, "caption": 0.0, "mse": 0.0}
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            for f in fractions:
                t = torch.full((b,), min(gd.num_timesteps - 1, int(f * gd.num_timesteps)), device=device)
                x_t = gd.q_sample(x0, t, torch.randn(x0.shape, generator=gen).to(device))

                def x0_hat(drop_clip: torch.Tensor, drop_caption: torch.Tensor) -> torch.Tensor:
                    out = forward(x_t, t, drop_clip, drop_caption)
                    return gd.predict_x0(gd.split(out, 3)[0], x_t, t).clamp(-1, 1)

                full = x0_hat(no, no)
                sq["mse"] += float((full - x0).pow(2).mean())
                sq["clip"] += float((full - x0_hat(yes, no)).pow(2).mean())
                if text is not None:
                    sq["caption"] += float((full - x0_hat(no, yes)).pow(2).mean())
    finally:
        decoder.train(was_training)
    n = len(fractions)
    out = {"clip_effect": (sq["clip"] / n) ** 0.5, "x0_mse": sq["mse"] / n}
    out["caption_effect"] = (sq["caption"] / n) ** 0.5 if text is not None else float("nan")
    return out
