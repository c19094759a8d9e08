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
