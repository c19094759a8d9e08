"""A second CLIP backend: transformers' CLIP (the one diffusers' unCLIP pipelines ship).

Karlo's CLIP is transformers' ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``
with a ``CLIPTokenizer`` and a ``CLIPImageProcessor``. It is *served as it is* behind the
:class:`unclip.models.clip.ClipEncoder` interface, not converted to open_clip, because what the
imported prior and decoder were trained on is transformers' exact pipeline, and a conversion would
reproduce the weights but not that pipeline:

* the tokenizer: ``CLIPTokenizer`` pads with its pad token and returns the attention mask the prior
  and the decoder read; open_clip's ``SimpleTokenizer`` pads with zeros (our mask is "up to the
  end-of-text token") and knows only its built-in 49408-token vocabulary, so another vocabulary
  (any tokenizer folder, the tests' tiny one) cannot be expressed at all;
* pooling: transformers pools at the ``eos_token_id`` position (argmax of the ids for old
  configs), open_clip at the argmax of the ids: they differ whenever end-of-text is not the
  largest id;
* image preprocessing: ``CLIPImageProcessor`` (shortest-side resize, centre crop, its own
  resampling) is what variations were encoded with; open_clip's transforms resize differently;
* the attention kernels and layouts differ (fused ``in_proj`` in open_clip), so even exact weights
  give embeddings a little off, and the parity test against diffusers asks for float tolerance.

The cost is the ``transformers`` dependency, confined here: it is imported only when an imported
CLIP is loaded (the ``diffusers`` extra). The backend is for inference (the cascade, embeddings):
our decoder's training reads open_clip's internals (``caption_condition``) and does not take it.

A checkpoint of this backend is an unclip checkpoint folder (``kind: clip``, ``config.backend:
transformers``): ``model.safetensors`` with both towers, the transformers configs in
``config.json``, and the tokenizer and image processor as their own JSON/text files under
``tokenizer/`` and ``image_processor/``. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip import checkpoint, storage
from unclip.devices import model_device, to_numpy

BACKEND = "transformers"
TOKENIZER_DIR = "tokenizer"
PROCESSOR_DIR = "image_processor"
# what the folders of a tokenizer or an image processor may hold (JSON and text: never a pickle)
TEXT_FILES = (".json", ".txt")


class HFClipEncoder:
    """transformers' CLIP text tower (and, for variations, image tower) as a ClipEncoder."""

    backend = BACKEND

    def __init__(self, text_model: torch.nn.Module, tokenizer: Any,
                 vision_model: torch.nn.Module | None = None, processor: Any | None = None,
                 identity: dict[str, Any] | None = None):
        if (vision_model is None) != (processor is None):
            raise ValueError("an image encoder needs its image processor (and the other way round)")
        towers = {"text": text_model}
        if vision_model is not None:
            towers["vision"] = vision_model
        self.model = torch.nn.ModuleDict(towers).eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.context_length = int(tokenizer.model_max_length)
        self.image_size = self._image_size()
        self.identity = {**(identity or {}), "backend": BACKEND, "dim": self.dim,
                         "image_size": self.image_size, "context_length": self.context_length}

    def _image_size(self) -> int | None:
        if self.processor is None:
            return None
        crop = getattr(self.processor, "crop_size", None)
        if isinstance(crop, dict) and "height" in crop:
            return int(crop["height"])
        return int(self.model["vision"].config.image_size)

    @property
    def text_model(self) -> torch.nn.Module:
        return self.model["text"]

    @property
    def has_images(self) -> bool:
        return "vision" in self.model

    @property
    def dim(self) -> int:
        return int(self.text_model.config.projection_dim)

    @property
    def text_width(self) -> int:
        return int(self.text_model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def to(self, device: torch.device | str) -> "HFClipEncoder":
        self.model.to(device)
        return self

    # ---- encoding -------------------------------------------------------------------------

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask), padded to the context length as diffusers' pipelines do."""
        out = self.tokenizer(list(captions), padding="max_length", max_length=self.context_length,
                             truncation=True, return_tensors="pt")
        return out.input_ids, out.attention_mask.bool()

    @torch.no_grad()
    def text_outputs(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw projected embedding [B, D], final token states [B, L, W], mask [B, L]) on the
        model's device: what ``UnCLIPPipeline`` feeds its prior and decoder."""
        ids, mask = self.tokenize(captions)
        out = self.text_model(ids.to(self.device))
        return out.text_embeds.float(), out.last_hidden_state.float(), mask.to(self.device)

    def encode_text_tokens(self, captions: Sequence[str], normalize: bool = True
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pooled embedding, L2-normalised unless ``normalize`` is False, token states, mask)."""
        z, states, mask = self.text_outputs(captions)
        return to_numpy(F.normalize(z, dim=-1) if normalize else z), to_numpy(states), to_numpy(mask)

    def encode_text(self, captions: Sequence[str], normalize: bool = True) -> np.ndarray:
        return self.encode_text_tokens(captions, normalize)[0]

    def image_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        self._need_images()
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor,
                      normalize: bool = True) -> np.ndarray:
        """Image embeddings (L2-normalised unless ``normalize`` is False) of PIL images, or of
        pixel values the image processor already made."""
        self._need_images()
        x = images if isinstance(images, torch.Tensor) else self.image_tensor(images)
        vision = self.model["vision"]
        z = vision(x.to(self.device, next(vision.parameters()).dtype)).image_embeds.float()
        return to_numpy(F.normalize(z, dim=-1) if normalize else z)

    def _need_images(self) -> None:
        if not self.has_images:
            from unclip.generation.images import InputError

            raise InputError("this imported CLIP has no image encoder (import the pipeline with "
                             "--image-encoder, e.g. an UnCLIPImageVariationPipeline folder)")

    @torch.no_grad()
    def null_caption(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The empty caption's (raw embedding [D], token states [L, W], mask [L]): the
        unconditional branch of the imported prior's and decoder's guidance."""
        z, states, mask = self.text_outputs([""])
        return z[0].cpu(), states[0].cpu(), mask[0].cpu()

    # ---- files ----------------------------------------------------------------------------

    def save_reference(self, folder: str) -> None:
        """A reference folder naming this CLIP (the clip stage's output when ``clip.source`` is an
        imported CLIP): later stages load it from there, digest-checked."""
        from unclip.models.clip import save_reference

        save_reference(folder, self.identity)

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        """An unclip checkpoint folder (see the module docstring); the config is written last."""
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
            if self.processor is not None:
                self.processor.save_pretrained(os.path.join(tmp, PROCESSOR_DIR))
            for sub in (TOKENIZER_DIR, PROCESSOR_DIR):
                local = os.path.join(tmp, sub)
                for name in sorted(os.listdir(local)) if os.path.isdir(local) else []:
                    if name.endswith(TEXT_FILES):
                        with open(os.path.join(local, name), "rb") as f:
                            storage.write_bytes(storage.join(folder, sub, name), f.read())
        config = {"backend": BACKEND, "text": self.text_model.config.to_dict(),
                  "vision": self.model["vision"].config.to_dict() if self.has_images else None}
        checkpoint.save(folder, self.model.state_dict(), "clip", config, extra)


