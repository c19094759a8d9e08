"""A detector for images of the shapes data set, and exact scores of images against their scenes.

It reads generated images, which are blurry and noisy, so it works from robust pixel statistics and
scale-invariant silhouette features rather than exact templates:

1. Each pixel is explained as the grey background mixed with one palette colour (that is what an
   anti-aliased or blurred edge is): for every colour we take the closest point on the segment from
   grey to that colour; the colour with the closest segment wins, and the pixel is foreground when
   it is at least half-way along that segment and not far off it.
2. Connected components per colour; components smaller than half the smallest object the data set
   draws are noise and are dropped.
3. The shape of a component comes from its rotational harmonics: for the (soft) silhouette around
   its centroid, a_k = |sum w r^k e^(ik theta)| / sum w r^k. A circle has none, a square a strong
   4th, an upright triangle a strong 3rd, a five-pointed star a strong 5th. These are
   scale-invariant, integrate over every pixel (so noise averages out) and degrade gracefully
   under blur, unlike corner- or outline-based features. Weights are the pixels' partial
   coverage, so the anti-aliased fringe of a 32 px object still carries its shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from unclip.data.shapes import (BACKGROUND, COLORS, PAIR_SCALE, RADII, STAR_INNER, Scene,
                                position_of)

_NAMES = list(COLORS)
_DIRS = np.array([COLORS[n] for n in _NAMES], np.float32) - np.array(BACKGROUND, np.float32)
_DIR_SQ = (_DIRS**2).sum(1)

MIN_ALPHA = 0.5       # foreground: at least half-way from grey to the colour (the edge of a shape)
MAX_RESIDUAL = 70.0   # ... and at most this far (RGB units) from the grey-to-colour segment
# Smallest object drawn: a small star in a two-object scene, area ~1.47 r^2 (r = half-side).
_STAR_AREA = 5 * STAR_INNER * math.sin(math.pi / 5)
MIN_AREA_FRAC = 0.5 * _STAR_AREA * (RADII["small"][0] * PAIR_SCALE) ** 2
MIN_AREA_PX = 5     # at 32 px pure noise makes many 3-4 pixel blobs

# Harmonic thresholds, tuned on renders at 32-128 px, clean, blurred (radius 1) and noisy (sigma
# 10). Clean renders give a3 ~0.65 (triangle), a4 ~0.43 (square), a5 ~0.75 (star), circles < 0.1.
TRIANGLE_MIN_A3 = 0.20
SQUARE_MIN_A4 = 0.15
STAR_MIN_A5 = 0.15
SOFT_FLOOR = 0.2      # coverage below this (background noise) carries no weight in the harmonics
FRINGE_PX = 2         # how far around a component its anti-aliased fringe is collected


@dataclass
class Detection:
    """One detected object, normalized like :class:`~unclip.data.shapes.ShapeObject`.

    ``(cx, cy)`` is the centre of its bounding box, ``radius`` half the longer box side, ``area``
    the fraction of the image it covers, ``position`` the grid cell of its centre.
    """

    color: str
    shape: str
    cx: float
    cy: float
    radius: float
    area: float
    position: str


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    return arr.astype(np.float32)


def colour_map(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the index into ``COLORS`` of the colour it shows (-1 for background), and for
    every colour how far along the grey-to-colour segment it lies (coverage, HxWxK in [0, 1])."""
    p = _as_array(image) - np.array(BACKGROUND, np.float32)          # H,W,3
    dot = p @ _DIRS.T                                                # H,W,K
    alpha = np.clip(dot / _DIR_SQ, 0.0, 1.0)
    resid_sq = (p**2).sum(-1, keepdims=True) - 2 * alpha * dot + alpha**2 * _DIR_SQ
    best = resid_sq.argmin(-1)
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    r = np.take_along_axis(resid_sq, best[..., None], -1)[..., 0]
    fg = (a >= MIN_ALPHA) & (r <= MAX_RESIDUAL**2)
    return np.where(fg, best, -1), alpha


def harmonics(weights: np.ndarray, ks: Sequence[int] = (3, 4, 5)) -> dict[str, float]:
    """Rotational harmonic strengths a_k (0 = none, 1 = all weight on k spokes) of a soft mask."""
    ys, xs = np.nonzero(weights > 0)
    w = weights[ys, xs].astype(np.float64)
    x, y = xs + 0.5, ys + 0.5
    x, y = x - (w * x).sum() / w.sum(), y - (w * y).sum() / w.sum()
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    out = {}
    for k in ks:
        wr = w * r**k
        out[f"a{k}"] = float(abs((wr * np.exp(1j * k * theta)).sum()) / max(wr.sum(), 1e-12))
    return out


def classify_shape(f: dict[str, float]) -> str:
    """The shape whose harmonic is strongest relative to its threshold; a circle if none passes."""
    ratios = {"triangle": f["a3"] / TRIANGLE_MIN_A3, "square": f["a4"] / SQUARE_MIN_A4,
              "star": f["a5"] / STAR_MIN_A5}
    best = max(ratios, key=ratios.__getitem__)
    return best if ratios[best] >= 1.0 else "circle"


