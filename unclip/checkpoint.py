"""Pickle-free model files: ``model.safetensors`` plus ``config.json`` in one folder URI.

The JSON holds what is needed to rebuild the model (its kind and constructor config), the code
version that wrote it and a format version, so a checkpoint from an incompatible release fails with
a clear message instead of loading and producing noise. Nothing here ever unpickles.
"""

from __future__ import annotations

from typing import Any

from unclip import __version__, storage

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the cause."""


def save(folder: str, state_dict: dict[str, Any], kind: str, config: dict[str, Any],
         extra: dict[str, Any] | None = None) -> None:
    """Write weights and config; the config goes last, so a complete config means a complete folder."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    storage.write_bytes(storage.join(folder, WEIGHTS), st_save(tensors))
    storage.write_json(storage.join(folder, CONFIG), {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "unclip_version": __version__,
        **(extra or {}),
    })


def read_config(folder: str, kind: str | None = None) -> dict[str, Any]:
    uri = storage.join(folder, CONFIG)
    if not storage.exists(uri):
        raise CheckpointError(f"{folder}: no {CONFIG}; not an unclip checkpoint")
    meta = storage.read_json(uri)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {meta.get('format_version')} written by "
                              f"unclip {meta.get('unclip_version')}; this is unclip {__version__} "
                              f"(format {FORMAT_VERSION})")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{folder}: holds a {meta.get('kind')!r}, expected a {kind!r}")
    return meta


def load(folder: str, kind: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, meta). Only safetensors bytes are parsed: a pickle is rejected, not executed."""
    meta = read_config(folder, kind)
    return parse_weights(storage.read_bytes(storage.join(folder, WEIGHTS)), folder), meta


def parse_weights(raw: bytes, folder: str) -> dict[str, Any]:
    """The state dict in ``folder``'s safetensors bytes (a caller that also digests them reads once)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        return st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}/{WEIGHTS}: not a safetensors file ({exc})") from None


def load_into(model, state: dict[str, Any], folder: str, what: str):
    """Load ``state`` into ``model`` and return it in eval mode; weights that do not fit the model
    its config describes are a CheckpointError naming the folder, not a deep torch error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the {what} its config describes "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
