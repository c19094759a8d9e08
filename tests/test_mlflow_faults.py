"""MLflow server faults against a real `mlflow server`: down at start, briefly down mid-run."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.cli import main


def test_server_down_at_start_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    rc = main(["run", "--until", "data", "preset=smoke", f"run_dir={tmp_path}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "is not reachable" in err[0] and "MLFLOW_TRACKING_URI" in err[0]
    assert not (tmp_path / "run" / "data").exists()  # nothing started


def test_credentials_in_the_uri_are_not_printed(tmp_path, capsys, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cr3t-pw@127.0.0.1:{free_port()}")
    assert main(["run", "--until", "data", "preset=smoke", f"run_dir={tmp_path}/run"]) == 2
    out = capsys.readouterr()
    assert "s3cr3t-pw" not in out.err + out.out and "***@127.0.0.1" in out.err


def test_brief_outage_mid_run_is_retried(mlflow_server, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    mlflow.set_tracking_uri(mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"outage-{time.time_ns()}")
    run = client.create_run(exp)
    mlflow_server.stop()
    restarted = threading.Event()

    def bring_back():
        time.sleep(3.0)
        mlflow_server.start()
        restarted.set()

    threading.Thread(target=bring_back, daemon=True).start()
    t0 = time.monotonic()
    client.log_metric(run.info.run_id, "loss", 0.5, step=7)  # blocks, retrying, until it is back
    assert time.monotonic() - t0 > 2.5 and restarted.wait(60)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(7, 0.5)]


def test_server_down_mid_training_stage_loses_no_metric(mlflow_server, smoke_run, tmp_path):
    """The tracking server goes down while the prior stage trains and comes back seconds later: the
    worker's metric logging retries through it, the stage finishes, and every logged step is there."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    from pipelines.manifest import read_manifest
    from stages.training import latest_persisted

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("prior", "prior-*"))
    total = 200
    overrides = ["preset=smoke", f"run_dir={run_dir}", f"prior.train.total_steps={total}",
                 "prior.train.checkpoint_every=20", "prior.train.log_every=10"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "TQDM_DISABLE": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "run", "--until", "prior", *overrides],
                            cwd=Path(__file__).resolve().parents[1], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    down_at = -1
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            folders = list((run_dir / "checkpoints").glob("prior-*"))
            if folders and latest_persisted(str(folders[0]))[0] >= 20:
                down_at = latest_persisted(str(folders[0]))[0]
                mlflow_server.stop()
                break
            time.sleep(0.1)
        assert proc.poll() is None and 20 <= down_at < total, "the stage was not training"
        time.sleep(3.0)
        assert proc.poll() is None  # the stage cannot finish while its tracking server is down
    finally:
        if mlflow_server.proc is None:
            mlflow_server.start()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "could not log metrics" not in out
    # the embedded Ray has no dashboard, so no State API: Ray Train's placement-group cleaner would
    # warn every second that it cannot reach it (silenced by pipelines.runtime.quiet_worker_logs)
    assert "Failed to query Ray Train Controller" not in out
    m = read_manifest(str(run_dir), "prior")
    assert m.metrics["trained_steps"] == total
    history = MlflowClient(mlflow_server.uri).get_metric_history(m.mlflow_run_id, "train_loss")
    assert sorted(h.step for h in history if h.step > 0) == list(range(10, total + 1, 10))


@pytest.mark.slow  # two runs into sqlite MLflow stores: make test runs it, make test-fast leaves it out
def test_a_second_run_in_the_same_process_logs_to_its_own_store(tmp_path, monkeypatch):
    """MLflow 3's set_tracking_uri exports MLFLOW_TRACKING_URI, which the config reads as the
    user's server: after a run on A, a run on B in the same process (tests, notebooks) logged to
    A's store. setup leaves the user's variables as they were."""
    import os

    import mlflow

    from pipelines.config import load_config
    from pipelines.tracking import setup

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    try:
        setup(load_config(["preset=smoke", f"run_dir={tmp_path}/a"]))
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/a/mlflow.db"
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
        setup(load_config(["preset=smoke", f"run_dir={tmp_path}/b"]))
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/b/mlflow.db"
        # a user's server stays the user's choice
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/server.db")
        setup(load_config(["preset=smoke", f"run_dir={tmp_path}/c"]))
        assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/server.db"
    finally:
        mlflow.set_tracking_uri(None)
