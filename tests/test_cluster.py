"""Production paths together: the smoke pipeline as Ray jobs on a real two-node Ray cluster, tracked
by a real `mlflow server` whose artifacts live on S3, with the run directory on S3 (moto), on
captioned img2dataset shards with no ground truth read from S3 (non-shapes textures): what users run,
and, as one run, the end-to-end check of evaluation without a ground truth (the local smoke run
fixture covers shapes and the detector)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import S3_SECRET, MlflowServer, jobs_client_call, make_bucket
from test_real_data import SHAPES_WORDS, write_texture_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_pipeline_on_cluster_mlflow_server_and_s3(ray_cluster, s3_server, tmp_path, monkeypatch):
    import s3fs

    address, auth_env = ray_cluster
    make_bucket(s3_server, "unclip-prod")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing", secret=S3_SECRET)
    write_texture_shards(tmp_path / "textures", n=80)
    fs.put(str(tmp_path / "textures") + "/", "unclip-prod/textures/", recursive=True)
    server = MlflowServer(tmp_path, artifacts="s3://unclip-prod/mlflow-artifacts", env=s3_server)
    server.start()
    try:
        run_dir = "s3://unclip-prod/runs/smoke"
        env = {**os.environ, **s3_server, **auth_env, "RAY_ADDRESS": address, "TQDM_DISABLE": "1",
               "MLFLOW_TRACKING_URI": server.uri}
        args = ["make", "pipeline", f"ARGS=preset=smoke run_dir={run_dir} "
                "data.source=s3://unclip-prod/textures evaluate.grid_rows=2"]
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]

        from pipelines.graph import Graph

        stages = [s.name for s in Graph().stages]
        assert out.count("submitted as Ray job") == len(stages)
        jobs = json.loads(jobs_client_call(address, auth_env, (
            "print(json.dumps([[(j.metadata or {}).get('unclip.stage', ''), j.status.value]"
            " for j in client.list_jobs()]))")))
        ours = {stage: status for stage, status in jobs if stage}
        assert ours == {s: "SUCCEEDED" for s in stages}

        # two live nodes, each with its own resources
        nodes = json.loads(jobs_client_call(address, auth_env, (
            "job = client.submit_job(entrypoint=\"python -c 'import json, ray; ray.init(); "
            "print(json.dumps([n[\\\"Resources\\\"] for n in ray.nodes() if n[\\\"Alive\\\"]]))'\")\n"
            "while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):\n"
            "    time.sleep(0.5)\n"
            "print(client.get_job_logs(job).strip().splitlines()[-1])\n")).strip().splitlines()[-1])
        assert len(nodes) == 2 and sum("worker_node" in n for n in nodes) == 1

        from mlflow import MlflowClient

        from unclip.data.loading import is_holdout
        from unclip.data.shards import iter_shard, list_shards

        for stage in stages:  # every manifest on the bucket; every registered model on the server
            manifest = json.loads(fs.cat(f"unclip-prod/runs/smoke/{stage}/manifest.json"))
            assert all(uri.startswith(("s3://", "models:/")) for uri in manifest["outputs"].values())
            missing = [u for u in manifest["outputs"].values() if u.startswith("s3://")
                       and not fs.exists(u[len("s3://"):])]
            assert not missing, f"{stage}: outputs named in its manifest are not on S3: {missing}"
            registered = manifest["outputs"].get("registered")
            if registered:
                name = registered.split("/")[1]
                assert MlflowClient(server.uri).get_registered_model(name).name == name
        assert fs.find("unclip-prod/mlflow-artifacts")  # the server's artifact store is S3
        assert fs.find("unclip-prod/runs/smoke/checkpoints")

        # no ground truth: reference-free scores, a grid of held-out captions
        m = json.loads(fs.cat("unclip-prod/runs/smoke/evaluate/manifest.json"))["metrics"]
        assert m["ground_truth"] is False and m["n_captions"] == 8
        assert -1.0 <= m["clip_score"] <= 1.0
        assert m["fd_clip_generated"] >= 0 and m["fd_clip_real"] >= 0
        assert m["fd_clip_n_generated"] == 8 and m["fd_clip_n_real"] >= 8
        assert not [k for k in m if k.startswith(("one_object_", "two_objects_", "all_", "n_one", "n_two"))]
        with fs.open("unclip-prod/runs/smoke/evaluate/grid.png") as f:
            assert Image.open(f).width > 0
        rows = fs.cat("unclip-prod/runs/smoke/evaluate/grid_prompts.txt").decode().splitlines()
        assert len(rows) == 2 and not {w.strip(",") for r in rows for w in r.split()} & SHAPES_WORDS
        for k, v in s3_server.items():  # the library reads the filtered shards from S3 here too
            monkeypatch.setenv(k, v)
        held = [x.caption() for s in list_shards(f"{run_dir}/filter/shards") for x in iter_shard(s)
                if is_holdout(x.key, 0.2)]
        assert set(rows) <= set(held)

        again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "every stage is done" in again.stdout, again.stderr[-3000:]
        # the cluster's credentials stayed in its environment: not in any job's logs or metadata
        logs = jobs_client_call(address, auth_env, (
            "print(json.dumps([client.get_job_logs(j.submission_id) + json.dumps(j.runtime_env or {})"
            " for j in client.list_jobs() if j.submission_id]))"))
        assert S3_SECRET not in logs + out + again.stdout + again.stderr
    finally:
        server.stop()
