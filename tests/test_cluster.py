"""With RAY_ADDRESS set, each stage runs as a Ray job on that cluster (a real `ray start` head)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import jobs_client_call

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stages_are_submitted_as_ray_jobs(ray_cluster, tmp_path):
    address, auth_env = ray_cluster
    run_dir = tmp_path / "run"
    env = {**os.environ, **auth_env, "RAY_ADDRESS": address, "TQDM_DISABLE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    args = [sys.executable, "-m", "pipelines", "run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert out.count("submitted as Ray job") == 2

    jobs = json.loads(jobs_client_call(address, auth_env, (
        "print(json.dumps([[(j.metadata or {}).get('unclip.stage', ''), j.status.value]"
        " for j in client.list_jobs()]))")))
    ours = sorted((stage, status) for stage, status in jobs if stage)
    assert ours == [("data", "SUCCEEDED"), ("filter", "SUCCEEDED")]
    m = json.loads((run_dir / "filter" / "manifest.json").read_text())
    assert m["metrics"]["kept"] > 0
