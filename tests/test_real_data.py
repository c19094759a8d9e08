"""Evaluation without a ground truth: reference-free scores, the held-out caption set, and a small
img2dataset-layout set of non-shapes images (the cluster test runs the smoke pipeline end to end on
it, from S3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes
from unclip.data import shapes
from unclip.data.loading import is_holdout
from unclip.data.shards import ShardWriter, iter_shard, list_shards, sample_key, shard_name
from unclip.eval.heldout import held_out_set
from unclip.eval.reference_free import clip_score, frechet_distance, frechet_metrics

# Free-text vocabulary with no word from the shapes captions (colours, shapes, sizes, positions)
TONES = ["teal", "maroon", "amber", "olive", "crimson", "indigo", "beige", "cyan", "magenta", "ochre"]
KINDS = ["soft gradient", "grainy noise texture", "diagonal stripes", "blurry haze", "speckled pattern",
         "smooth ramp", "mottled surface", "checkered weave"]
SHAPES_WORDS = (set(shapes.COLORS) | set(shapes.SHAPES) | set(shapes.SIZES)
                | {"top", "bottom", "center", "left", "right", "above", "below"})


def texture(seed: int, size: int = 64) -> tuple[Image.Image, str]:
    """A random colour gradient or noise texture and a made-up caption for it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy)[..., None]
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = a * (1 - t) + b * t + rng.normal(0, rng.uniform(0, 60), (size, size, 3))
    caption = (f"a {KINDS[seed % len(KINDS)]} in {TONES[seed % len(TONES)]} and "
               f"{TONES[(seed // len(TONES) + 3) % len(TONES)]}, sample {seed}")
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"), caption


