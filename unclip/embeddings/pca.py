"""PCA of CLIP image embeddings, fitted out-of-core, plus the per-component quantizer of the AR prior.

The AR prior (Ramesh et al. 2022, sec. 2.2) predicts the leading principal components of z_i, each
quantized into ``num_buckets`` buckets (319 components x 1024 buckets in the paper). Nothing here
holds all rows at once:

* :class:`Moments` is a mergeable streaming accumulator of count, mean and centred scatter matrix
  (float64). It carries the same information as (count, sum, sum of outer products) but merges
  with Chan et al.'s pairwise update, so the covariance never comes from ``sum(x x^T) - n mu mu^T``,
  which cancels catastrophically for unit-norm embeddings whose mean is large next to the spread.
  Memory is O(dim^2) whatever the number of rows; partial moments from any number of blocks merge in
  any order.
* :func:`fit_from_moments` does one symmetric eigendecomposition.
* Bucket edges are quantiles of the projected training data, found without keeping the data:
  :class:`RangeAccumulator` (one pass: per-component min/max of the projections) and
  :class:`HistogramAccumulator` (another pass: per-component counts on a fine uniform grid between
  that min and max, ``hist_bins`` cells, 8 x num_buckets by default). A quantile is read off the
  cumulative histogram with linear interpolation inside a cell, so its error is below one grid cell
  (``(max - min) / hist_bins``) and in practice far smaller. Memory is O(n_components x hist_bins).

No Ray here: stages/pca.py distributes these accumulators over the embedding files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unclip import checkpoint

KIND = "pca"
HIST_OVERSAMPLE = 8  # default grid cells per bucket for the quantile histograms


# ----------------------------------------------------------------------------------------------
# Pass 1: moments


@dataclass
class Moments:
    """Streaming, mergeable first and second moments of rows of dimension ``dim`` (float64)."""

    dim: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    scatter: np.ndarray = field(default=None)  # type: ignore[assignment]  # sum (x-mean)(x-mean)^T

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, np.float64)
        if self.scatter is None:
            self.scatter = np.zeros((self.dim, self.dim), np.float64)

    @classmethod
    def of(cls, x: np.ndarray) -> "Moments":
        """Moments of one block of rows (n, dim)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"expected rows of shape (n, dim), got {x.shape}")
        m = cls(int(x.shape[1]))
        if len(x):
            m.count = int(x.shape[0])
            m.mean = x.mean(axis=0)
            xc = x - m.mean
            m.scatter = xc.T @ xc
        return m

    def update(self, x: np.ndarray) -> "Moments":
        """Add a block of rows; returns self."""
        return self.merge(Moments.of(x))

    def merge(self, other: "Moments") -> "Moments":
        """Combine with another accumulator (Chan et al.); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.scatter = other.count, other.mean.copy(), other.scatter.copy()
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        self.mean = self.mean + delta * (other.count / n)
        self.count = n
        return self

    @property
    def sum(self) -> np.ndarray:
        return self.mean * self.count

    @property
    def sum_outer(self) -> np.ndarray:
        """sum of x x^T over all rows (derived; not used for the fit)."""
        return self.scatter + self.count * np.outer(self.mean, self.mean)

    def covariance(self, ddof: int = 1) -> np.ndarray:
        if self.count <= ddof:
            raise ValueError(f"need more than {ddof} rows for a covariance, have {self.count}")
        return self.scatter / (self.count - ddof)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for shipping a partial result between processes, no pickle of classes)."""
        return {"count": np.array(self.count, np.int64), "mean": self.mean, "scatter": self.scatter}

    @classmethod
    def from_arrays(cls, d: dict[str, Any]) -> "Moments":
        mean = np.asarray(d["mean"], np.float64)
        return cls(int(mean.shape[0]), int(d["count"]), mean, np.asarray(d["scatter"], np.float64))


# ----------------------------------------------------------------------------------------------
# Pass 2: quantile edges


@dataclass
class RangeAccumulator:
    """Per-component min/max of projected rows; mergeable."""

    n: int
    lo: np.ndarray = field(default=None)  # type: ignore[assignment]
    hi: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.lo is None:
            self.lo = np.full(self.n, np.inf)
        if self.hi is None:
            self.hi = np.full(self.n, -np.inf)

    def update(self, coeffs: np.ndarray) -> "RangeAccumulator":
        if len(coeffs):
            self.lo = np.minimum(self.lo, coeffs.min(axis=0))
            self.hi = np.maximum(self.hi, coeffs.max(axis=0))
        return self

    def merge(self, other: "RangeAccumulator") -> "RangeAccumulator":
        self.lo = np.minimum(self.lo, other.lo)
        self.hi = np.maximum(self.hi, other.hi)
        return self


