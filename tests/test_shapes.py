"""The synthetic shapes data set: determinism, caption vocabulary, geometry and rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unclip.data import shapes
from unclip.data.shapes import (BACKGROUND, COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, Scene,
                                generate, parse_caption, render, sample_scene)

VOCAB = ({"a"} | set(SIZES) | set(COLORS) | set(SHAPES)
         | {w for p in POSITIONS for w in p.split()} | {w for r in RELATIONS for w in r.split()})


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(1234)
    return [sample_scene(rng) for _ in range(3000)]


def _cell(x: float, y: float) -> str:
    """Grid cell name of a point, computed independently of the module under test."""
    col = "left" if x < 1 / 3 else ("" if x < 2 / 3 else "right")
    row = "top" if y < 1 / 3 else ("" if y < 2 / 3 else "bottom")
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    return f"on the {col}" if col else "in the center"


def test_vocabulary_is_the_spec():
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"}
    assert SHAPES == ("circle", "square", "triangle", "star")
    assert SIZES == ("small", "large")
    assert RELATIONS == ("above", "below", "left of", "right of")
    assert BACKGROUND == (128, 128, 128)
    assert len(POSITIONS) == 9
    for name, (x, y) in POSITIONS.items():
        assert _cell(x, y) == name
    rgb = np.array(list(COLORS.values()) + [BACKGROUND], float)
    dists = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert dists[~np.eye(len(rgb), dtype=bool)].min() > 90  # well separated, also from the grey


def test_generate_is_deterministic_per_seed_and_index():
    for index in range(8):
        a, b = generate(7, index, 64), generate(7, index, 64)
        assert a[0].tobytes() == b[0].tobytes()
        assert a[1] == b[1] and a[2] == b[2]
    differ = sum(generate(7, i, 64)[0].tobytes() != generate(8, i, 64)[0].tobytes()
                 for i in range(20))
    assert differ >= 18
    assert len({generate(7, i, 64)[1] for i in range(20)}) >= 15


def test_generate_returns_consistent_triple():
    img, caption, gt = generate(0, 3, 48)
    assert img.size == (48, 48) and img.mode == "RGB"
    assert gt["caption"] == caption
    scene = Scene.from_json(json.loads(json.dumps(gt)))
    assert render(scene, 48).tobytes() == img.tobytes()


def test_json_round_trip(scenes):
    for s in scenes[:200]:
        d = json.loads(json.dumps(s.to_json()))
        assert Scene.from_json(d) == s
        assert d["caption"] == s.caption and d["relation"] == s.relation


def test_captions_use_only_the_vocabulary_and_match_the_ground_truth(scenes):
    for s in scenes:
        assert s.caption == s.caption.lower() and s.caption.strip() == s.caption
        assert set(s.caption.split()) <= VOCAB, s.caption
        parsed = parse_caption(s.caption)
        assert parsed["relation"] == s.relation
        assert len(parsed["objects"]) == len(s.objects)
        for p, o in zip(parsed["objects"], s.objects):
            assert (p["color"], p["shape"]) == (o.color, o.shape)
            assert p["size"] in (None, o.size)
            assert p["position"] in (None, o.position)


def test_caption_forms_all_occur(scenes):
    forms = set()
    for s in scenes:
        p = parse_caption(s.caption)
        o = p["objects"][0]
        forms.add((len(p["objects"]), o["size"] is not None, o["position"] is not None))
    assert forms == {(1, False, False), (1, True, False), (1, False, True), (1, True, True),
                     (2, False, False), (2, True, False)}


def test_parse_caption_rejects_other_text():
    for bad in ("a red", "the red circle", "a red circle at the middle", "a red circle above",
                "A red circle", "a pink circle", "a red circle near a blue star"):
        with pytest.raises(ValueError):
            parse_caption(bad)
    assert parse_caption("a small blue square at the top left")["objects"][0] == {
        "size": "small", "color": "blue", "shape": "square", "position": "at the top left"}


def test_word_probabilities_are_respected():
    rng = np.random.default_rng(0)
    singles = [sample_scene(rng, two_object_prob=0.0, size_word_prob=1.0, position_word_prob=0.0)
               for _ in range(100)]
    assert all(len(s.objects) == 1 for s in singles)
    assert all(s.caption.split()[1] in SIZES for s in singles)
    assert all(not s.caption.endswith(s.objects[0].position) for s in singles)
    pairs = [sample_scene(rng, two_object_prob=1.0, size_word_prob=0.0) for _ in range(100)]
    assert all(len(s.objects) == 2 and s.relation in RELATIONS for s in pairs)
    assert all(not set(s.caption.split()) & set(SIZES) for s in pairs)


def test_distribution_covers_the_vocabulary(scenes):
    objs = [o for s in scenes for o in s.objects]
    assert {o.color for o in objs} == set(COLORS)
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.size for o in objs} == set(SIZES)
    assert {o.position for o in objs} == set(POSITIONS)
    assert {s.relation for s in scenes} == set(RELATIONS) | {None}
    n_pairs = sum(len(s.objects) == 2 for s in scenes)
    assert 0.4 < n_pairs / len(scenes) < 0.6
    # Single objects are spread evenly over the 9 cells.
    cells = [s.objects[0].position for s in scenes if len(s.objects) == 1]
    counts = np.array([cells.count(p) for p in POSITIONS])
    assert counts.min() > 0.6 * len(cells) / 9


def test_two_objects_differ_and_binding_cases_occur(scenes):
    pairs = [s.objects for s in scenes if len(s.objects) == 2]
    assert all((a.color, a.shape) != (b.color, b.shape) for a, b in pairs)
    assert sum(a.shape == b.shape for a, b in pairs) > 0.15 * len(pairs)  # same shape, two colours


def test_relation_holds_with_a_margin(scenes):
    gap = 0.04
    for s in scenes:
        if s.relation is None:
            continue
        a, b = s.objects
        holds = {"above": a.cy + a.radius + gap <= b.cy - b.radius,
                 "below": a.cy - a.radius >= b.cy + b.radius + gap,
                 "left of": a.cx + a.radius + gap <= b.cx - b.radius,
                 "right of": a.cx - a.radius >= b.cx + b.radius + gap}
        assert holds[s.relation], s.to_json()
        # The named relation is also the obvious reading: its axis dominates the centre offset.
        dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
        assert (dy > dx) if s.relation in ("above", "below") else (dx > dy)


def test_objects_inside_image_not_overlapping_and_in_their_cell(scenes):
    for s in scenes:
        for o in s.objects:
            assert o.radius <= o.cx <= 1 - o.radius and o.radius <= o.cy <= 1 - o.radius
            assert o.position == _cell(o.cx, o.cy)
        if len(s.objects) == 2:
            a, b = s.objects
            apart_x = abs(a.cx - b.cx) >= a.radius + b.radius
            apart_y = abs(a.cy - b.cy) >= a.radius + b.radius
            assert apart_x or apart_y


def test_sizes_are_clearly_different(scenes):
    for n in (1, 2):
        objs = [o for s in scenes if len(s.objects) == n for o in s.objects]
        small = max(o.radius for o in objs if o.size == "small")
        large = min(o.radius for o in objs if o.size == "large")
        assert large > 1.25 * small


def test_centre_pixel_has_the_object_colour_and_background_is_grey(scenes):
    res = 64
    checked = 0
    for s in scenes[:300]:
        arr = np.asarray(render(s, res))
        covered = np.zeros((res, res), bool)
        yy, xx = (np.mgrid[0:res, 0:res] + 0.5) / res
        for o in s.objects:
            reach = o.radius + 1.5 / res
            covered |= (np.abs(xx - o.cx) <= reach) & (np.abs(yy - o.cy) <= reach)
            if o.shape in ("circle", "square"):
                px = arr[int(o.cy * res), int(o.cx * res)]
                assert tuple(px) == COLORS[o.color], (s.caption, px)
                checked += 1
        assert (arr[~covered] == BACKGROUND).all()
    assert checked > 100


def test_render_is_antialiased():
    s = Scene([shapes.ShapeObject("red", "circle", "large", "in the center", 0.5, 0.5, 0.2)], None,
              "a large red circle")
    palette = {tuple(c) for c in COLORS.values()} | {BACKGROUND}
    soft = {tuple(p) for p in np.asarray(render(s, 64)).reshape(-1, 3)}
    hard = {tuple(p) for p in np.asarray(render(s, 64, supersample=1)).reshape(-1, 3)}
    assert hard <= palette
    assert len(soft - palette) > 5


@pytest.mark.parametrize("resolution", [16, 17, 31, 32, 64, 100, 256, 1024])
def test_all_resolutions_render(resolution):
    img, caption, gt = generate(11, resolution, resolution, two_object_prob=1.0)
    assert img.size == (resolution, resolution) and img.mode == "RGB"
    arr = np.asarray(img)
    for o in gt["objects"]:  # every object is visible, even at 16 px
        y, x = int(o["cy"] * resolution), int(o["cx"] * resolution)
        assert tuple(arr[y, x]) != BACKGROUND
