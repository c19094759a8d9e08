"""One run at a time per run directory: a local flock, and a conditional-put lock object on S3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipelines.lock import LOCK_NAME, RunLocked, run_lock

HOLD = """
import sys, time
from pipelines.lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow  # a subprocess: make test runs it, make test-fast leaves it out
def test_second_run_on_a_local_directory_exits_at_once(tmp_path, capsys):
    """A second `pipelines run` on a held directory exits 2 at once with one line naming the holder
    and writes nothing; once the holder is killed (no clean exit) the directory is free again."""
    from pipelines.cli import main

    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        t0 = time.monotonic()
        assert main(["run", "preset=smoke", f"run_dir={run_dir}"]) == 2
        assert time.monotonic() - t0 < 30
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {proc.pid} on {socket.gethostname()}" in err[0], err
        assert sorted(os.listdir(run_dir)) == [LOCK_NAME]  # no stage started
    finally:
        proc.kill()
        proc.wait()
    with run_lock(str(run_dir)):  # the kernel dropped the killed holder's lock
        with pytest.raises(RunLocked, match="in use by pid"):
            with run_lock(str(run_dir)):
                pass


@pytest.fixture
def s3_run(s3_server, monkeypatch):
    from conftest import make_bucket

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    bucket = f"lock-{time.monotonic_ns()}"
    make_bucket(s3_server, bucket)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{bucket}/runs/exp1"


def _lock_object(run_dir):
    from unclip import storage

    uri = storage.join(run_dir, LOCK_NAME)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def test_s3_lock_refuses_a_second_run_and_refreshes(s3_run):
    with run_lock(s3_run, stale_after_s=60, refresh_s=0.3) as lock:
        first = _lock_object(s3_run)
        assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=f"in use by pid {os.getpid()}"):
            with run_lock(s3_run, stale_after_s=60):
                pass
        time.sleep(1.0)
        assert _lock_object(s3_run)["refreshed"] > first["refreshed"]  # kept fresh
        lock.check()
    assert _lock_object(s3_run) is None  # released


def test_s3_stale_lock_is_taken_over_and_the_loser_stops(s3_run):
    from unclip import storage

    uri = storage.join(s3_run, LOCK_NAME)
    stale = {"host": "gone-host", "pid": 1, "started": "2026-01-01T00:00:00+00:00",
             "refreshed": time.time() - 1000}
    storage.write_bytes(uri, json.dumps(stale).encode())
    with run_lock(s3_run, stale_after_s=60, refresh_s=0.2) as lock:  # stale: taken over
        assert _lock_object(s3_run)["pid"] == os.getpid()
        # a fresh lock of another host's run stays refused
        other = {**stale, "refreshed": time.time()}
        storage.write_bytes(uri, json.dumps(other).encode())  # someone overwrote ours
        deadline = time.monotonic() + 10
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(RunLocked, match="taken over by pid 1 on gone-host"):
            lock.check()  # the runner stops before its next stage
        with pytest.raises(RunLocked, match="in use by pid 1 on gone-host"):
            with run_lock(s3_run, stale_after_s=60):
                pass
    assert _lock_object(s3_run)["host"] == "gone-host"  # the loser does not delete the winner's lock


def test_s3_lock_of_a_dead_local_process_is_taken_over(s3_run):
    from unclip import storage

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer exists on this host
    fresh = {"host": socket.gethostname(), "pid": proc.pid, "started": "x", "refreshed": time.time()}
    storage.write_bytes(storage.join(s3_run, LOCK_NAME), json.dumps(fresh).encode())
    with run_lock(s3_run, stale_after_s=600):
        assert _lock_object(s3_run)["pid"] == os.getpid()