@dataclass
class HistogramAccumulator:
    """Per-component counts on a uniform grid of ``bins`` cells over [lo, hi]; mergeable."""

    lo: np.ndarray
    hi: np.ndarray
    bins: int
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.lo = np.asarray(self.lo, np.float64)
        self.hi = np.asarray(self.hi, np.float64)
        if self.counts is None:
            self.counts = np.zeros((len(self.lo), self.bins), np.int64)

    def update(self, coeffs: np.ndarray) -> "HistogramAccumulator":
        if not len(coeffs):
            return self
        k = len(self.lo)
        width = self.hi - self.lo
        scale = np.divide(self.bins, width, out=np.zeros_like(width), where=width > 0)
        cell = np.floor((coeffs - self.lo) * scale).astype(np.int64)
        np.clip(cell, 0, self.bins - 1, out=cell)  # max lands in the last cell; stray values clip
        flat = (cell + np.arange(k, dtype=np.int64) * self.bins).reshape(-1)
        self.counts += np.bincount(flat, minlength=k * self.bins).reshape(k, self.bins)
        return self

    def merge(self, other: "HistogramAccumulator") -> "HistogramAccumulator":
        self.counts += other.counts
        return self

    def quantile_edges(self, num_buckets: int) -> np.ndarray:
        """(k, num_buckets + 1) edges: min, the j/num_buckets quantiles, max (interpolated in cells)."""
        k = len(self.lo)
        edges = np.empty((k, num_buckets + 1), np.float64)
        probs = np.arange(1, num_buckets) / num_buckets
        for c in range(k):
            lo, hi, h = self.lo[c], self.hi[c], self.counts[c]
            total = h.sum()
            if total == 0 or hi <= lo:
                edges[c] = lo if np.isfinite(lo) else 0.0
                continue
            x = lo + (hi - lo) * np.arange(self.bins + 1) / self.bins
            cum = np.concatenate([[0], np.cumsum(h)]).astype(np.float64)
            edges[c, 1:-1] = np.interp(probs * total, cum, x)
            edges[c, 0], edges[c, -1] = lo, hi
        return np.maximum.accumulate(edges, axis=1)  # monotone even through empty cells


# ----------------------------------------------------------------------------------------------
# The fitted model


