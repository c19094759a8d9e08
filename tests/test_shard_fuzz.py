"""Fuzzing the shard reader and the per-sample checks: random bytes, truncated tars, wrong
extensions, huge captions, non-UTF-8 text, keys that are paths or hold control characters.
Nothing may raise; every bad sample is a counted skip."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from unclip.data.filtering import REASONS, FilterConfig, check, encode_rgb
from unclip.data.shards import RawSample, ShardProblem, iter_shard
from tests.conftest import png_bytes, random_image

SEEDS = range(40)
UNSAFE_KEYS = {"nested": "dir/{}", "traversal": "../../{}", "control_key": "{}\x1b"}  # kind -> key


def _member(rng: random.Random, key: str) -> tuple[str, list[tuple[str, bytes]]]:
    """One sample's kind and files, each of them possibly wrong."""
    good_png = png_bytes(random_image(rng.randrange(1 << 30), size=(40, 40)))
    kind = rng.choice(["good", "garbage_image", "truncated_image", "text_as_image", "image_as_text",
                       "huge_caption", "non_utf8", "no_caption", "wrong_ext", "empty", "nested",
                       "traversal", "control_key", "nul_caption"])
    caption = b"a red circle"
    if kind == "garbage_image":
        return kind, [(f"{key}.jpg", rng.randbytes(rng.randrange(0, 500))), (f"{key}.txt", caption)]
    if kind == "truncated_image":
        return kind, [(f"{key}.png", good_png[: rng.randrange(8, len(good_png) - 1)]), (f"{key}.txt", caption)]
    if kind == "text_as_image":
        return kind, [(f"{key}.webp", b"definitely not a picture"), (f"{key}.txt", caption)]
    if kind == "image_as_text":
        return kind, [(f"{key}.png", good_png), (f"{key}.txt", good_png)]
    if kind == "huge_caption":
        return kind, [(f"{key}.png", good_png), (f"{key}.txt", b"red " * rng.randrange(10_000, 300_000))]
    if kind == "non_utf8":
        return kind, [(f"{key}.png", good_png), (f"{key}.txt", b"\xff\xfe\xfa caption \xc3\x28")]
    if kind == "no_caption":
        return kind, [(f"{key}.png", good_png), (f"{key}.json", rng.randbytes(20))]
    if kind == "wrong_ext":
        return kind, [(f"{key}.exe", good_png), (f"{key}.TXT", caption), (f"{key}", b"no extension")]
    if kind == "empty":
        return kind, [(f"{key}.png", b""), (f"{key}.txt", b"")]
    if kind == "nested":
        return kind, [(f"dir/{key}.png", good_png), (f"dir/{key}.txt", caption)]
    if kind == "traversal":
        return kind, [(f"../../{key}.png", good_png), (f"../../{key}.txt", caption)]
    if kind == "control_key":
        return kind, [(f"{key}\x1b.png", good_png), (f"{key}\x1b.txt", caption)]
    if kind == "nul_caption":
        return kind, [(f"{key}.png", good_png), (f"{key}.txt", b"a red\x00 circle")]
    return kind, [(f"{key}.png", good_png), (f"{key}.txt", caption), (f"{key}.json", b'{"ok": 1}')]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _fuzzed_shard(seed: int) -> tuple[bytes, dict[str, str], str]:
    """A shard's bytes, the kind of each sample key it was built with, and the damage mode."""
    rng = random.Random(seed)
    kinds: dict[str, str] = {}
    members = []
    for i in range(rng.randrange(1, 12)):
        key = f"{seed:03d}{i:04d}"
        kind, files = _member(rng, key)
        kinds[UNSAFE_KEYS.get(kind, "{}").format(key)] = kind
        members += files
    data = _tar(members)
    mode = rng.choice(["whole", "truncated", "random_bytes", "garbage_tail", "empty"])
    if mode == "truncated":
        data = data[: rng.randrange(1, len(data))]
    elif mode == "random_bytes":
        data = rng.randbytes(rng.randrange(0, 4096))
    elif mode == "garbage_tail":
        data = data[: len(data) - 1024] + rng.randbytes(2048)
    elif mode == "empty":
        data = b""
    return data, kinds, mode


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_shard_never_crashes_and_counts_every_skip(tmp_path, seed):
    data, kinds, mode = _fuzzed_shard(seed)
    shard = tmp_path / f"{seed:05d}.tar"
    shard.write_bytes(data)
    cfg = FilterConfig(min_side=16, max_caption_chars=10_000)
    seen: dict[str, str | None] = {}
    for item in iter_shard(str(shard)):
        verdict = check(item, cfg)
        assert verdict.reason is None or verdict.reason in REASONS, verdict.reason
        if isinstance(item, RawSample):
            assert item.key not in seen, f"sample {item.key} yielded twice"
            seen[item.key] = verdict.reason
            if verdict.reason is None:
                image, ext = encode_rgb(item, cfg)  # what the filter writes for a kept sample
                assert image and ext in ("png", "jpg")
        else:
            assert isinstance(item, ShardProblem) and verdict.reason == item.reason
    assert set(seen) <= set(kinds)
    if mode == "whole":  # nothing lost: every key seen once; good ones kept, bad ones counted
        assert set(seen) == set(kinds)
        for key, kind in kinds.items():
            expected = "unsafe_key" if kind in UNSAFE_KEYS else None
            if kind in ("good", "nul_caption") or expected:
                assert seen[key] == expected, (key, kind, seen[key])
            else:
                assert seen[key] is not None, (key, kind)


def test_fuzz_covers_every_kind_of_damage(tmp_path):
    """The seeds above really exercise the interesting paths (so the fuzz test can fail)."""
    reasons: set[str] = set()
    modes = {_fuzzed_shard(seed)[2] for seed in SEEDS}
    assert modes == {"whole", "truncated", "random_bytes", "garbage_tail", "empty"}
    for seed in SEEDS:
        data, _, _ = _fuzzed_shard(seed)
        shard = tmp_path / f"{seed:05d}.tar"
        shard.write_bytes(data)
        for item in iter_shard(str(shard)):
            v = check(item, FilterConfig(min_side=16, max_caption_chars=10_000))
            if v.reason:
                reasons.add(v.reason)
    for expected in ("undecodable_image", "caption_not_utf8", "missing_caption", "caption_too_long",
                     "unreadable_shard_tail", "missing_image", "unsafe_key"):
        assert expected in reasons, (expected, sorted(reasons))
