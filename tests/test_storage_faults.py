"""S3 faults against a real moto server: a brief outage is retried, a dead endpoint is one clear error."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from conftest import free_port, make_bucket, wait_http
from unclip import storage


def _moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}")
    return proc


@pytest.fixture
def s3_env(monkeypatch):
    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_MAX_ATTEMPTS": "1", "UNCLIP_STORAGE_ATTEMPTS": "4", "UNCLIP_STORAGE_BACKOFF_S": "0.5"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import fsspec

    fsspec.config.conf.pop("s3", None)
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # a fresh client that sees this endpoint
    yield port, env
    S3FileSystem.clear_instance_cache()


def test_dead_endpoint_is_one_clear_error(s3_env):
    port, _ = s3_env
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes("s3://nowhere/run/x.json", b"{}")
    msg = str(info.value)
    assert "writing s3://nowhere/run/x.json failed after 4 attempts" in msg
    assert "AWS_ENDPOINT_URL" in msg and "testing" not in msg  # names the fix, never the secret
    assert time.monotonic() - t0 < 60


def test_brief_outage_is_retried(s3_env, monkeypatch):
    port, env = s3_env
    procs = []
    threading.Thread(target=lambda: (time.sleep(2.0), procs.append(_moto(port))), daemon=True).start()
    try:
        monkeypatch.setenv("UNCLIP_STORAGE_ATTEMPTS", "8")
        t0 = time.monotonic()
        # called while the endpoint is still down: the first attempts fail, a retry gets through
        assert storage.exists("s3://late-bucket/run/a.bin") is False
        assert time.monotonic() - t0 > 1.5 and procs
        make_bucket(env, "late-bucket")
        storage.write_bytes("s3://late-bucket/run/a.bin", b"payload")
        assert storage.read_bytes("s3://late-bucket/run/a.bin") == b"payload"
    finally:
        time.sleep(0.1)
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
