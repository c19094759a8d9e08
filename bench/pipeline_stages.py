"""Throughput of the data-side stages, calling the stage code itself on fixtures in a temp dir:

* data (synthetic shapes shards, Ray tasks) and filter (two Ray Data passes): images/s;
* embed (Ray Data actor pool of CLIPs, the tiny preset's CLIP with random weights) with 1 and 2
  actors: images/s (the scaling item);
* PCA: rows/s of the stage's three Ray Data passes (moments, range, histograms) at 1x and 10x the
  tiny preset's rows (full mode: 10x the tiny preset, 40k and 400k rows), and the peak memory
  (max RSS, its growth over the RSS after imports, and the tracemalloc peak of the Python/numpy
  allocations) of a subprocess running the same per-file code over all files at 1x and 10x:
  out-of-core means the peak does not grow with the rows.

Stage times include their start-up (Ray tasks, CLIP actors loading the model): what a run pays.

A local Ray with ``--num-cpus`` CPUs is started by the bench (or the cluster named by
RAY_ADDRESS). Wall seconds here: the work runs in Ray worker processes.

    .venv/bin/python -m bench.pipeline_stages [--quick] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

ROOT = Path(__file__).resolve().parents[1]


def _ctx(cfg, name: str, root: str, upstream: dict[str, dict[str, str]]):
    """The context the executor would build (Ray is already up: :func:`common.local_ray`)."""
    from pipelines.executor import stage_context
    from pipelines.graph import Graph
    from pipelines.manifest import Manifest

    ups = {k: Manifest(stage=k, config_hash="", inputs={}, code_version={}, outputs=v)
           for k, v in upstream.items()}
    return stage_context(Graph()[name], cfg, ups, os.path.join(root, name))


def _clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def data_filter_embed(tmp: str, quick: bool, num_cpus: int) -> list[dict[str, Any]]:
    import torch

    from pipelines.config import load_config, to_container
    from stages import data, embed
    from stages import filter as filt
    from unclip.models.clip import ClipEncoder, create_custom

    n, per, res = (32, 8, 128) if quick else (240, 30, 512)
    overrides = ["preset=tiny", f"run_dir={tmp}", f"data.num_samples={n}",
                 f"data.samples_per_shard={per}", f"data.resolution={res}", f"ray.num_cpus={num_cpus}"]
    cfg = load_config(overrides)
    rows = []
    d, sec = _clock(lambda: data.run(_ctx(cfg, "data", tmp, {})))
    rows.append({"stage": "data (generate shapes shards)", "workers": num_cpus, "items": n,
                 "seconds": sec, "per_s": n / sec, "unit": "images/s", "resolution": res})
    f, sec = _clock(lambda: filt.run(_ctx(cfg, "filter", tmp, {"data": d.outputs})))
    rows.append({"stage": "filter (scan + write)", "workers": num_cpus, "items": n, "seconds": sec,
                 "per_s": n / sec, "unit": "images/s", "resolution": res})
    model_cfg = to_container(cfg.clip.model)
    torch.manual_seed(0)
    clip_dir = os.path.join(tmp, "clip")
    ClipEncoder(create_custom(model_cfg), {"arch": "custom", "source": "bench"}, model_cfg).save(clip_dir)
    kept = int(f.metrics["kept"])
    for actors in (1, 2):
        ecfg = load_config(overrides + [f"embed.num_actors={actors}"])
        _, sec = _clock(lambda: embed.run(_ctx(ecfg, "embed", os.path.join(tmp, f"e{actors}"),
                                                {"filter": f.outputs, "clip": {"model": clip_dir}})))
        rows.append({"stage": "embed (CLIP actors)", "workers": actors, "items": kept,
                     "seconds": sec, "per_s": kept / sec, "unit": "images/s", "resolution": res})
    return rows


def write_embeddings(folder: str, rows: int, files: int, dim: int, seed: int = 0) -> list[str]:
    """``files`` Parquet embedding files of unit vectors with a low-rank structure."""
    from unclip.embeddings import io as eio

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((8, dim))
    paths = []
    per = rows // files
    for i in range(files):
        x = rng.standard_normal((per, 8)) @ basis + 0.3 * rng.standard_normal((per, dim))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        keys = [f"{i:05d}{j:06d}" for j in range(per)]
        path = os.path.join(folder, f"{i:05d}.parquet")
        eio.write_table(path, eio.to_table(keys, ["a red circle"] * per, x, x, {"dim": dim}))
        paths.append(path)
    return paths


# The per-file code of the PCA stage's three passes, run over every file in one process.
_MEMORY_SCRIPT = r"""
import json, resource, sys, time, tracemalloc
import numpy as np
from stages import pca as P
from unclip.embeddings.pca import Moments, fit_from_moments, default_hist_bins
files, batch_size, buckets = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
tracemalloc.start()  # numpy and pyarrow-to-numpy buffers are traced: the data the passes hold
t0 = time.perf_counter()
total = None
for f in files:
    m = Moments.from_arrays({k: v[0] for k, v in P._moments_task({"uri": [f]}, batch_size).items()})
    total = m if total is None else total.merge(m)
