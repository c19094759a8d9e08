"""Image I/O for generation: clear errors on bad input, tensors in [-1, 1], PNG out."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unclip.models.decoder_sampling import from_uint8, image_grid, to_pil  # noqa: F401


class InputError(ValueError):
    """Bad user input (unreadable image, empty prompt): reported in one line by the CLI."""


def read_image(path: str) -> Image.Image:
    """An RGB image from a path or URI; a one-line error names the file and the cause."""
    from unclip import storage
    from unclip.data.filtering import to_rgb

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    try:
        import io

        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({str(exc).splitlines()[0][:120]})") from None
    return to_rgb(img)


def check_prompt(prompt: str) -> str:
    text = (prompt or "").strip()
    if not text:
        raise InputError("the prompt is empty: give a caption such as \"a red circle\"")
    return text


def from_pil(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) in [-1, 1] (bicubic resize)."""
    return from_uint8(np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
                                for im in images]))


def save_pngs(images: Sequence[Image.Image], out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = os.path.join(out_dir, f"{stem}_{i:03d}.png")
        im.save(path)
        paths.append(path)
    return paths


def grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """All ``images`` tiled row-major (``cols`` per row, default about square)."""
    return image_grid(images, cols or math.ceil(math.sqrt(len(images))))
