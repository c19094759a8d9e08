"""Scores that need no ground truth: CLIP score against the prompts and a Frechet distance on CLIP
image features against real images. They work on any captioned data, the shapes set included."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger("unclip")

MIN_FD_ROWS = 2  # a covariance needs two rows; fewer and the distance is skipped with a reason


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows).

    tr(sqrt(S1 S2)) is computed as the trace of sqrt(sqrt(S1) S2 sqrt(S1)), a symmetric PSD matrix,
    so rank-deficient covariances (fewer rows than features, as in small evaluations) give a real,
    non-negative answer instead of sqrtm's complex noise.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: expected two (N, D) feature sets with the same D, got "
                         f"{a.shape} and {b.shape}")
    if min(len(a), len(b)) < MIN_FD_ROWS:
        raise ValueError(f"frechet_distance: needs at least {MIN_FD_ROWS} rows per set, got "
                         f"{len(a)} and {len(b)}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r1 = _psd_sqrt(s1)
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # rounding can leave a tiny negative for (near) identical sets


def clip_score(image_features: np.ndarray, text_features: np.ndarray) -> float:
    """Mean cosine between each image's and its own prompt's (unit-norm) CLIP features."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"clip_score: {image_features.shape} image features against "
                         f"{text_features.shape} text features")
    return float((image_features * text_features).sum(1).mean())


def frechet_metrics(generated: np.ndarray, real_a: np.ndarray, real_b: np.ndarray) -> dict[str, Any]:
    """``fd_clip_generated`` (generated vs real_a) beside ``fd_clip_real`` (real_b vs real_a), with
    the row counts used. A distance without enough rows is left out and ``fd_clip_skipped`` says
    why, so a small data set still gets its other metrics."""
    out: dict[str, Any] = {"fd_clip_n_generated": len(generated), "fd_clip_n_real": len(real_a)}
    skipped = []
    for name, x in (("fd_clip_generated", generated), ("fd_clip_real", real_b)):
        if min(len(x), len(real_a)) < MIN_FD_ROWS:
            skipped.append(f"{name}: {len(x)} against {len(real_a)} held-out real images "
                           f"(a covariance needs {MIN_FD_ROWS} of each)")
            continue
        out[name] = frechet_distance(x, real_a)
    if skipped:
        out["fd_clip_skipped"] = "; ".join(skipped)
        log.warning("evaluate: Frechet distance skipped: %s", out["fd_clip_skipped"])
    return out


def _features(clip: Any, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    if not len(images):
        return np.zeros((0, clip.dim), np.float32)
    return clip.encode_images([im if isinstance(im, Image.Image) else Image.fromarray(im)
                               for im in images])


def reference_free_metrics(clip: Any, generated: Sequence[Image.Image], captions: Sequence[str],
                           real_holdout: Sequence[np.ndarray], real_train: Sequence[np.ndarray],
                           min_real: int = 64) -> dict[str, Any]:
    """CLIP score of ``generated`` against their ``captions``, and the FDs on ``clip``'s image
    features, with ``n`` real images a side: as many as both sides have, up to the larger of
    the generated count and ``min_real``."""
    if len(generated) != len(captions) or not len(generated):
        raise ValueError(f"reference_free_metrics: {len(generated)} images for {len(captions)} captions")
    gen_f = _features(clip, generated)
    n = min(len(real_holdout), len(real_train), max(len(generated), min_real))
    return {"clip_score": clip_score(gen_f, clip.encode_text(list(captions))),
            **frechet_metrics(gen_f, _features(clip, real_holdout[:n]), _features(clip, real_train[:n]))}