@dataclass
class PCA:
    """Mean, principal directions (rows, by decreasing variance) and the bucket quantizer."""

    mean: np.ndarray                       # (dim,)
    components: np.ndarray                 # (n_components, dim), orthonormal rows
    explained_variance: np.ndarray         # (dim,): variance along every direction, not only kept
    n_rows: int = 0
    bucket_edges: np.ndarray | None = None  # (n_components, num_buckets + 1)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def num_buckets(self) -> int | None:
        return None if self.bucket_edges is None else int(self.bucket_edges.shape[1] - 1)

    @property
    def total_variance(self) -> float:
        return float(self.explained_variance.sum())

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        total = self.total_variance
        return self.explained_variance / total if total > 0 else np.zeros_like(self.explained_variance)

    def n_components_for(self, ratio: float) -> int:
        """Fewest leading components whose explained variance is at least ``ratio`` of the total."""
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        cum = np.cumsum(self.explained_variance_ratio)
        # tolerance: ratio=1.0 must be reachable despite rounding in the cumulative sum
        return int(min(len(cum), np.searchsorted(cum, ratio - 1e-12) + 1))

    def truncated(self, n: int) -> "PCA":
        """The first ``n`` components (the AR prior's view); bucket edges follow."""
        if not 1 <= n <= self.n_components:
            raise ValueError(f"n_components must be in [1, {self.n_components}], got {n}")
        edges = None if self.bucket_edges is None else self.bucket_edges[:n].copy()
        return PCA(self.mean, self.components[:n].copy(), self.explained_variance, self.n_rows, edges)

    def transform(self, x: np.ndarray, n: int | None = None) -> np.ndarray:
        """Coefficients (rows, n) of ``x`` on the first ``n`` (default: all kept) components, float64."""
        comps = self.components if n is None else self.components[:n]
        return (np.asarray(x, np.float64) - self.mean) @ comps.T

    def inverse_transform(self, coeffs: np.ndarray) -> np.ndarray:
        """Embeddings from coefficients on the leading ``coeffs.shape[1]`` components."""
        coeffs = np.asarray(coeffs, np.float64)
        return coeffs @ self.components[: coeffs.shape[-1]] + self.mean

    # -- quantization --------------------------------------------------------------------------

    def _edges(self, k: int) -> np.ndarray:
        if self.bucket_edges is None:
            raise ValueError("this PCA has no bucket edges; fit them first")
        if k > self.bucket_edges.shape[0]:
            raise ValueError(f"{k} components given, bucket edges exist for {self.bucket_edges.shape[0]}")
        return self.bucket_edges[:k]

    def quantize(self, coeffs: np.ndarray) -> np.ndarray:
        """int64 bucket codes in [0, num_buckets) per coefficient; out-of-range values clip."""
        coeffs = np.asarray(coeffs, np.float64)
        flat = coeffs.reshape(-1, coeffs.shape[-1])
        edges = self._edges(flat.shape[1])
        codes = np.empty(flat.shape, np.int64)
        for c in range(flat.shape[1]):
            codes[:, c] = np.searchsorted(edges[c, 1:-1], flat[:, c], side="right")
        return codes.reshape(coeffs.shape)

    def bucket_centres(self) -> np.ndarray:
        e = self._edges(self.bucket_edges.shape[0])  # type: ignore[union-attr]
        return 0.5 * (e[:, :-1] + e[:, 1:])

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Bucket centres (midpoints of the edges) for int codes (..., k)."""
        codes = np.asarray(codes, np.int64)
        k = codes.shape[-1]
        centres = self.bucket_centres()[:k]
        if codes.size and (codes.min() < 0 or codes.max() >= centres.shape[1]):
            raise ValueError(f"codes must be in [0, {centres.shape[1]})")
        return np.take_along_axis(centres.T, codes.reshape(-1, k), axis=0).reshape(codes.shape)

    # -- files ---------------------------------------------------------------------------------

    def save(self, folder: str, extra: dict[str, Any] | None = None) -> None:
        """``model.safetensors`` (float64 arrays) + ``config.json``: unclip's checkpoint layout,
        so the folder registers in MLflow and resolves back like every other model."""
        import torch

        tensors = {"mean": self.mean, "components": self.components,
                   "explained_variance": self.explained_variance}
        if self.bucket_edges is not None:
            tensors["bucket_edges"] = self.bucket_edges
        checkpoint.save(folder, {k: torch.from_numpy(np.ascontiguousarray(v, np.float64))
                                 for k, v in tensors.items()}, KIND,
                        {"dim": self.dim, "n_components": self.n_components,
                         "num_buckets": self.num_buckets, "n_rows": int(self.n_rows)}, extra)

    @classmethod
    def load(cls, folder: str) -> "PCA":
        state, meta = checkpoint.load(folder, KIND)
        arr = {k: v.numpy().astype(np.float64, copy=False) for k, v in state.items()}
        return cls(arr["mean"], arr["components"], arr["explained_variance"],
                   int(meta["config"].get("n_rows", 0)), arr.get("bucket_edges"))


def fit_from_moments(moments: Moments, n_components: int | None = None) -> PCA:
    """Eigendecomposition of the sample covariance (ddof=1, as numpy/sklearn).

    Directions are sorted by decreasing variance and sign-fixed so that each one's largest-magnitude
    entry is positive: the same data gives the same basis on any machine and any block order.
    """
    cov = moments.covariance(ddof=1)
    cov = 0.5 * (cov + cov.T)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0.0, None)  # rank-deficient data: tiny negatives are rounding
    comps = evecs[:, order].T.copy()
    pivot = np.argmax(np.abs(comps), axis=1)
    signs = np.sign(comps[np.arange(len(comps)), pivot])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    n = moments.dim if n_components is None else int(n_components)
    if not 1 <= n <= moments.dim:
        raise ValueError(f"n_components must be in [1, {moments.dim}], got {n}")
    return PCA(moments.mean.copy(), comps[:n], evals, moments.count)


def default_hist_bins(num_buckets: int) -> int:
    return HIST_OVERSAMPLE * int(num_buckets)


def fit(x: np.ndarray, n_components: int | None = None, num_buckets: int | None = None,
        hist_bins: int | None = None, block_rows: int = 4096) -> PCA:
    """In-memory convenience with the same algorithm as the stage (blocks of ``block_rows``)."""
    x = np.asarray(x)
    m = Moments(int(x.shape[1]))
    for i in range(0, len(x), block_rows):
        m.merge(Moments.of(x[i:i + block_rows]))
    pca = fit_from_moments(m, n_components)
    if num_buckets:
        k = pca.n_components
        rng = RangeAccumulator(k)
        for i in range(0, len(x), block_rows):
            rng.update(pca.transform(x[i:i + block_rows]))
        hist = HistogramAccumulator(rng.lo, rng.hi, hist_bins or default_hist_bins(num_buckets))
        for i in range(0, len(x), block_rows):
            hist.update(pca.transform(x[i:i + block_rows]))
        pca.bucket_edges = hist.quantile_edges(int(num_buckets))
    return pca
