"""The filter drops exactly the bad samples, each under its reason, and loses nothing else."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import png_bytes, random_image, write_raw_tar
from unclip.data.filtering import REASONS, FilterConfig, check, mark_duplicates, to_rgb
from unclip.data.shards import RawSample, iter_shard, list_shards


def _sample(key: str, image: bytes | None, ext: str = "png", caption: bytes | None = b"a fine caption"):
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption))
    members.append((f"{key}.json", json.dumps({"key": key}).encode()))
    return members


def _rgba(seed: int) -> Image.Image:
    img = random_image(seed).convert("RGBA")
    a = np.array(img)
    a[:10, :, 3] = 0  # a transparent band: must become white
    return Image.fromarray(a, "RGBA")


@pytest.fixture
def bad_shards(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    rgba = _rgba(0)
    good_png = png_bytes(random_image(1))
    pal = random_image(2).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    a = []
    a += _sample("000000000", png_bytes(rgba))                                    # kept (RGBA)
    a += _sample("000000001", good_png[: len(good_png) // 2])                     # undecodable
    a += _sample("000000002", b"this is not an image at all", ext="jpg")          # undecodable
    a += _sample("000000003", png_bytes(random_image(3).convert("L")), caption=None)  # no caption
    a += _sample("000000004", png_bytes(random_image(4).convert("CMYK"), "JPEG"), ext="jpg")  # kept
    a += _sample("000000005", png_bytes(random_image(5, size=(8, 8))))            # too small
    a += _sample("000000006", png_bytes(random_image(6)), caption=b"   ")        # too short
    a += _sample("000000007", png_bytes(to_rgb(rgba)))                           # duplicate image
    a += _sample("000000008", png_bytes(pal, transparency=0))                    # kept (palette)
    a += _sample("000000009", png_bytes(random_image(9, size=(200, 40))))         # aspect ratio
    a += _sample("000000010", None)                                              # missing image
    a += _sample("000000011", png_bytes(random_image(11)), caption=b"\xff\xfe bad")  # not utf-8
    a += [("README", b"stray")]                                                  # stray file
    write_raw_tar(src / "00000.tar", a)
    b = []
    b += _sample("000000004", png_bytes(random_image(12)))                        # duplicate key
    b += _sample("000010001", png_bytes(random_image(13)))                        # kept
    b += _sample("000010002", png_bytes(random_image(14)))                        # kept
    b += _sample("000010003", png_bytes(random_image(15)))                        # truncated
    cut = sum(512 + -(-len(d) // 512) * 512 for _, d in b[:-3]) + 512 + 100
    write_raw_tar(src / "00001.tar", b, truncate_to=cut)
    return src


EXPECTED_DROPS = {
    "undecodable_image": 2, "missing_caption": 1, "image_too_small": 1, "caption_too_short": 1,
    "duplicate_image": 1, "extreme_aspect_ratio": 1, "missing_image": 1, "caption_not_utf8": 1,
    "stray_file": 1, "duplicate_key": 1, "truncated_sample": 1, "unreadable_shard_tail": 1,
}
EXPECTED_KEPT = ["000000000", "000000004", "000000008", "000010001", "000010002"]


def test_library_checks_give_exact_reasons(bad_shards):
    cfg = FilterConfig(min_side=16)
    verdicts = [check(item, cfg) for s in list_shards(str(bad_shards)) for item in iter_shard(s)]
    mark_duplicates(verdicts, cfg)
    counts: dict[str, int] = {}
    for v in verdicts:
        if v.reason:
            counts[v.reason] = counts.get(v.reason, 0) + 1
    assert counts == EXPECTED_DROPS
    assert [v.key for v in verdicts if v.reason is None] == EXPECTED_KEPT
    assert set(counts) <= set(REASONS)
    assert [v.detail for v in verdicts if v.reason == "duplicate_image"] == ["same pixels as 000000000"]


def test_to_rgb_composites_alpha_on_white():
    rgba = _rgba(0)
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB"
    assert np.all(np.array(rgb)[:10] == 255)
    assert np.array_equal(np.array(rgb)[10:], np.array(rgba)[10:, :, :3])
    assert to_rgb(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)


def test_filter_stage_counts_and_output(bad_shards, tmp_path, ray_local):
    from pipelines.cli import main

    run_dir = tmp_path / "run"
    rc = main(["run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}", f"data.source={bad_shards}"])
    assert rc == 0
    counts = dict(zip(*pq.read_table(run_dir / "filter" / "drop_counts.parquet").to_pydict().values()))
    assert {k: v for k, v in counts.items() if v} == EXPECTED_DROPS
    assert set(counts) == set(REASONS)
    dropped = pq.read_table(run_dir / "filter" / "dropped.parquet").to_pylist()
    assert len(dropped) == sum(EXPECTED_DROPS.values())

    out = list_shards(str(run_dir / "filter" / "shards"))
    assert [p.rsplit("/", 1)[-1] for p in out] == ["00000.tar", "00001.tar"]
    samples = [s for p in out for s in iter_shard(p)]
    assert all(isinstance(s, RawSample) for s in samples)
    assert [s.key for s in samples] == EXPECTED_KEPT
    for s in samples:
        img = Image.open(io.BytesIO(s.image_bytes))
        assert img.mode == "RGB"
        assert s.caption() == "a fine caption"
        assert s.meta()["width"] == img.width
    # the RGBA sample: transparent band composited on white, the rest untouched
    first = np.array(Image.open(io.BytesIO(samples[0].image_bytes)))
    assert np.all(first[:10] == 255)
    assert np.array_equal(first[10:], np.array(_rgba(0))[10:, :, :3])
    # an RGB PNG is copied byte for byte
    assert samples[3].image_bytes == png_bytes(random_image(13))
    manifest = json.loads((run_dir / "filter" / "manifest.json").read_text())
    assert manifest["metrics"]["kept"] == 5
    assert manifest["metrics"]["input_samples"] == 16


@pytest.fixture
def messy_shards(tmp_path):
    """Keys that are not plain names and captions with control characters."""
    src = tmp_path / "messy"
    src.mkdir()
    m = []
    m += _sample("000000000", png_bytes(random_image(20)))                        # kept
    m += _sample("../../x", png_bytes(random_image(21)))                          # path traversal
    m += _sample("0000\x01001", png_bytes(random_image(22)))                      # control character
    m += _sample(" ", png_bytes(random_image(23)))                                # blank key
    m += [(".png", png_bytes(random_image(24))), (".txt", b"an empty key")]      # empty key
    m += _sample("dir\\y", png_bytes(random_image(25)))                           # backslash
    m += _sample("0000\udcff06", png_bytes(random_image(26)))                     # non-UTF-8 name
    m += _sample("000000007", png_bytes(random_image(27)), caption=b"a red\x00 circle\r\n\tok")
    m += _sample("000000008", png_bytes(random_image(28)), caption=b"\x00\x00 \x07")  # then empty
    m += _sample("000000009", png_bytes(random_image(29)), caption=b"a\x1b[31m b")
    write_raw_tar(src / "00000.tar", m)
    return src


MESSY_DROPS = {"unsafe_key": 6, "caption_too_short": 1}
MESSY_KEPT = {"000000000": "a fine caption", "000000007": "a red circle ok", "000000009": "a [31m b"}


def test_unsafe_keys_and_control_characters(messy_shards):
    cfg = FilterConfig(min_side=16)
    verdicts = [check(item, cfg) for s in list_shards(str(messy_shards)) for item in iter_shard(s)]
    counts: dict[str, int] = {}
    for v in verdicts:
        if v.reason:
            counts[v.reason] = counts.get(v.reason, 0) + 1
    assert counts == MESSY_DROPS
    assert [v.key for v in verdicts if v.reason is None] == list(MESSY_KEPT)
    assert [v.key for v in verdicts if v.caption_cleaned] == ["000000007", "000000008", "000000009"]
    # dropped keys are reported escaped (they go to Parquet and logs), with why
    unsafe = {v.key: v.detail for v in verdicts if v.reason == "unsafe_key"}
    assert unsafe == {"../../x": "contains '/'", "0000\\x01001": "contains U+0001 (Cc)",
                      " ": "empty key", "": "empty key", "dir\\y": "contains '\\\\'",
                      "0000\\udcff06": "contains U+DCFF (Cs)"}


def test_filter_stage_drops_unsafe_keys_and_cleans_captions(messy_shards, tmp_path, ray_local):
    from pipelines.cli import main

    run_dir = tmp_path / "run"
    rc = main(["run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}",
               f"data.source={messy_shards}"])
    assert rc == 0
    counts = dict(zip(*pq.read_table(run_dir / "filter" / "drop_counts.parquet").to_pydict().values()))
    assert {k: v for k, v in counts.items() if v} == MESSY_DROPS
    dropped = pq.read_table(run_dir / "filter" / "dropped.parquet").to_pylist()
    assert sorted(d["key"] for d in dropped if d["reason"] == "unsafe_key") == sorted(
        ["../../x", "0000\\x01001", " ", "", "dir\\y", "0000\\udcff06"])
    out = list_shards(str(run_dir / "filter" / "shards"))
    with tarfile.open(out[0]) as tar:
        names = tar.getnames()
    assert names == [f"{k}.{e}" for k in MESSY_KEPT for e in ("png", "txt", "json")]
    samples = [s for s in iter_shard(out[0])]
    assert {s.key: s.caption() for s in samples} == MESSY_KEPT
    assert {s.key: s.meta()["caption"] for s in samples} == MESSY_KEPT
    m = json.loads((run_dir / "filter" / "manifest.json").read_text())["metrics"]
    assert m["kept"] == 3 and m["dropped_unsafe_key"] == 6 and m["caption_cleaned"] == 2
