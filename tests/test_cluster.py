"""Production paths together: the smoke pipeline as Ray jobs on a real two-node Ray cluster, tracked
by a real `mlflow server` whose artifacts live on S3, with the run directory on S3 (moto)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import S3_SECRET, MlflowServer, jobs_client_call, make_bucket

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_pipeline_on_cluster_mlflow_server_and_s3(ray_cluster, s3_server, tmp_path):
    address, auth_env = ray_cluster
    make_bucket(s3_server, "unclip-prod")
    server = MlflowServer(tmp_path, artifacts="s3://unclip-prod/mlflow-artifacts", env=s3_server)
    server.start()
    try:
        run_dir = "s3://unclip-prod/runs/smoke"
        env = {**os.environ, **s3_server, **auth_env, "RAY_ADDRESS": address, "TQDM_DISABLE": "1",
               "MLFLOW_TRACKING_URI": server.uri}
        args = ["make", "pipeline", f"ARGS=preset=smoke run_dir={run_dir}"]
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

        import s3fs
        from mlflow import MlflowClient

        fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing",
                               secret=S3_SECRET)
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

        again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "every stage is done" in again.stdout, again.stderr[-3000:]
        # the cluster's credentials stayed in its environment: not in any job's logs or metadata
        logs = jobs_client_call(address, auth_env, (
            "print(json.dumps([client.get_job_logs(j.submission_id) + json.dumps(j.runtime_env or {})"
            " for j in client.list_jobs() if j.submission_id]))"))
        assert S3_SECRET not in logs + out + again.stdout + again.stderr
    finally:
        server.stop()