def write_texture_shards(folder, n: int = 80, per_shard: int = 40, repeat_caption_every: int = 0) -> None:
    """img2dataset layout: {key}.png/.txt/.json (no ``scene``), a parquet and stats per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, per_shard):
        with ShardWriter(str(folder), shard_name(s // per_shard)) as w:
            for j in range(min(per_shard, n - s)):
                img, caption = texture(s + j)
                if repeat_caption_every and (s + j) % repeat_caption_every == 0:
                    caption = "the same caption again"
                w.write(sample_key(s // per_shard, j, per_shard), png_bytes(img), "png", caption,
                        {"width": img.width, "height": img.height, "status": "success"})


def test_texture_captions_are_not_shapes_captions():
    words = {w.strip(",") for i in range(80) for w in texture(i)[1].split()}
    assert not words & SHAPES_WORDS


def test_frechet_distance_matches_the_formula():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 8, rel=1e-9)  # mean shift only


def test_frechet_distance_small_sets_and_bad_input():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 32)), rng.normal(size=(5, 32))  # far fewer rows than features
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, b[:, :4])


def test_frechet_metrics_skip_with_a_reason():
    rng = np.random.default_rng(2)
    gen, real_a, real_b = rng.normal(size=(4, 16)), rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    m = frechet_metrics(gen, real_a, real_b)
    assert set(m) == {"fd_clip_generated", "fd_clip_real", "fd_clip_n_generated", "fd_clip_n_real"}
    assert (m["fd_clip_n_generated"], m["fd_clip_n_real"]) == (4, 6)
    m = frechet_metrics(gen, real_a[:1], real_b[:1])
    assert "fd_clip_generated" not in m and "fd_clip_real" not in m
    assert "1 held-out real images" in m["fd_clip_skipped"]
    m = frechet_metrics(gen[:1], real_a, real_b)
    assert "fd_clip_real" in m and "fd_clip_generated" not in m
    assert m["fd_clip_skipped"].startswith("fd_clip_generated: 1 against 6")


def test_clip_score_is_the_mean_matched_cosine():
    f = np.eye(3, 4)
    assert clip_score(f, f) == pytest.approx(1.0)
    assert clip_score(f, np.roll(f, 1, axis=0)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        clip_score(f, f[:2])


def test_held_out_captions_without_ground_truth(tmp_path):
    write_texture_shards(tmp_path / "s", n=80, repeat_caption_every=7)
    shards = list_shards(str(tmp_path / "s"))
    items = [x for s in shards for x in iter_shard(s)]
    held_keys = [x.key for x in items if is_holdout(x.key, 0.2)]
    expected = list(dict.fromkeys(x.caption() for x in items if x.key in held_keys))
    held = held_out_set(shards, 0.2, n_one=4, n_two=4, n_captions=100, n_real=64)
    assert held.scenes is None
    assert held.captions == expected and len(set(held.captions)) == len(held.captions)
    assert len(held.captions) < len(held_keys)  # the repeated caption was counted once
    assert held.samples_seen == len(held_keys)
    assert len(held.real_holdout) == len(held_keys) and len(held.real_train) == 80 - len(held_keys)
    assert held.real_holdout[0].shape == (64, 64, 3)
    assert held_out_set(shards, 0.2, 4, 4, n_captions=3, n_real=64).captions == expected[:3]


def test_held_out_scenes_with_ground_truth(tmp_path):
    from stages.data import write_shapes_shard

    folder = str(tmp_path / "shapes")
    write_shapes_shard(folder, 0, 0, 60, 0, 32, 1, "png", 60,
                       {"two_object_prob": 0.5, "size_word_prob": 0.5, "position_word_prob": 0.5})
    held = held_out_set(list_shards(folder), 0.3, n_one=2, n_two=2, n_captions=50, n_real=64)
    assert held.scenes is not None and len(held.scenes) == 4
    assert [len(s.objects) for s in held.scenes] == [1, 1, 2, 2]
    assert held.captions == [s.caption for s in held.scenes]


def _cfg(**kw):
    from omegaconf import OmegaConf

    base = {"grid_source": "auto", "grid_rows": 2, "grid_prompts": ["a red circle", "a blue square"]}
    return OmegaConf.create({**base, **kw})


def test_grid_rows_follow_the_data():
    from stages.evaluate import grid_prompts
    from unclip.eval.heldout import HeldOut

    real = HeldOut(["a teal haze", "olive stripes", "beige noise"], None)
    scene = shapes.Scene.from_json({"caption": "a red circle", "relation": None, "objects": []})
    truth = HeldOut(["a red circle"], [scene])
    assert grid_prompts(_cfg(), real) == ["a teal haze", "olive stripes"]
    assert grid_prompts(_cfg(), truth) == ["a red circle", "a blue square"]
    assert grid_prompts(_cfg(grid_prompts=None), truth) == ["a red circle"]
    assert grid_prompts(_cfg(grid_source="prompts"), real) == ["a red circle", "a blue square"]
    assert grid_prompts(_cfg(grid_source="holdout", grid_rows=5), truth) == ["a red circle"]
    with pytest.raises(ValueError, match="grid_source=sometimes"):
        grid_prompts(_cfg(grid_source="sometimes"), real)
    with pytest.raises(ValueError, match="grid_prompts is empty"):
        grid_prompts(_cfg(grid_source="prompts", grid_prompts=[]), real)


def test_table_and_summary_without_ground_truth_or_fd():
    from stages.evaluate import format_table, summary

    m = {"n_captions": 3, "ground_truth": False, "clip_score": 0.25, "fd_clip_real": 0.5,
         "fd_clip_n_generated": 1, "fd_clip_n_real": 4,
         "fd_clip_skipped": "fd_clip_generated: 1 against 4 held-out real images"}
    table = format_table(m)
    assert "colour" not in table and "0.250" in table and "real vs real: 0.500" in table
    assert "skipped: fd_clip_generated: 1 against 4" in table
    assert summary(m) == "3 held-out captions (no ground truth): CLIP score 0.250, FD (CLIP) skipped"


def test_shapes_evaluate_keeps_the_detector_metrics(smoke_run):
    """On shapes data (a ground truth) every metric name of before is still there, beside the new."""
    m = json.loads((smoke_run / "evaluate" / "manifest.json").read_text())["metrics"]
    for k in ("n_one_object", "n_two_objects", "one_object_color", "two_objects_binding", "all_color",
              "all_shape", "all_position", "clip_score", "fd_clip_generated", "fd_clip_real",
              "resolution"):
        assert k in m, k
    assert m["ground_truth"] is True and m["n_captions"] == m["n_one_object"] + m["n_two_objects"] == 8
    rows = (smoke_run / "evaluate" / "grid_prompts.txt").read_text().splitlines()
    assert rows == ["a red circle", "a blue square to the left of a green triangle"]  # smoke preset's


def _tiny_clip():
    """An untrained CLIP of the smoke preset's size: real encoders, no weights to download."""
    from unclip.models.clip import ClipEncoder, create_custom

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}
    return ClipEncoder(create_custom(cfg), {"source": "test"}, cfg)


def test_reference_free_metrics_on_small_sets():
    from unclip.eval.reference_free import reference_free_metrics

    clip = _tiny_clip()
    pics = [texture(i) for i in range(12)]
    gen, caps = [p[0] for p in pics[:4]], [p[1] for p in pics[:4]]
    real = [np.asarray(p[0]) for p in pics[4:]]
    m = reference_free_metrics(clip, gen, caps, real[:4], real[4:])
    assert -1 <= m["clip_score"] <= 1 and m["fd_clip_generated"] > 0 and m["fd_clip_real"] > 0
    assert (m["fd_clip_n_generated"], m["fd_clip_n_real"]) == (4, 4)
    # one held-out image and no training image: the FDs are skipped, with the reason, no crash
    m = reference_free_metrics(clip, gen, caps, real[:1], [])
    assert "fd_clip_generated" not in m and "fd_clip_real" not in m and m["fd_clip_n_real"] == 0
    assert "0 held-out real images" in m["fd_clip_skipped"]
    with pytest.raises(ValueError, match="4 images for 3 captions"):
        reference_free_metrics(clip, gen, caps[:3], real, real)
