"""The embedded synthetic data set: coloured shapes on grey, compositional captions, ground truth.

Every image is drawn from a :class:`Scene` that records what is in it, so generated images can be
scored exactly (see :mod:`unclip.eval.detector`). The vocabulary below is binding (SPEC.md, "The
synthetic data set"): tests outside the project rely on these exact words.

Geometry, all normalized to the image side with y pointing down: an object's ``(cx, cy)`` is the
centre of the axis-aligned square of half-side ``radius`` that the shape is inscribed in (circle:
that square's incircle; square: the square itself; triangle: apex at the top middle, base along the
bottom edge; star: five points, one pointing up, vertically centred in the square). Shapes are never
rotated, so a detector can tell them apart from their silhouettes.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Saturated and far apart, from each other and from the grey background (a detector assigns pixels
# to the nearest colour, anti-aliased edges lie between a colour and the grey).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (250, 230, 30),
    "purple": (160, 40, 220),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
# The 3x3 grid cells, named as in captions, with their centres (x, y), y down.
POSITIONS: dict[str, tuple[float, float]] = {
    "at the top left": (1 / 6, 1 / 6),
    "at the top": (1 / 2, 1 / 6),
    "at the top right": (5 / 6, 1 / 6),
    "on the left": (1 / 6, 1 / 2),
    "in the center": (1 / 2, 1 / 2),
    "on the right": (5 / 6, 1 / 2),
    "at the bottom left": (1 / 6, 5 / 6),
    "at the bottom": (1 / 2, 5 / 6),
    "at the bottom right": (5 / 6, 5 / 6),
}
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

# Radius ranges (half-side of the bounding square) for one object; two-object scenes scale them.
RADII: dict[str, tuple[float, float]] = {"small": (0.10, 0.13), "large": (0.18, 0.22)}
PAIR_SCALE = 0.85          # radii of two-object scenes, relative to single objects
CELL_MARGIN = 0.03         # single objects keep their centre this far inside their grid cell
RELATION_GAP = 0.05        # "A above B": A's bottom edge at least this far above B's top edge
RELATION_DOMINANCE = 0.75  # off-axis centre offset at most this fraction of the on-axis one
STAR_INNER = 0.5           # inner/outer radius of the star: chunky enough to survive 32 px
_STAR_DROP = (1 - math.cos(math.pi / 5)) / 2  # shifts the star down so its extent is centred


@dataclass
class ShapeObject:
    """One drawn object; ``position`` is the name of the grid cell its centre lies in."""

    color: str
    shape: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float


@dataclass
class Scene:
    """What an image shows: one or two objects, the relation between them (two only), the caption.

    For two objects the caption reads "<objects[0]> <relation> <objects[1]>".
    """

    objects: list[ShapeObject] = field(default_factory=list)
    relation: str | None = None
    caption: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"caption": self.caption, "relation": self.relation,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scene:
        return cls(objects=[ShapeObject(**o) for o in d["objects"]], relation=d.get("relation"),
                   caption=d["caption"])


def position_of(cx: float, cy: float) -> str:
    """The name of the 3x3 grid cell that the point (cx, cy) lies in."""
    col = min(max(int(cx * 3), 0), 2)
    row = min(max(int(cy * 3), 0), 2)
    return list(POSITIONS)[row * 3 + col]


def _phrase(obj: ShapeObject, with_size: bool) -> str:
    return f"a {obj.size} {obj.color} {obj.shape}" if with_size else f"a {obj.color} {obj.shape}"


def _sample_radius(rng: np.random.Generator, size: str, scale: float = 1.0) -> float:
    lo, hi = RADII[size]
    return float(rng.uniform(lo, hi)) * scale


def _sample_single(rng: np.random.Generator, size_word_prob: float,
                   position_word_prob: float) -> Scene:
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(SIZES))
    r = _sample_radius(rng, size)
    cell = int(rng.integers(9))
    row, col = divmod(cell, 3)
    centre = []
    for k in (col, row):
        # Inside the cell (minus a margin at inner cell borders) and fully inside the image.
        lo = max(k / 3 + (CELL_MARGIN if k > 0 else 0.0), r)
        hi = min((k + 1) / 3 - (CELL_MARGIN if k < 2 else 0.0), 1 - r)
        centre.append(float(rng.uniform(lo, hi)))
    cx, cy = centre
    obj = ShapeObject(color, shape, size, position_of(cx, cy), cx, cy, r)
    caption = _phrase(obj, rng.random() < size_word_prob)
    if rng.random() < position_word_prob:
        caption += " " + obj.position
    return Scene([obj], None, caption)


def relation_holds(relation: str, a: tuple[float, float, float], b: tuple[float, float, float],
                   gap: float = 0.0, dominance: float | None = None) -> bool:
    """Whether "A <relation> B" holds for bounding squares a, b = (cx, cy, radius).

    A's facing edge must clear B's by ``gap``; with ``dominance`` the off-axis centre offset must
    also be at most that fraction of the on-axis one, so the relation is the obvious reading.
    """
    (ax, ay, ar), (bx, by, br) = a, b
    if relation == "above":
        clear, along, across = (by - br) - (ay + ar), by - ay, ax - bx
    elif relation == "below":
        clear, along, across = (ay - ar) - (by + br), ay - by, ax - bx
    elif relation == "left of":
        clear, along, across = (bx - br) - (ax + ar), bx - ax, ay - by
    elif relation == "right of":
        clear, along, across = (ax - ar) - (bx + br), ax - bx, ay - by
    else:
        raise ValueError(f"unknown relation {relation!r}")
    if clear < gap:
        return False
    return dominance is None or abs(across) <= dominance * along


def _place_pair(rng: np.random.Generator, relation: str, ra: float,
                rb: float) -> tuple[float, float, float, float, float, float]:
    """Centres (and radii, shrunk if need be) for A and B so that "A <relation> B" clearly holds."""
    while True:
        for _ in range(8):  # batches of candidates; uniform rejection sampling keeps it simple
            n = 64
            ax, ay = rng.uniform(ra, 1 - ra, size=(2, n))
            bx, by = rng.uniform(rb, 1 - rb, size=(2, n))
            for i in range(n):
                if relation_holds(relation, (ax[i], ay[i], ra), (bx[i], by[i], rb),
                                  RELATION_GAP, RELATION_DOMINANCE):
                    return float(ax[i]), float(ay[i]), ra, float(bx[i]), float(by[i]), rb
        ra, rb = ra * 0.9, rb * 0.9  # practically never needed at the default radii


def _sample_pair(rng: np.random.Generator, size_word_prob: float) -> Scene:
    relation = str(rng.choice(RELATIONS))
    color_a, shape_a = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    while True:  # differ in colour or shape; same shape in two colours is the binding case
        color_b, shape_b = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        if (color_b, shape_b) != (color_a, shape_a):
            break
    size_a, size_b = str(rng.choice(SIZES)), str(rng.choice(SIZES))
    ra = _sample_radius(rng, size_a, PAIR_SCALE)
    rb = _sample_radius(rng, size_b, PAIR_SCALE)
    ax, ay, ra, bx, by, rb = _place_pair(rng, relation, ra, rb)
    a = ShapeObject(color_a, shape_a, size_a, position_of(ax, ay), ax, ay, ra)
    b = ShapeObject(color_b, shape_b, size_b, position_of(bx, by), bx, by, rb)
    with_size = bool(rng.random() < size_word_prob)
    caption = f"{_phrase(a, with_size)} {relation} {_phrase(b, with_size)}"
    return Scene([a, b], relation, caption)


def sample_scene(rng: np.random.Generator, two_object_prob: float = 0.5,
                 size_word_prob: float = 0.5, position_word_prob: float = 0.5) -> Scene:
    """A random scene. Words are optional in captions; the ground truth always holds everything.

    One object: "a [size] <colour> <shape> [<position>]". Two objects:
    "a [size] <colour> <shape> <relation> a [size] <colour> <shape>" (size words on both or none).
    """
    if rng.random() < two_object_prob:
        return _sample_pair(rng, size_word_prob)
    return _sample_single(rng, size_word_prob, position_word_prob)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape (square, triangle, star) in the coordinates of cx, cy, r."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        oy = cy + _STAR_DROP * r  # circumcentre, so the star's vertical extent is centred on cy
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * STAR_INNER
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), oy + rad * math.sin(ang)))
        return pts
    raise ValueError(f"not a polygon shape: {shape!r}")


def render(scene: Scene, resolution: int, supersample: int = 4) -> Image.Image:
    """Draw the scene as an RGB image, anti-aliased by drawing ``supersample`` times larger and
    box-filtering down (PIL draws hard edges only)."""
    if resolution < 1 or supersample < 1:
        raise ValueError("resolution and supersample must be positive")
    side = resolution * supersample
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        # Pixel i covers [i, i+1); PIL rasterizes at integer coordinates: shift by half a pixel.
        cx, cy, r = obj.cx * side - 0.5, obj.cy * side - 0.5, obj.radius * side
        if obj.shape == "circle":
            draw.ellipse([cx - r + 0.5, cy - r + 0.5, cx + r - 0.5, cy + r - 0.5], fill=fill)
        else:
            draw.polygon(shape_polygon(obj.shape, cx, cy, r), fill=fill)
    return canvas.reduce(supersample) if supersample > 1 else canvas


def generate(seed: int, index: int, resolution: int,
             **scene_kwargs: Any) -> tuple[Image.Image, str, dict[str, Any]]:
    """Sample ``index`` of the data set ``seed``: (image, caption, ground truth as JSON).

    Deterministic per (seed, index) and independent of any other index, so shards can be made in
    parallel in any order.
    """
    scene = sample_scene(np.random.default_rng([seed, index]), **scene_kwargs)
    return render(scene, resolution), scene.caption, scene.to_json()


def _alt(words: Any) -> str:
    """A regex alternation of the words, longest first ("at the top left" before "at the top")."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJ = rf"a (?:({_alt(SIZES)}) )?({_alt(COLORS)}) ({_alt(SHAPES)})"
_SINGLE_RE = re.compile(rf"{_OBJ}(?: ({_alt(POSITIONS)}))?")
_PAIR_RE = re.compile(rf"{_OBJ} ({_alt(RELATIONS)}) {_OBJ}")


def parse_caption(caption: str) -> dict[str, Any]:
    """Read a caption of this data set back into its parts; raises ValueError if it is not one.

    Returns ``{"objects": [{"size", "color", "shape", "position"}, ...], "relation"}`` with None
    for words the caption leaves out. Useful to score hand-written prompts in this vocabulary.
    """
    m = _PAIR_RE.fullmatch(caption)
    if m:
        g = m.groups()
        objs = [dict(size=g[0], color=g[1], shape=g[2], position=None),
                dict(size=g[4], color=g[5], shape=g[6], position=None)]
        return {"objects": objs, "relation": g[3]}
    m = _SINGLE_RE.fullmatch(caption)
    if m:
        size, color, shape, position = m.groups()
        return {"objects": [dict(size=size, color=color, shape=shape, position=position)],
                "relation": None}
    raise ValueError(f"not a caption of the shapes data set: {caption!r}")
