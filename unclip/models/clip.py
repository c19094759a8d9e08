"""CLIP through open_clip: build, load from any source, encode images and captions.

Sources, in the order a user reaches for them:
  * ``pretrained:<tag>`` with an open_clip architecture name (``ViT-H-14`` + ``laion2b_s32b_b79k``):
    open_clip's own download cache, filled on a machine that reaches the model hub;
  * a weights file (local path or ``s3://``) with an architecture name, loaded weights-only;
  * an unclip checkpoint folder (safetensors + JSON config), e.g. the one the ``clip`` stage trains;
  * ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` from the MLflow registry;
  * a custom architecture dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) to train from scratch;
  * a transformers CLIP imported by ``unclip import-diffusers`` (a checkpoint folder whose config
    says ``backend: transformers``), served by :mod:`unclip.interop.hf_clip`.

The ``clip`` stage resolves the configured source once and writes what it used (architecture,
source, pinned registry version, weights digest, dimensions) as a *reference folder*: a
``config.json`` without weights. Every consumer loads CLIP from that folder and nothing else, so
no stage after ``clip`` needs ``clip.arch``, and weights that changed underneath a run are refused
by their digest instead of silently giving other embeddings.

The per-token text encodings (the final-layer states before pooling) are exposed because the prior
and the decoder condition on them, not only on the pooled embedding.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip import checkpoint, storage
from unclip.devices import model_device, to_device, to_numpy

KIND = "clip"
PRETRAINED = "pretrained:"
SOURCE_KINDS = ("trained", "tag", "file", "checkpoint", "registry")


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
        pretrained = identity.get("pretrained_cfg") or {}  # a tag's own statistics, if it has them
        self.preprocess = image_transform(self.image_size, is_train=False, mean=pretrained.get("mean"),
                                          std=pretrained.get("std"))
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

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def to(self, device: torch.device | str) -> "ClipEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor,
                      normalize: bool = True) -> np.ndarray:
        x = images if isinstance(images, torch.Tensor) else self.image_tensor(images)
        x = to_device(x, self.device, _float_dtype(self.model))
        z = self.model.encode_image(x).float()
        return to_numpy(F.normalize(z, dim=-1) if normalize else z)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        z = self.model.encode_text(to_device(self.tokenize(captions), self.device))
        return to_numpy(F.normalize(z.float(), dim=-1))

    @torch.no_grad()
    def encode_text_tokens(self, captions: Sequence[str], normalize: bool = True
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pooled embedding, L2-normalized unless ``normalize`` is False, per-token final states
        [B, L, W], token mask [B, L])."""
        tokens = to_device(self.tokenize(captions), self.device)
        return tuple(to_numpy(t) for t in text_tokens(self.model, tokens, normalize))

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        if self.model_cfg is None:
            raise ValueError("only CLIPs built from an architecture dict can be saved as unclip checkpoints")
        checkpoint.save(folder, self.model.state_dict(), KIND, self.model_cfg, extra)

    def save_reference(self, folder: str) -> None:
        """Write this CLIP's identity as a reference folder (``config.json``, no weights) that
        :func:`load_clip` loads the same CLIP from, digest-checked."""
        save_reference(folder, self.identity)


def save_reference(folder: str, identity: dict[str, Any]) -> None:
    """A reference folder for the CLIP ``identity`` describes (any backend: load_clip follows it)."""
    storage.write_json(storage.join(folder, checkpoint.CONFIG), {
        "format_version": checkpoint.FORMAT_VERSION, "kind": KIND, "config": None,
        "reference": identity, "unclip_version": _version()})


def to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalized with CLIP's (OpenAI's) statistics: what a
    CLIP trained here sees (already resized batches; :class:`ClipEncoder` preprocesses PIL images)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _version() -> str:
    from unclip import __version__

    return __version__


def text_tokens(model: torch.nn.Module, tokens: torch.Tensor,
                normalize: bool = True) -> tuple[torch.Tensor, ...]:
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
    return (F.normalize(pooled.float(), dim=-1) if normalize else pooled.float()), x.float(), mask


_CHUNK = 1 << 22


def _digest_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:32]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


@contextlib.contextmanager
def _local_file(uri: str) -> Iterator[str]:
    """A local path for a weights URI: the file itself, or a temporary copy of a remote one."""
    if not storage.is_remote(uri):
        yield uri
        return
    suffix = ".safetensors" if uri.endswith(".safetensors") else ".pt"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights" + suffix)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(uri))
        yield path


def source_kind(source: str, arch: str | None = None) -> str:
    """Which of :data:`SOURCE_KINDS` a configured ``clip.source`` is (checked, not guessed)."""
    if source.startswith(PRETRAINED):
        return "tag"
    if source.startswith("models:/"):
        return "registry"
    if storage.exists(storage.join(source, checkpoint.CONFIG)):
        return "checkpoint"
    if storage.exists(source):
        return "file"
    if arch and _known_tag(arch, source):
        return "tag"  # a bare tag, as open_clip spells it
    raise ValueError(f"CLIP source {source!r}: not pretrained:<tag>, models:/NAME@ALIAS, an unclip "
                     "checkpoint folder or an existing weights file")


def _known_tag(arch: str, tag: str) -> bool:
    import open_clip

    return bool(open_clip.get_pretrained_cfg(arch, tag))