pca = fit_from_moments(total)
lo, hi = [], []
for f in files:
    r = P._range_task({"uri": [f]}, batch_size, pca.mean, pca.components)
    lo.append(r["lo"][0]); hi.append(r["hi"][0])
lo, hi = np.min(lo, 0), np.max(hi, 0)
counts = sum(P._hist_task({"uri": [f]}, batch_size, pca.mean, pca.components, lo, hi,
                          default_hist_bins(buckets))["counts"][0] for f in files)
print(json.dumps({"rows": int(total.count), "seconds": time.perf_counter() - t0,
                  "baseline_rss_mb": base, "traced_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def pca_bench(tmp: str, quick: bool, num_cpus: int) -> list[dict[str, Any]]:
    from pipelines.config import load_config
    from stages import pca as P
    from unclip.embeddings.pca import default_hist_bins, fit_from_moments

    cfg = load_config(["preset=tiny"])
    dim, buckets, batch = int(cfg.clip.model.embed_dim), int(cfg.pca.num_buckets), int(cfg.pca.batch_size)
    base_rows = 4000 if quick else int(cfg.data.num_samples) * 10   # 1x (full: 40k rows)
    out = []
    for mult in (1, 10):
        rows, files = base_rows * mult, 4 * mult
        paths = write_embeddings(os.path.join(tmp, f"pca{mult}"), rows, files, dim, seed=mult)
        if mult == 1:
            P.compute_moments(paths, batch)  # warm-up: Ray Data's first dataset starts its workers
        t0 = time.perf_counter()
        moments = P.compute_moments(paths, batch)
        pca = fit_from_moments(moments)
        P.compute_edges(paths, pca, buckets, default_hist_bins(buckets), batch)
        sec = time.perf_counter() - t0
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(paths), str(batch),
                               str(buckets)], capture_output=True, text=True, cwd=str(ROOT),
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            raise RuntimeError(f"PCA memory subprocess failed:\n{proc.stderr[-2000:]}")
        mem = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append({"stage": f"pca fit ({mult}x rows, Ray passes)", "workers": num_cpus, "items": rows,
                    "seconds": sec, "per_s": rows / sec, "unit": "rows/s", "dim": dim,
                    "peak_rss_mb": mem["peak_rss_mb"], "baseline_rss_mb": mem["baseline_rss_mb"],
                    "rss_growth_mb": mem["peak_rss_mb"] - mem["baseline_rss_mb"],
                    "traced_peak_mb": mem["traced_peak_mb"],
                    "single_process_rows_per_s": rows / mem["seconds"],
                    "input_mb": rows * dim * 4 / 1e6})
    return out


def run(quick: bool = False, threads: int = 1, out: str | None = None,
        num_cpus: int = 2) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="unclip-bench-") as tmp, common.local_ray(num_cpus):
        rows += data_filter_embed(tmp, quick, num_cpus)
        rows += pca_bench(tmp, quick, num_cpus)
    common.print_table(rows, ["stage", "workers", "items", "seconds", "per_s", "unit", "peak_rss_mb",
                              "rss_growth_mb", "traced_peak_mb", "input_mb"],
                       f"pipeline stages (local Ray, {num_cpus} CPUs; wall seconds)")
    result = {"name": "pipeline_stages", "machine": common.machine(threads), "num_cpus": num_cpus,
              "rows": rows}
    path = common.write_result("pipeline_stages", result, out)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    common.add_common_args(p)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    a = p.parse_args(argv)
    run(a.quick, a.threads, a.out, a.num_cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
