"""PCA stage: principal components of the CLIP image embeddings and the AR prior's bucket edges.

Out-of-core, in passes of Ray Data over the embed stage's Parquet files (one task per file, each
reading only the ``image_embedding`` column in record batches of ``pca.batch_size`` rows, so
neither a worker nor the driver ever holds more than one batch of rows):

1. partial moments per file (count, mean, centred scatter; float64), merged on the driver:
   O(dim^2) memory whatever the number of rows; then one ``numpy.linalg.eigh``;
2. per-component min/max of the projections on the kept components;
3. per-component histograms on a fine grid between that min and max, merged on the driver; the
   bucket edges are their quantiles (see unclip/embeddings/pca.py for the error bound).

Re-reading the embeddings is cheap next to everything else in the pipeline (1M x 1024 float32 is
4 GB), and it is what keeps memory independent of the number of rows.

Writes a PCA folder (unclip checkpoint layout: ``model.safetensors`` + ``config.json``), registers
it in MLflow and logs an explained-variance plot to the stage's run.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from stages.contract import StageContext, StageResult
from unclip import storage
from unclip.embeddings import io as eio
from unclip.embeddings.pca import (PCA, HistogramAccumulator, Moments, RangeAccumulator,
                                   default_hist_bins, fit_from_moments)

log = logging.getLogger("unclip")
COLUMN = "image_embedding"
SAMPLE_ROWS = 2048  # rows checked for reconstruction / quantization error


def iter_matrices(uri: str, batch_size: int, column: str = COLUMN) -> Iterator[np.ndarray]:
    """(rows, dim) float32 blocks of one embedding file, ``batch_size`` rows at a time (any fsspec URI)."""
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=[column]):
            col: pa.FixedSizeListArray = batch.column(0)
            if len(col):
                yield col.flatten().to_numpy(zero_copy_only=False).reshape(
                    -1, col.type.list_size).astype(np.float32, copy=False)


# ---- per-file tasks (module level: Ray pickles them by reference) ----------------------------


def file_dim(uri: str, column: str = COLUMN) -> int:
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        return int(pq.read_schema(f).field(column).type.list_size)


def _moments_task(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    parts = []
    for uri in batch["uri"]:
        m = Moments(file_dim(str(uri)))  # an empty file still gives a (zero-count) partial
        for x in iter_matrices(str(uri), batch_size):
            m.merge(Moments.of(x))
        parts.append(m.to_arrays())
    return {k: np.stack([p[k] for p in parts]) for k in ("count", "mean", "scatter")}


def _range_task(batch: dict[str, np.ndarray], batch_size: int, mean: np.ndarray,
                components: np.ndarray) -> dict[str, np.ndarray]:
    pca = PCA(mean, components, np.zeros(len(mean)))
    acc = RangeAccumulator(len(components))
    for uri in batch["uri"]:
        for x in iter_matrices(str(uri), batch_size):
            acc.update(pca.transform(x))
    return {"lo": acc.lo[None], "hi": acc.hi[None]}


def _hist_task(batch: dict[str, np.ndarray], batch_size: int, mean: np.ndarray,
               components: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               bins: int) -> dict[str, np.ndarray]:
    pca = PCA(mean, components, np.zeros(len(mean)))
    acc = HistogramAccumulator(lo, hi, bins)
    for uri in batch["uri"]:
        for x in iter_matrices(str(uri), batch_size):
            acc.update(pca.transform(x))
    return {"counts": acc.counts[None]}


def _files_dataset(files: list[str]) -> "ray.data.Dataset":
    return ray.data.from_items([{"uri": u} for u in files], override_num_blocks=len(files))


# ---- the passes --------------------------------------------------------------------------------


def compute_moments(files: list[str], batch_size: int) -> Moments:
    """Pass 1: partial moments per file on Ray, merged on the driver one partial at a time."""
    total: Moments | None = None
    for row in _files_dataset(files).map_batches(
            _moments_task, batch_size=1, fn_kwargs={"batch_size": batch_size}).iter_rows():
        part = Moments.from_arrays(row)
        total = part if total is None else total.merge(part)
    if total is None or total.count == 0:
        raise ValueError(f"pca: no embedding rows in {len(files)} file(s)")
    return total


def compute_edges(files: list[str], pca: PCA, num_buckets: int, bins: int,
                  batch_size: int) -> np.ndarray:
    """Passes 2 and 3: projection range, then fine histograms -> (k, num_buckets + 1) edges."""
    common = {"batch_size": batch_size, "mean": pca.mean, "components": pca.components}
    rng = RangeAccumulator(pca.n_components)
    for row in _files_dataset(files).map_batches(_range_task, batch_size=1,
                                                 fn_kwargs=common).iter_rows():
        rng.merge(RangeAccumulator(pca.n_components, row["lo"], row["hi"]))
    hist = HistogramAccumulator(rng.lo, rng.hi, bins)
    for row in _files_dataset(files).map_batches(
            _hist_task, batch_size=1,
            fn_kwargs={**common, "lo": rng.lo, "hi": rng.hi, "bins": bins}).iter_rows():
        hist.counts += row["counts"]
    return hist.quantile_edges(num_buckets)


def run(ctx: StageContext) -> StageResult:
    c = ctx.stage_cfg
    files = eio.list_files(ctx.input("embed", "embeddings"))
    if not files:
        raise FileNotFoundError(f"pca: no embedding files in {ctx.input('embed', 'embeddings')}")
    batch_size = int(c.batch_size)
    num_buckets = int(c.num_buckets)
    bins = int(c.hist_bins) if c.hist_bins else default_hist_bins(num_buckets)

    moments = compute_moments(files, batch_size)
    full = fit_from_moments(moments)
    n_keep = int(c.n_components) if c.n_components is not None else full.dim
    if not 1 <= n_keep <= full.dim:
        raise ValueError(f"pca.n_components={n_keep} but the embeddings have dim {full.dim}")
    pca = full.truncated(n_keep)
    pca.bucket_edges = compute_edges(files, pca, num_buckets, bins, batch_size)

    folder = ctx.path("pca")
    ratio = float(c.variance_ratio)
    identity = eio.read_identity(files[0])
    pca.save(folder, extra={"clip": identity, "hist_bins": bins})

    metrics: dict[str, Any] = {
        "n_rows": moments.count, "dim": full.dim, "n_components": n_keep,
        "num_buckets": num_buckets,
        "n_components_99": full.n_components_for(0.99),
        "n_components_at_variance_ratio": full.n_components_for(ratio),
        "explained_variance_ratio_kept": float(full.explained_variance_ratio[:n_keep].sum()),
        **_sample_errors(files[0], full, pca),
    }
    _log_plot(full, ratio, n_keep)
    from unclip.registry import register_checkpoint

    # the metric ranks versions for the champion alias: more variance kept by n_keep is better
    version, alias = register_checkpoint(folder, str(c.register_name),
                                         metrics["explained_variance_ratio_kept"])
    metrics.update({"registered_version": int(version), "registered_alias": alias})
    return StageResult(
        outputs={"pca": folder, "registered": f"models:/{c.register_name}/{version}"},
        metrics=metrics,
        summary=(f"{moments.count} rows, dim {full.dim}: {metrics['n_components_99']} components keep "
                 f"99% of the variance; kept {n_keep} ({metrics['explained_variance_ratio_kept']:.4f}) "
                 f"x {num_buckets} buckets; registered {c.register_name} v{version} as {alias}"))


def _sample_errors(uri: str, full: PCA, kept: PCA) -> dict[str, float]:
    """Reconstruction errors on the first rows of one file (a check, not a statistic)."""
    x = next(iter_matrices(uri, SAMPLE_ROWS)).astype(np.float64)
    out = {"reconstruction_max_abs_error":
           float(np.abs(full.inverse_transform(full.transform(x)) - x).max())}
    coeffs = kept.transform(x)
    out["reconstruction_max_abs_error_kept"] = float(np.abs(kept.inverse_transform(coeffs) - x).max())
    rebuilt = kept.inverse_transform(kept.dequantize(kept.quantize(coeffs)))
    cos = np.sum(rebuilt * x, 1) / (np.linalg.norm(rebuilt, axis=1) * np.linalg.norm(x, axis=1) + 1e-12)
    out["quantized_reconstruction_mean_cosine"] = float(cos.mean())
    return out


def _log_plot(pca: PCA, ratio: float, n_keep: int) -> None:
    """Explained variance per component and cumulative, to the stage's MLflow run (if any)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evr = pca.explained_variance_ratio
    k = np.arange(1, len(evr) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.semilogy(k, np.maximum(evr, 1e-16))
    a.set(xlabel="component", ylabel="explained variance ratio", title="per component")
    b.plot(k, np.cumsum(evr))
    b.axhline(ratio, ls="--", c="grey", label=f"{ratio:g} at {pca.n_components_for(ratio)}")
    b.axvline(n_keep, ls=":", c="red", label=f"kept: {n_keep}")
    b.set(xlabel="components", ylabel="cumulative", title="cumulative", ylim=(0, 1.01))
    b.legend(loc="lower right")
    fig.tight_layout()
    mlflow.log_figure(fig, "pca/explained_variance.png")
    mlflow.log_dict({"explained_variance": pca.explained_variance.tolist(),
                     "explained_variance_ratio": evr.tolist()}, "pca/explained_variance.json")
    plt.close(fig)
