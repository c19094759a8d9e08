"""Held-out evaluation of a decoder during training: decode the true z_i of fixed held-out images
(in bounded chunks, each from its own seeded noise), score the decodes (CLIP cosine to the z_i decoded;
the shapes detector where a ground-truth scene exists), measure how much each condition moves the
model, and publish a grid of true | decoded images."""

from __future__ import annotations

import io
import time
from typing import Any, Callable

import numpy as np
import torch

from unclip.eval.decoding import clip_cosines, conditioning_effects, detector_scores, scenes_of
from unclip.models.decoder import Decoder
from unclip.models.decoder_sampling import TextCondition, caption_condition


class DecoderEvaluator:
    """Decodes the fixed held-out embeddings with the (EMA) model, scores them, publishes grids."""

    def __init__(self, holdout: dict[str, Any], clip: Any, sampling: dict[str, Any],
                 eval_cfg: dict[str, Any], use_caption: bool,
                 publish: Callable[[str, bytes], None] | None = None):
        """``holdout``: images (N, H, W, 3) uint8, embeddings (N, D), captions, metas (scenes or
        None); ``sampling``: sampler, steps, guidance_scale; ``eval_cfg``: seed, batch_size,
        grid_images, detector_size; ``publish(name, png)`` stores a grid (None: grids are dropped)."""
        self.clip, self.sampling, self.eval_cfg, self.publish = clip, sampling, eval_cfg, publish
        h = holdout
        self.images, self.captions = h["images"], list(h["captions"])
        self.embeddings = np.asarray(h["embeddings"], np.float32)
        self.scenes = scenes_of(h["metas"])
        self.seconds = 0.0
        # the held-out captions never change: their token states are computed once, not per eval
        self.text = caption_condition(clip, self.captions) if use_caption else None

    def text_for(self, n: int) -> TextCondition | None:
        """Token states of the first ``n`` held-out captions (None without caption conditioning)."""
        return None if self.text is None else TextCondition(self.text.states[:n], self.text.mask[:n])

    def decode(self, model: Decoder, n: int) -> np.ndarray:
        """The first ``n`` held-out embeddings decoded ``eval.batch_size`` at a time (memory bounded
        by the chunk, not by ``num_images``); chunk i starts from noise seeded ``seed + i``."""
        from unclip.models.decoder_sampling import decode, to_uint8

        s, e = self.sampling, self.eval_cfg
        chunk = int(e.get("batch_size") or n) or 1
        if chunk < 1:
            raise ValueError(f"decoder.eval.batch_size must be at least 1, got {chunk}")
        out = []
        for i in range(0, n, chunk):
            j = min(n, i + chunk)
            text = None if self.text is None else TextCondition(self.text.states[i:j],
                                                                self.text.mask[i:j])
            gen = torch.Generator().manual_seed(int(e["seed"]) + i)
            x = decode(model, torch.from_numpy(self.embeddings[i:j]), text,
                       float(s["guidance_scale"]), str(s["sampler"]), int(s["steps"]), gen)
            out.append(to_uint8(x))
        return np.concatenate(out) if out else np.zeros((0, *self.images.shape[1:]), np.uint8)

    def scores(self, decoded: np.ndarray, prefix: str = "") -> dict[str, float]:
        n = len(decoded)
        out = clip_cosines(self.clip, decoded, self.embeddings[:n])
        if self.scenes is not None and n >= 2:
            out.update(detector_scores(decoded, self.scenes[:n], int(self.eval_cfg["detector_size"])))
        return {prefix + k: v for k, v in out.items()}

    def grid(self, decoded: np.ndarray, step: int) -> None:
        """True images over their decodes, 8 per row pair; saved to the stage folder and MLflow."""
        from unclip.models.decoder_sampling import image_grid

        n = min(len(decoded), int(self.eval_cfg["grid_images"]))
        cells = []
        for i in range(0, n, 8):
            cells += list(self.images[i:min(i + 8, n)]) + [np.full_like(self.images[0], 255)] * (8 - min(8, n - i))
            cells += list(decoded[i:min(i + 8, n)]) + [np.full_like(decoded[0], 255)] * (8 - min(8, n - i))
        side = decoded.shape[1]
        img = image_grid(cells, 8, scale=max(1, 64 // side))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        if self.publish is not None:
            self.publish(f"step_{step:06d}.png", buf.getvalue())

    def effects(self, model: Decoder, n: int) -> dict[str, float]:
        """``val_clip_effect`` / ``val_caption_effect``: does the decoder use each condition yet."""
        out = conditioning_effects(model, self.images[:n], self.embeddings[:n], self.text_for(n),
                                   seed=int(self.eval_cfg["seed"]))
        return {"val_" + k: v for k, v in out.items()}

    def __call__(self, model: Decoder, step: int, final: bool) -> dict[str, float]:
        t0 = time.monotonic()
        n_grid = min(int(self.eval_cfg["grid_images"]), len(self.captions))
        decoded = self.decode(model, len(self.captions) if final else n_grid)
        self.grid(decoded[:n_grid], step)
        out = self.scores(decoded, "" if final else "grid_")
        out.update({k if final else "grid_" + k: v for k, v in self.effects(model, n_grid).items()})
        self.seconds += time.monotonic() - t0
        return out


class ImportedDecoderEvaluator(DecoderEvaluator):
    """The same evaluation of an imported (Karlo) decoder: it reads raw CLIP image embeddings
    (``holdout["embeddings"]`` must be raw) and the caption as (raw text embedding, token states,
    mask) from the CLIP text tower, and samples with its own ``decode``."""

    def __init__(self, holdout: dict[str, Any], clip: Any, sampling: dict[str, Any],
                 eval_cfg: dict[str, Any], publish: Callable[[str, bytes], None] | None = None):
        super().__init__(holdout, clip, sampling, eval_cfg, use_caption=False, publish=publish)
        emb, states, mask = clip.encode_text_tokens(self.captions, normalize=False)
        self.text = tuple(torch.as_tensor(np.asarray(v)) for v in (emb, states, mask))

    def _rows(self, i: int, j: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return torch.from_numpy(np.array(self.embeddings[i:j])), tuple(v[i:j] for v in self.text)

    def decode(self, model: Any, n: int) -> np.ndarray:
        from unclip.models.decoder_sampling import to_uint8

        s, e = self.sampling, self.eval_cfg
        chunk = max(1, int(e.get("batch_size") or n))
        out = []
        was_training = model.training
        model.eval()
        try:
            for i in range(0, n, chunk):
                z, text = self._rows(i, min(n, i + chunk))
                gen = torch.Generator().manual_seed(int(e["seed"]) + i)
                out.append(to_uint8(model.decode(z, text, float(s["guidance_scale"]), str(s["sampler"]),
                                                 int(s["steps"]), gen)))
        finally:
            model.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, *self.images.shape[1:]), np.uint8)

    def effects(self, model: Any, n: int) -> dict[str, float]:
        z, text = self._rows(0, n)
        out = conditioning_effects(model, self.images[:n], self.embeddings[:n], text,
                                   seed=int(self.eval_cfg["seed"]),
                                   forward=lambda x, t, dc, dt: model(x, t, z, text, dc, dt))
        return {"val_" + k: v for k, v in out.items()}

    def __call__(self, model: Any, step: int, final: bool) -> dict[str, float]:
        out = super().__call__(model, step, final)
        if final:
            t0 = time.monotonic()
            out["val_loss"] = self.heldout_loss(model)
            self.seconds += time.monotonic() - t0
        return out

    def heldout_loss(self, model: Any, n: int | None = None) -> float:
        """Mean training loss (the hybrid one) on the held-out images, at timesteps and noise
        seeded by ``eval.seed``: the same draws for every model scored, so a source and its
        fine-tuned result compare directly."""
        from unclip.models.decoder_sampling import from_uint8

        n = len(self.captions) if n is None else n
        e = self.eval_cfg
        chunk = max(1, int(e.get("batch_size") or n))
        total, was_training = 0.0, model.training
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, n, chunk):
                    j = min(n, i + chunk)
                    z, text = self._rows(i, j)
                    gen = torch.Generator().manual_seed(int(e["seed"]) + i)
                    losses = model.training_losses(from_uint8(self.images[i:j]), z, text, generator=gen)
                    total += float(losses["loss"].sum())
        finally:
            model.train(was_training)
        return total / max(1, n)