def _need_arch(source: str, arch: str | None) -> str:
    if not arch:
        raise ValueError(f"CLIP source {source!r} is open_clip weights without an architecture; "
                         "set clip.arch to its open_clip architecture name (e.g. ViT-H-14)")
    import open_clip

    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"clip.arch {arch!r} is not an open_clip architecture "
                         f"(open_clip.list_models() names them)")
    return arch


def _tag_file(arch: str, tag: str, cfg: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(local file, open_clip pretrained cfg) for ``arch`` + ``tag``: open_clip's download cache,
    filled once on a machine that reaches the hub. ``cfg`` is a recorded cfg (a reference folder's),
    so that every process fetches from exactly where the clip stage did."""
    import open_clip

    cfg = dict(cfg or open_clip.get_pretrained_cfg(arch, tag))
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ValueError(f"{PRETRAINED}{tag} is not a known open_clip tag for {arch} (known: {known})")
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as exc:  # the hub unreachable, or a cache miss offline
        path, reason = "", f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    else:
        reason = ""
    if not path or not os.path.isfile(path):
        raise LookupError(f"open_clip weights {arch} {PRETRAINED}{tag} are not in the local cache and "
                          f"could not be fetched{reason}; fetch them on a connected machine, or point "
                          "clip.source at the weights file")
    return path, {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _ensure_arch(arch: str, model_cfg: dict[str, Any] | None) -> None:
    """Make ``arch`` known to open_clip in this process from a recorded architecture config
    (Ray workers do not share the driver's ``open_clip.add_model_config`` calls)."""
    import open_clip

    if open_clip.get_model_config(arch) is not None or not model_cfg:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{arch}.json")
        storage.write_json(path, model_cfg)
        open_clip.add_model_config(path)


def _open_clip_weights(arch: str, path: str) -> torch.nn.Module:
    import open_clip

    return open_clip.create_model(arch, pretrained=path, weights_only=True)


def load_clip(source: str, arch: str | None = None) -> ClipEncoder:
    """A CLIP from any source (see the module docstring); its ``identity`` is the record a
    reference folder stores. ``arch`` is needed only for tags and weights files."""
    kind = source_kind(source, arch)
    if kind == "registry":
        from unclip.registry import pinned_uri, resolve_checkpoint

        pinned = pinned_uri(source)
        encoder = load_clip(resolve_checkpoint(pinned))
        encoder.identity = {**encoder.identity, "source": pinned, "kind": "registry",
                            "requested": source}
        return encoder
    if kind == "checkpoint":
        meta = checkpoint.read_config(source, KIND)
        if meta.get("reference"):
            return _load_reference(source, meta["reference"])
        if (meta.get("config") or {}).get("backend") == "transformers":
            from unclip.interop.hf_clip import load_hf_clip  # imported CLIPs (import-diffusers)

            return load_hf_clip(source)
        raw = storage.read_bytes(storage.join(source, checkpoint.WEIGHTS))  # read once: load + digest
        model = create_custom(meta["config"])
        checkpoint.load_into(model, checkpoint.parse_weights(raw, source), source, "CLIP")
        return ClipEncoder(model, {"arch": "custom", "source": source, "kind": "checkpoint",
                                   "digest": _digest(raw)}, meta["config"])
    return _load_open_clip(kind, source, _need_arch(source, arch))


def _load_open_clip(kind: str, source: str, arch: str, pretrained_cfg: dict[str, Any] | None = None
                    ) -> ClipEncoder:
    import open_clip

    model_cfg = open_clip.get_model_config(arch)
    if kind == "tag":
        tag = source[len(PRETRAINED):] if source.startswith(PRETRAINED) else source
        path, cfg = _tag_file(arch, tag, pretrained_cfg)
        model = _open_clip_weights(arch, path)
        return ClipEncoder(model, {"arch": arch, "source": PRETRAINED + tag, "kind": "tag",
                                   "digest": _digest_file(path), "pretrained_cfg": cfg,
                                   "model_cfg": model_cfg})
    with _local_file(source) as path:  # a weights file, local or remote: weights only
        model = _open_clip_weights(arch, path)
        digest = _digest_file(path)
    return ClipEncoder(model, {"arch": arch, "source": source, "kind": "file", "digest": digest,
                               "model_cfg": model_cfg})


def _load_reference(folder: str, ref: dict[str, Any]) -> ClipEncoder:
    """The CLIP a reference folder names, refused if its weights are not the ones recorded."""
    source = ref.get("source")
    if not source or ref.get("kind") not in SOURCE_KINDS:
        raise checkpoint.CheckpointError(f"{folder}: CLIP reference without a usable source ({ref})")
    if ref["kind"] in ("tag", "file"):
        arch = str(ref.get("arch"))
        _ensure_arch(arch, ref.get("model_cfg"))
        encoder = _load_open_clip(ref["kind"], str(source), _need_arch(str(source), arch),
                                  ref.get("pretrained_cfg"))
    else:
        encoder = load_clip(str(source))
    recorded, now = ref.get("digest"), encoder.identity.get("digest")
    if recorded and now != recorded:
        raise checkpoint.CheckpointError(
            f"{folder}: the CLIP weights at {source} changed since they were recorded "
            f"(digest {recorded}, now {now}); re-run the clip stage (and what reads it)")
    encoder.identity = {**ref, **{k: encoder.identity[k] for k in ("dim", "image_size", "context_length")}}
    return encoder
