"""Per-sample checks of the filter stage, and RGB conversion of what is kept.

Every dropped sample gets exactly one reason: the first check it fails, in ``REASONS`` order.
Duplicates (keys, then exact images) are decided afterwards over the samples that passed every
per-sample check, so a broken first copy does not take a good second copy down with it.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

from unclip.data.shards import RawSample, ShardProblem, printable, unsafe_key_reason
from unclip.options import option, validate

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Order matters: a sample is counted under the first reason that applies.
REASONS = (
    "stray_file",            # a tar member that is not part of any sample (no extension)
    "truncated_sample",      # the shard ends inside this sample
    "unreadable_shard_tail", # the rest of a shard could not be read (one count per shard)
    "unsafe_key",            # a key that is not a plain name: empty, a path, control characters
    "missing_image",         # a sample with no image file
    "undecodable_image",     # image bytes that do not decode (truncated, not an image, bomb)
    "image_too_small",
    "extreme_aspect_ratio",
    "missing_caption",
    "caption_not_utf8",
    "caption_too_short",
    "caption_too_long",
    "duplicate_key",
    "duplicate_image",
)


@dataclass(frozen=True)
class FilterConfig:
    """The checks in :data:`REASONS` order; a null threshold (or a false flag) turns one off."""

    min_side: int | None = option(32, ge=1)      # shorter side below this (pixels): too small
    max_aspect_ratio: float | None = option(3.0, ge=1)  # long / short side above this
    min_caption_chars: int | None = option(2, ge=0)     # after stripping white space
    max_caption_chars: int | None = option(500, ge=1)
    dedup_keys: bool = True                      # keep the first sample of each key
    dedup_images: bool = True                    # ... and of each exact image (sha256 of its pixels)
    background: tuple[int, int, int] = option((255, 255, 255), ge=0, le=255)  # alpha composited on it
    max_pixels: int | None = option(178956970, ge=1)  # decompression bombs (PIL's own limit)

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_mapping(cls, m) -> "FilterConfig":
        kw = {k: m[k] for k in cls.__dataclass_fields__ if k in m}
        if "background" in kw:
            kw["background"] = tuple(int(v) for v in kw["background"])
        return cls(**kw)


@dataclass
class Verdict:
    key: str | None
    reason: str | None         # None: kept so far (duplicates are decided later)
    detail: str = ""
    image_sha: str | None = None
    width: int = 0
    height: int = 0
    caption_cleaned: bool = False  # control characters were replaced (the sample is not dropped)


# C0, DEL and C1 controls (NUL, tabs, newlines, escapes...), with any white space around them
_CONTROLS = re.compile(r"\s*[\x00-\x1f\x7f-\x9f]+\s*")


def clean_caption(text: str) -> tuple[str, bool]:
    """The caption with each run of control characters made one space, and whether any was found.

    Captions feed a tokenizer, Parquet files and logs; a NUL or an escape sequence in them is
    noise at best. The length checks apply to the cleaned text.
    """
    if _CONTROLS.search(text) is None:
        return text, False
    return _CONTROLS.sub(" ", text).strip(), True


def decode_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Fully decode (``load``) so truncated files fail here, not later in a training loop."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        finally:
            Image.MAX_IMAGE_PIXELS = old
    return img


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB with any transparency composited on ``background`` (palette, LA, RGBA, CMYK, 16-bit)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and arr.max(initial=0) > 255:  # 16-bit grey: keep the top 8 bits
            arr = arr / 256.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def pixel_sha(img: Image.Image) -> str:
    """Content hash of the decoded RGB pixels: the same picture re-encoded is still a duplicate."""
    h = hashlib.sha256()
    h.update(f"{img.width}x{img.height}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def check(item: RawSample | ShardProblem, cfg: FilterConfig) -> Verdict:
    """The per-sample verdict (everything but duplicates)."""
    if isinstance(item, ShardProblem):
        key = None if item.key is None else printable(item.key)
        return Verdict(key, item.reason, printable(item.detail))
    unsafe = unsafe_key_reason(item.key)
    if unsafe is not None:
        return Verdict(printable(item.key), "unsafe_key", unsafe)
    data = item.image_bytes
    if data is None:
        return Verdict(item.key, "missing_image", f"files: {sorted(item.files)}")
    try:
        img = decode_image(data, cfg.max_pixels)
    except Exception as exc:  # PIL raises many types for bad bytes; all mean "cannot decode"
        return Verdict(item.key, "undecodable_image", f"{type(exc).__name__}: {exc}"[:200])
    w, h = img.size
    if cfg.min_side is not None and min(w, h) < cfg.min_side:
        return Verdict(item.key, "image_too_small", f"{w}x{h}", width=w, height=h)
    if cfg.max_aspect_ratio is not None and max(w, h) / max(1, min(w, h)) > cfg.max_aspect_ratio:
        return Verdict(item.key, "extreme_aspect_ratio", f"{w}x{h}", width=w, height=h)
    if "txt" not in item.files:
        return Verdict(item.key, "missing_caption", width=w, height=h)
    try:
        caption, cleaned = clean_caption(item.caption() or "")
    except UnicodeDecodeError:
        return Verdict(item.key, "caption_not_utf8", width=w, height=h)
    if cfg.min_caption_chars is not None and len(caption) < cfg.min_caption_chars:
        return Verdict(item.key, "caption_too_short", repr(caption), width=w, height=h,
                       caption_cleaned=cleaned)
    if cfg.max_caption_chars is not None and len(caption) > cfg.max_caption_chars:
        return Verdict(item.key, "caption_too_long", f"{len(caption)} chars", width=w, height=h,
                       caption_cleaned=cleaned)
    sha = pixel_sha(to_rgb(img, cfg.background)) if cfg.dedup_images else None
    return Verdict(item.key, None, image_sha=sha, width=w, height=h, caption_cleaned=cleaned)


def mark_duplicates(verdicts: list[Verdict], cfg: FilterConfig) -> None:
    """In order, the first sample of each key (then of each exact image) is kept; later ones dropped."""
    keys: set[str] = set()
    images: dict[str, str] = {}  # pixel hash -> the kept sample's key
    for v in verdicts:
        if v.reason is not None:
            continue
        if cfg.dedup_keys and v.key in keys:
            v.reason = "duplicate_key"
            continue
        if cfg.dedup_images and v.image_sha in images:
            v.reason, v.detail = "duplicate_image", f"same pixels as {images[v.image_sha]}"
            continue
        keys.add(v.key or "")
        if v.image_sha:
            images[v.image_sha] = v.key or ""


def encode_rgb(item: RawSample, cfg: FilterConfig) -> tuple[bytes, str]:
    """The kept image as RGB bytes: unchanged when it already is RGB, else re-encoded.

    JPEG sources stay JPEG (quality 95) to avoid blowing up photos; everything else becomes PNG
    (lossless).
    """
    data = item.image_bytes
    assert data is not None
    img = decode_image(data, cfg.max_pixels)
    ext = item.image_ext or "png"
    if img.mode == "RGB" and img.format in ("JPEG", "PNG", "WEBP") and \
            not (img.format == "PNG" and "transparency" in img.info):
        return data, ext
    rgb = to_rgb(img, cfg.background)
    buf = io.BytesIO()
    if img.format == "JPEG":
        rgb.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    rgb.save(buf, format="PNG")
    return buf.getvalue(), "png"
