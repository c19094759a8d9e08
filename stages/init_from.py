"""``<stage>.init_from``: start a training stage from a registered or saved model instead of from
random weights (fine-tuning).

``init_from`` is a ``models:/NAME@ALIAS`` (or ``/VERSION``) URI or a checkpoint folder URI. The
driver resolves it once (:func:`resolve_init`): an alias is pinned to its version, the weights are
digested, and the model is built from the checkpoint's *own* config, so the stage's model options
are ignored. What was resolved (:meth:`InitSource.record`) goes to the training workers, into the
stage's manifest and into the saved model's ``config.json``: the result names exactly the weights it
started from. The workers load those weights (digest-checked) before the first step, unless they
resume their own checkpoint: a resumed fine-tuning continues from where it was, not from the source.

Imported models (``unclip import-diffusers``): the prior, decoder and upsampler stages fine-tune
imported (``diffusers_unclip_*``) priors, decoders and super-resolution stages, the clip stage the
imported transformers CLIP; a stage given another stage's kind refuses it before any data work.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from unclip import checkpoint, storage

log = logging.getLogger("unclip")


class InitFromError(ValueError):
    """``init_from`` names a model this stage cannot start from; the message says why."""


@dataclass(frozen=True)
class InitSource:
    uri: str        # as configured
    pinned: str     # models:/NAME/VERSION for a registry URI (an alias moves), else the folder URI
    folder: str     # where the checkpoint was read (a local cache folder for a registry URI)
    kind: str       # the checkpoint's kind
    digest: str     # sha256 of its model.safetensors
    meta: dict[str, Any]  # its config.json

    @property
    def config(self) -> Any:
        return self.meta.get("config")

    def record(self) -> dict[str, str]:
        """What the workers, the manifest and the saved model keep: enough to reproduce the start."""
        return {"uri": self.uri, "pinned": self.pinned, "kind": self.kind, "digest": self.digest}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def resolve_init(uri: str | None, stage: str, kinds: tuple[str, ...]) -> InitSource | None:
    """The source ``uri`` names (None when empty: train from scratch); an InitFromError when it is
    missing, is an imported model, or is not one of ``kinds`` (what ``stage`` trains)."""
    if not uri:
        return None
    from unclip.registry import pinned_uri, resolve_checkpoint

    uri = str(uri)
    try:
        pinned = pinned_uri(uri) if uri.startswith("models:/") else uri
        folder = resolve_checkpoint(pinned)
        meta = checkpoint.read_config(folder)
    except (LookupError, checkpoint.CheckpointError) as exc:
        raise InitFromError(f"{stage}.init_from={uri}: {exc}") from None
    kind = str(meta.get("kind"))
    if kind.startswith("diffusers_unclip_") and kind not in kinds:
        raise InitFromError(
            f"{stage}.init_from={uri}: holds an imported diffusers model ({kind!r}); this stage does "
            f"not support fine-tuning it yet (it takes {', '.join(kinds)} checkpoints)")
    backend = (meta.get("config") or {}).get("backend") if isinstance(meta.get("config"), dict) else None
    if backend and stage != "clip":  # the imported transformers CLIP: the clip stage trains it
        raise InitFromError(f"{stage}.init_from={uri}: holds an imported {backend} {kind!r}, which "
                            "only clip.init_from trains")
    if kind not in kinds:
        raise InitFromError(f"{stage}.init_from={uri}: holds a {kind!r}, not a {' or '.join(kinds)} "
                            f"this stage trains")
    if meta.get("config") is None:  # e.g. a CLIP reference folder: a pointer, not weights
        raise InitFromError(f"{stage}.init_from={uri}: a reference folder without weights; name the "
                            "checkpoint it points to")
    weights = storage.join(folder, checkpoint.WEIGHTS)
    if not storage.exists(weights):
        raise InitFromError(f"{stage}.init_from={uri}: no {checkpoint.WEIGHTS} in {folder}")
    digest = _digest(storage.read_bytes(weights))
    source = InitSource(uri, pinned, folder, kind, digest, meta)
    log.info("%s: starting from %s (%s, %s): its architecture is the checkpoint's own; the stage's "
             "model options are ignored", stage, uri, pinned, digest[:19])
    return source


def init_metrics(init: InitSource | None) -> dict[str, str]:
    """The stage result's (and so its manifest's) record of the source; {} from scratch."""
    if init is None:
        return {}
    return {"init_from": init.uri, "init_from_pinned": init.pinned, "init_from_digest": init.digest}


def conflict(stage: str, key: str, source_value: Any, needed: Any, why: str) -> None:
    """Refuse a source whose architecture contradicts what the data needs."""
    if source_value != needed:
        raise InitFromError(f"{stage}.init_from: the source's {key} is {source_value!r} but {why} "
                            f"needs {needed!r}")


# ---- inside the training workers -----------------------------------------------------------------


def load_init_weights(model: torch.nn.Module, init: dict[str, str]) -> None:
    """Load the weights ``init`` (an :meth:`InitSource.record`) names into ``model`` (as built, before
    DDP/FSDP), checking they are the ones the driver resolved."""
    from unclip.registry import resolve_checkpoint

    folder = resolve_checkpoint(init["pinned"])
    raw = storage.read_bytes(storage.join(folder, checkpoint.WEIGHTS))
    digest = _digest(raw)
    if digest != init["digest"]:
        raise InitFromError(f"init_from={init['uri']}: the weights at {init['pinned']} changed since "
                            f"the stage resolved them ({init['digest'][:19]} -> {digest[:19]})")
    state = checkpoint.parse_weights(raw, folder)
    checkpoint.load_into(model, state, folder, init["kind"])
    model.train()