def _soft_mask(labels: np.ndarray, coverage: np.ndarray, comp: np.ndarray, i: int,
               sl: tuple[slice, slice]) -> np.ndarray:
    """The component's coverage, including its sub-threshold fringe but no other object's pixels."""
    h, w = labels.shape
    y0, y1 = max(sl[0].start - FRINGE_PX, 0), min(sl[0].stop + FRINGE_PX, h)
    x0, x1 = max(sl[1].start - FRINGE_PX, 0), min(sl[1].stop + FRINGE_PX, w)
    mask = comp[y0:y1, x0:x1] == i
    near = ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=FRINGE_PX)
    near &= mask | (labels[y0:y1, x0:x1] < 0)
    soft = np.clip((coverage[y0:y1, x0:x1] - SOFT_FLOOR) / (1 - SOFT_FLOOR), 0.0, 1.0)
    return np.where(near, soft, 0.0)


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """The objects in an image, largest first."""
    labels, alpha = colour_map(image)
    h, w = labels.shape
    min_area = max(MIN_AREA_PX, MIN_AREA_FRAC * h * w)
    out: list[Detection] = []
    for k in np.unique(labels):
        if k < 0:
            continue
        comp, _ = ndimage.label(labels == k, structure=np.ones((3, 3), bool))
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            area = int((comp[sl] == i).sum())
            if area < min_area:
                continue
            shape = classify_shape(harmonics(_soft_mask(labels, alpha[..., k], comp, i, sl)))
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
            out.append(Detection(color=_NAMES[k], shape=shape, cx=cx, cy=cy,
                                 radius=max((x1 - x0) / w, (y1 - y0) / h) / 2,
                                 area=area / (h * w), position=position_of(cx, cy)))
    out.sort(key=lambda d: d.area, reverse=True)
    return out


def detected_relation(a: Detection, b: Detection) -> str:
    """How A lies relative to B, read along the axis where their centres differ most."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def _match(obj: Any, d: Detection) -> int:
    return 2 * (d.color == obj.color) + (d.shape == obj.shape)


def _assign(scene: Scene, dets: list[Detection]) -> list[Detection | None]:
    """One distinct detection per scene object, maximizing colour (2) + shape (1) agreement.

    Ties go to the larger detection (``dets`` is sorted by area). An object matched by nothing
    that agrees in colour or shape gets None.
    """
    objs = scene.objects
    if len(objs) == 1:
        best = max(dets, key=lambda d: _match(objs[0], d), default=None)
        return [best if best is not None and _match(objs[0], best) > 0 else None]
    best_pair, best_score = (None, None), 0
    for i, da in enumerate(dets):
        for j, db in enumerate(dets):
            s = _match(objs[0], da) + _match(objs[1], db)
            if i != j and s > best_score and _match(objs[0], da) > 0 and _match(objs[1], db) > 0:
                best_pair, best_score = (da, db), s
    return list(best_pair)


def _position_scored(scene: Scene) -> bool:
    """Single objects are scored on position only when the caption names it."""
    return len(scene.objects) > 1 or scene.caption.endswith(" " + scene.objects[0].position)


def score_scene(scene: Scene, detections: list[Detection],
                captioned_only: bool = True) -> dict[str, float | None]:
    """Scores of one image against its scene; None where a score does not apply.

    * ``color``: fraction of scene objects whose colour any detection has.
    * ``shape``: fraction of scene objects whose shape any detection has.
    * ``object``: fraction of scene objects for which one detection has both colour and shape.
    * ``position``: each scene object is matched to a distinct detection (colour agreement counts
      2, shape 1, ties to the larger; one with neither cannot match). One object: 1 if its match
      lies in the object's grid cell. Two objects: 1 if both are matched and the relation of their
      centres (along the axis where they differ most) is the scene's relation. With
      ``captioned_only`` a single object whose caption names no position scores None (the image
      is free to put it anywhere); the ground truth itself always holds the true cell.
    * ``binding`` (two objects only, else None): 1 if each object's colour+shape is on some
      detection and no detection shows a swapped pair (A's colour with B's shape or vice versa)
      that is not itself one of the two objects.
    * ``count_ok``: 1 if there are exactly as many detections as scene objects.
    """
    objs = scene.objects
    n = len(objs)
    has = [(d.color, d.shape) for d in detections]
    colors, shapes = {d.color for d in detections}, {d.shape for d in detections}
    found = [(o.color, o.shape) in has for o in objs]
    scores: dict[str, float | None] = {
        "color": sum(o.color in colors for o in objs) / n,
        "shape": sum(o.shape in shapes for o in objs) / n,
        "object": sum(found) / n,
    }
    matched = _assign(scene, detections)
    position: float | None
    if n == 1:
        m = matched[0]
        position = float(m is not None and m.position == objs[0].position)
    else:
        a, b = matched
        position = float(a is not None and b is not None
                         and detected_relation(a, b) == scene.relation)
    if captioned_only and not _position_scored(scene):
        position = None
    scores["position"] = position
    if n == 2:
        a, b = objs
        real = {(a.color, a.shape), (b.color, b.shape)}
        swapped = {(a.color, b.shape), (b.color, a.shape)} - real
        scores["binding"] = float(all(found) and not any(h in swapped for h in has))
    else:
        scores["binding"] = None
    scores["count_ok"] = float(len(detections) == n)
    return scores


SCORE_KEYS = ("color", "shape", "object", "position", "binding", "count_ok")


def accuracy(scenes: Sequence[Scene], images: Sequence[Image.Image | np.ndarray],
             captioned_only: bool = True) -> dict[str, float]:
    """Mean of each score over the images where it applies (NaN where it applies to none)."""
    if len(scenes) != len(images):
        raise ValueError(f"{len(scenes)} scenes but {len(images)} images")
    sums = {k: 0.0 for k in SCORE_KEYS}
    counts = {k: 0 for k in SCORE_KEYS}
    for scene, image in zip(scenes, images):
        for k, v in score_scene(scene, detect(image), captioned_only).items():
            if v is not None:
                sums[k] += v
                counts[k] += 1
    return {k: sums[k] / counts[k] if counts[k] else float("nan") for k in SCORE_KEYS}
