"""CLIP through open_clip: build, load from any source, encode images and captions.

Sources, in the order a user reaches for them:
  * an architecture name plus a pretrained tag (``ViT-H-14`` + ``laion2b_s32b_b79k``), on a machine
    that reaches the model hub;
  * an architecture name plus a checkpoint file (local path or ``s3://``), loaded weights-only;
  * an unclip checkpoint folder (safetensors + JSON config), e.g. the one the ``clip`` stage
    registers in MLflow (``models:/NAME@ALIAS`` is resolved by the caller to such a folder);
  * a custom architecture dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) to train from scratch.

The per-token text encodings (the final-layer states before pooling) are exposed because the prior
and the decoder condition on them, not only on the pooled embedding.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip import checkpoint, storage

KIND = "clip"


def create_custom(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """An untrained open_clip CLIP from an architecture dict (no download, no registry)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(embed_dim=int(model_cfg["embed_dim"]),
                vision_cfg=CLIPVisionCfg(**model_cfg["vision_cfg"]),
                text_cfg=CLIPTextCfg(**model_cfg["text_cfg"]),
                quick_gelu=bool(model_cfg.get("quick_gelu", False)))


class ClipEncoder:
    """A frozen CLIP with its preprocessing and tokenizer, and the identity it records downstream."""

    def __init__(self, model: torch.nn.Module, identity: dict[str, Any],
                 model_cfg: dict[str, Any] | None = None):
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transform import image_transform

        self.model = model.eval()
        self.model_cfg = model_cfg
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(model.context_length)
        self.preprocess = image_transform(self.image_size, is_train=False)
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        self.identity = {**identity, "dim": self.dim, "image_size": self.image_size,
                         "context_length": self.context_length}

    @property
    def dim(self) -> int:
        proj = self.model.visual.proj if hasattr(self.model.visual, "proj") else None
        if proj is not None:
            return int(proj.shape[-1])
        return int(self.model.text_projection.shape[-1])

    @property
    def text_width(self) -> int:
        return int(self.model.transformer.width)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions))

    def image_tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor) -> np.ndarray:
        x = images if isinstance(images, torch.Tensor) else self.image_tensor(images)
        return F.normalize(self.model.encode_image(x).float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        z = self.model.encode_text(self.tokenize(captions))
        return F.normalize(z.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def encode_text_tokens(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pooled L2-normalized embedding, per-token final states [B, L, W], token mask [B, L])."""
        return tuple(t.cpu().numpy() for t in text_tokens(self.model, self.tokenize(captions)))

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        if self.model_cfg is None:
            raise ValueError("only CLIPs built from an architecture dict can be saved as unclip checkpoints")
        checkpoint.save(folder, self.model.state_dict(), KIND, self.model_cfg, extra)


def text_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """open_clip's ``encode_text`` stopped before pooling, so the token states are kept too."""
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    pooled = text_global_pool(x, tokens, model.text_pool_type,
                              eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        pooled = model.text_projection(pooled) if isinstance(model.text_projection, torch.nn.Linear) \
            else pooled @ model.text_projection
    # causal text tower: positions after the end-of-text token carry nothing the caption said
    eot = tokens.argmax(dim=-1, keepdim=True)
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= eot
    return F.normalize(pooled.float(), dim=-1), x.float(), mask


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


def load_clip(source: str, arch: str | None = None) -> ClipEncoder:
    """Load a CLIP from an unclip checkpoint folder, a weights file (with ``arch``) or a hub tag."""
    import open_clip

    if storage.exists(storage.join(source, checkpoint.CONFIG)):
        state, meta = checkpoint.load(source, KIND)
        model = create_custom(meta["config"])
        model.load_state_dict(state)
        digest = _digest(storage.read_bytes(storage.join(source, checkpoint.WEIGHTS)))
        return ClipEncoder(model, {"arch": "custom", "source": source, "digest": digest},
                           meta["config"])
    if arch is None:
        raise ValueError(f"CLIP source {source!r} is not an unclip checkpoint folder; "
                         "set clip.arch to its open_clip architecture name")
    if storage.exists(source):  # a weights file, local or remote: read it ourselves, weights only
        data = storage.read_bytes(source)
        suffix = ".safetensors" if source.endswith(".safetensors") else ".pt"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "weights" + suffix)
            with open(path, "wb") as f:
                f.write(data)
            model = open_clip.create_model(arch, pretrained=path, weights_only=True)
        return ClipEncoder(model, {"arch": arch, "source": source, "digest": _digest(data)})
    model = open_clip.create_model(arch, pretrained=source)  # a pretrained tag (needs the hub)
    return ClipEncoder(model, {"arch": arch, "source": f"pretrained:{source}", "digest": source})