@contextlib.contextmanager
def _local_dir(folder: str, sub: str) -> Iterator[str]:
    """A local directory with ``folder/sub``'s JSON and text files (a temporary copy if remote)."""
    uri = storage.join(folder, sub)
    if not storage.is_remote(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory() as tmp:
        for src in storage.list_files(uri, TEXT_FILES):
            with open(os.path.join(tmp, storage.basename(src)), "wb") as f:
                f.write(storage.read_bytes(src))
        yield tmp


def load_hf_clip(folder: str) -> HFClipEncoder:
    """The CLIP an imported checkpoint folder holds (weights-only: safetensors and JSON)."""
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection,
                              CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection)

    state, meta = checkpoint.load(folder, "clip")
    cfg = meta["config"]
    if cfg.get("backend") != BACKEND:
        raise checkpoint.CheckpointError(f"{folder}: not a {BACKEND} CLIP")
    text = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(cfg["text"]))
    vision = processor = None
    if cfg.get("vision"):
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(cfg["vision"]))
        with _local_dir(folder, PROCESSOR_DIR) as path:
            processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    with _local_dir(folder, TOKENIZER_DIR) as path:
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    towers = torch.nn.ModuleDict({"text": text, **({"vision": vision} if vision is not None else {})})
    checkpoint.load_into(towers, state, folder, "imported CLIP")
    digest = "sha256:" + hashlib.sha256(
        storage.read_bytes(storage.join(folder, checkpoint.WEIGHTS))).hexdigest()[:32]
    identity = {"arch": f"{BACKEND}:CLIP", "source": folder, "kind": "checkpoint", "digest": digest,
                **({"imported_from": meta["imported_from"]} if meta.get("imported_from") else {})}
    return HFClipEncoder(text, tokenizer, vision, processor, identity)


class TrainableHFClip(torch.nn.Module):
    """An imported (transformers) CLIP as the clip stage trains it: both towers and a learned
    temperature, with open_clip's training interface (``forward(images, tokens)`` -> unit image
    features, unit text features, ``logit_scale.exp()``; ``encode_image`` / ``encode_text``;
    ``context_length``), so the stage's contrastive loss and held-out retrieval serve it unchanged.
    ``tokenize`` returns ids and attention mask stacked as one (B, 2, L) tensor, the one argument
    that interface passes. The temperature is not part of the imported checkpoint: it starts at
    CLIP's 1/0.07 and is dropped when the towers are saved back (:meth:`encoder`)."""

    def __init__(self, source: HFClipEncoder):
        super().__init__()
        if not source.has_images:
            raise ValueError("fine-tuning an imported CLIP needs its image tower (import it with "
                             "--image-encoder)")
        self.text = source.model["text"]
        self.vision = source.model["vision"]
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.context_length = source.context_length
        self.image_size = source.image_size
        self._source = source  # tokenizer, processor, identity (not modules)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        t = self._source.tokenizer(list(captions), padding="max_length", truncation=True,
                                   max_length=self.context_length, return_tensors="pt")
        return torch.stack([t.input_ids, t.attention_mask], dim=1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixels).image_embeds

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).text_embeds

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return (F.normalize(self.encode_image(images), dim=-1),
                F.normalize(self.encode_text(tokens), dim=-1), self.logit_scale.exp())

    def encoder(self, identity: dict[str, Any] | None = None) -> HFClipEncoder:
        """The towers (as trained) as an encoder that saves in the imported layout."""
        src = self._source
        return HFClipEncoder(self.text, src.tokenizer, self.vision, src.processor,
                             identity or src.identity)
