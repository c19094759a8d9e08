"""Every stage's inputs and outputs on s3:// (a real moto S3 server on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import S3_SECRET, make_bucket

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_on_s3(s3_server, tmp_path):
    make_bucket(s3_server, "unclip-test")
    env = {**os.environ, **s3_server, "TQDM_DISABLE": "1"}
    run_dir = "s3://unclip-test/runs/smoke"
    # through filter: shards, Parquet indexes, manifests and the embedded MLflow store's artifacts
    # on S3. Models, Ray Train checkpoints and embeddings on S3 (every stage, with a Ray cluster and
    # an mlflow server) are test_cluster's: the same storage code, so not run twice (~40 s of CI).
    args = [sys.executable, "-m", "pipelines", "run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "ray.num_cpus=2"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing",
                           secret=S3_SECRET)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("unclip-test/runs/smoke/data/shards"))
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json", "00002.parquet", "00002.tar", "00002_stats.json"]
    manifest = json.loads(fs.cat("unclip-test/runs/smoke/filter/manifest.json"))
    assert manifest["outputs"]["shards"] == f"{run_dir}/filter/shards"
    assert manifest["metrics"]["kept"] > 0
    assert fs.exists("unclip-test/runs/smoke/filter/drop_counts.parquet")
    # the MLflow artifacts of the run went to the bucket as well
    assert fs.find("unclip-test/runs/smoke/mlartifacts")

    # a second run finds every stage done from the manifests on S3
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "every stage is done" in again.stdout, again.stderr[-2000:]

    # the secret key never reached the console, a manifest, or the MLflow store
    assert S3_SECRET not in done.stdout + done.stderr + again.stdout + again.stderr
    for manifest in fs.glob("unclip-test/runs/smoke/*/manifest.json"):
        assert S3_SECRET not in fs.cat(manifest).decode()
    assert S3_SECRET.encode() not in (tmp_path / "mlflow.db").read_bytes()
