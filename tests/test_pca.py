"""Out-of-core PCA against a direct numpy fit; the quantizer; the pca stage on a Parquet fixture."""

from __future__ import annotations

import numpy as np
import pytest

from unclip.embeddings import io as eio
from unclip.embeddings.pca import (PCA, HistogramAccumulator, Moments, RangeAccumulator,
                                   fit, fit_from_moments)

DIM = 16


def correlated(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """Rows with well-separated variances along a random rotation, off-centre (like CLIP's)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(np.random.default_rng(123).normal(size=(dim, dim)))
    scales = 0.5 * 0.7 ** np.arange(dim)
    return (rng.normal(size=(n, dim)) * scales) @ q + np.linspace(0.3, -0.2, dim)


def numpy_pca(x: np.ndarray):
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt, s ** 2 / (len(x) - 1)


def test_merged_moments_match_numpy():
    x = correlated(700)
    blocks = [x[:50], x[50:51], x[51:400], x[400:400], x[400:]]
    parts = [Moments.of(b) for b in blocks]
    m = Moments(DIM)
    for p in reversed(parts):  # merge order must not matter
        m.merge(Moments.from_arrays(p.to_arrays()))
    assert m.count == 700
    np.testing.assert_allclose(m.mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(m.covariance(), np.cov(x, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(m.sum, x.sum(0), atol=1e-10)
    np.testing.assert_allclose(m.sum_outer, x.T @ x, atol=1e-10)


def test_fit_matches_direct_numpy_fit():
    x = correlated(900, seed=1)
    pca = fit(x, block_rows=97)  # ten blocks, merged
    mean, vt, var = numpy_pca(x)
    np.testing.assert_allclose(pca.mean, mean, atol=1e-12)
    np.testing.assert_allclose(pca.explained_variance, var, rtol=1e-9, atol=1e-15)
    assert np.all(np.diff(pca.explained_variance) <= 0)
    np.testing.assert_allclose(np.abs(np.sum(pca.components * vt, axis=1)), 1.0, atol=1e-8)
    signs = np.sign(np.sum(pca.components * vt, axis=1))
    np.testing.assert_allclose(pca.transform(x), ((x - mean) @ vt.T) * signs, atol=1e-9)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(DIM), atol=1e-12)
    # deterministic signs: the largest-magnitude entry of every direction is positive
    assert np.all(pca.components[np.arange(DIM), np.abs(pca.components).argmax(1)] > 0)
    # float32 input, as read from Parquet, gives the same basis
    np.testing.assert_allclose(np.abs(np.sum(fit(x.astype(np.float32)).components * vt, 1)), 1.0,
                               atol=1e-5)


def test_reconstruction_and_n_components():
    x = correlated(500, seed=2)
    pca = fit(x)
    np.testing.assert_allclose(pca.inverse_transform(pca.transform(x)), x, atol=1e-12)
    _, _, var = numpy_pca(x)
    cum = np.cumsum(var) / var.sum()
    for ratio in (0.5, 0.9, 0.99, 0.999, 1.0):
        assert pca.n_components_for(ratio) == int(np.argmax(cum >= ratio - 1e-12)) + 1
    np.testing.assert_allclose(pca.explained_variance_ratio.sum(), 1.0)
    k = pca.n_components_for(0.99)
    kept = pca.truncated(k)
    err = np.mean(np.sum((kept.inverse_transform(kept.transform(x)) - x) ** 2, 1))
    np.testing.assert_allclose(err, var[k:].sum() * (len(x) - 1) / len(x), rtol=1e-8)


def test_bucket_edges_and_round_trip():
    x = correlated(3000, seed=3)
    nb = 32
    pca = fit(x, num_buckets=nb, block_rows=512)
    edges = pca.bucket_edges
    assert edges.shape == (DIM, nb + 1)
    assert np.all(np.diff(edges, axis=1) >= 0)
    coeffs = pca.transform(x)
    np.testing.assert_allclose(edges[:, 0], coeffs.min(0))
    np.testing.assert_allclose(edges[:, -1], coeffs.max(0))
    # interior edges are the quantiles, to within one histogram cell
    cell = (edges[:, -1] - edges[:, 0]) / (8 * nb)
    want = np.quantile(coeffs, np.arange(1, nb) / nb, axis=0).T
    assert np.all(np.abs(edges[:, 1:-1] - want) <= cell[:, None])
    codes = pca.quantize(coeffs)
    assert codes.dtype == np.int64 and codes.min() == 0 and codes.max() == nb - 1
    # roughly equal occupancy: they are quantile buckets
    counts = np.stack([np.bincount(codes[:, c], minlength=nb) for c in range(DIM)])
    assert counts.min() >= 0.5 * len(x) / nb and counts.max() <= 1.5 * len(x) / nb
    back = pca.dequantize(codes)
    width = np.take_along_axis(np.diff(edges, axis=1).T, codes, axis=0)
    assert np.all(np.abs(back - coeffs) <= width / 2 + 1e-12)
    # out-of-range coefficients clip to the end buckets; codes are validated
    assert pca.quantize(np.full((1, DIM), 1e9)).tolist() == [[nb - 1] * DIM]
    with pytest.raises(ValueError):
        pca.dequantize(np.full((1, DIM), nb))
    # a leading subset quantizes with the leading edges (the AR prior's first n components)
    np.testing.assert_array_equal(pca.quantize(coeffs[:, :5]), codes[:, :5])


def test_histogram_accumulators_merge():
    x = correlated(400, seed=4)
    pca = fit(x)
    c = pca.transform(x)
    r1, r2 = RangeAccumulator(DIM).update(c[:100]), RangeAccumulator(DIM).update(c[100:])
    r = r1.merge(r2)
    np.testing.assert_array_equal(r.lo, c.min(0))
    h = HistogramAccumulator(r.lo, r.hi, 64).update(c[:250])
    h.merge(HistogramAccumulator(r.lo, r.hi, 64).update(c[250:]))
    assert h.counts.sum(1).tolist() == [400] * DIM
    assert np.array_equal(h.counts, HistogramAccumulator(r.lo, r.hi, 64).update(c).counts)


def test_save_load_round_trip(tmp_path):
    x = correlated(300, seed=5)
    pca = fit(x, n_components=5, num_buckets=8)
    pca.save(str(tmp_path / "p"))
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json", "model.safetensors"]
    back = PCA.load(str(tmp_path / "p"))
    for k in ("mean", "components", "explained_variance", "bucket_edges"):
        np.testing.assert_array_equal(getattr(back, k), getattr(pca, k))
    assert back.n_components == 5 and back.num_buckets == 8 and back.n_rows == 300
    from unclip.checkpoint import CheckpointError, read_config

    assert read_config(str(tmp_path / "p"))["kind"] == "pca"
    with pytest.raises(CheckpointError):
        from unclip.models.clip import load_clip

        load_clip(str(tmp_path / "p"))


def test_fit_from_moments_rejects_bad_n():
    m = Moments.of(correlated(50))
    with pytest.raises(ValueError):
        fit_from_moments(m, n_components=DIM + 1)


# ---- the stage ----------------------------------------------------------------------------------


def _write_fixture(folder, sizes=(70, 130, 0, 100)) -> np.ndarray:
    """Parquet files as the embed stage writes them (one empty), rows unit-normalized like CLIP's."""
    folder.mkdir()
    x = correlated(sum(sizes), seed=7).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start = 0
    for i, n in enumerate(sizes):
        rows = x[start:start + n]
        keys = [f"{i:05d}{j:04d}" for j in range(n)]
        table = eio.to_table(keys, [f"caption {k}" for k in keys], rows.reshape(n, DIM),
                             rows[::-1].reshape(n, DIM), {"dim": DIM, "arch": "fixture"})
        eio.write_table(str(folder / f"{i:05d}.parquet"), table)
        start += n
    return x


def test_pca_stage_on_parquet_fixture(tmp_path, ray_local):
    import mlflow

    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.context import StageContext
    from pipelines.manifest import Manifest, code_version
    from stages import pca as stage

    x = _write_fixture(tmp_path / "emb")
    run_dir = tmp_path / "run"
    cfg = load_config(["preset=smoke", f"run_dir={run_dir}", "pca.batch_size=32",
                       "pca.n_components=6"])
    upstream = {"embed": Manifest(stage="embed", config_hash="x", inputs={}, code_version=code_version(),
                                  outputs={"embeddings": str(tmp_path / "emb")})}
    with tracking.stage_run(cfg, "pca") as run_id:
        ctx = StageContext(cfg=cfg, name="pca", stage_dir=str(run_dir / "pca"), upstream=upstream,
                           mlflow_run_id=run_id)
        result = stage.run(ctx)
    m = result.metrics
    print("pca stage metrics:", m)
    assert m["n_rows"] == 300 and m["dim"] == DIM and m["n_components"] == 6
    _, _, var = numpy_pca(x.astype(np.float64))
    assert m["n_components_99"] == int(np.argmax(np.cumsum(var) / var.sum() >= 0.99)) + 1
    assert m["reconstruction_max_abs_error"] < 1e-6
    assert 0.9 < m["quantized_reconstruction_mean_cosine"] <= 1.0 + 1e-9

    got = PCA.load(result.outputs["pca"])
    want = fit(x, n_components=6, num_buckets=16)  # the same algorithm, in memory
    np.testing.assert_allclose(got.mean, want.mean, atol=1e-12)
    np.testing.assert_allclose(got.components, want.components, atol=1e-9)
    np.testing.assert_allclose(got.explained_variance, var, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got.bucket_edges, want.bucket_edges, atol=1e-9)

    assert result.outputs["registered"] == "models:/unclip-pca/1"
    client = mlflow.MlflowClient()
    arts = {a.path for a in client.list_artifacts(run_id, "pca")}
    assert {"pca/explained_variance.png", "pca/explained_variance.json"} <= arts
    from unclip.registry import resolve_checkpoint

    reg = PCA.load(resolve_checkpoint("models:/unclip-pca@champion", cache_dir=str(tmp_path / "c")))
    np.testing.assert_array_equal(reg.components, got.components)
