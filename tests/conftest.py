"""Shared fixtures: one small local Ray for the whole session, tiny on-disk fixtures per test."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

# `make test-fast` (-m "not integration"): the edit-test loop, without the tests that start Ray,
# run the smoke pipeline, a cluster or an MLflow server, or are marked slow.
# Learning tests (a model trained until it beats a baseline) and benchmark runs are whole
# trainings too: by name, `..._learns...`, `..._beats_...`, `..._bench_...`.
HEAVY_FIXTURES = {"smoke_run", "ray_local", "ray_cluster", "mlflow_server"}
HEAVY_NAMES = ("learns", "_beats_", "_bench_")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow") \
                or any(word in item.name for word in HEAVY_NAMES):
            item.add_marker(pytest.mark.integration)


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def _restore_mlflow_env(before: dict) -> None:
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _mlflow_env_restored():
    """MLflow 3's set_tracking_uri / set_experiment export MLFLOW_TRACKING_URI and
    MLFLOW_EXPERIMENT_ID, which a pipeline's config reads as the user's server: a test that points
    mlflow at one store would send every later test's pipeline runs (on copies of the smoke run)
    to it. Each test leaves the variables as it found them."""
    before = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    _restore_mlflow_env(before)


@pytest.fixture(scope="module", autouse=True)
def _mlflow_env_restored_per_module():
    """The same for module fixtures (test_generation's points mlflow at its smoke copy): autouse,
    so it is set up before and torn down after every other fixture of the module."""
    before = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    _restore_mlflow_env(before)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with explicit resources and no dashboard (2-core machines)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, ray_local):
    """The whole pipeline once on the smoke preset; every stage's tests read its outputs."""
    from pipelines.cli import main

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["run", "preset=smoke", f"run_dir={run_dir}"]) == 0
    return run_dir


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(seed: int, size=(40, 40), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def write_raw_tar(path, members: list[tuple[str, bytes]], truncate_to: int | None = None) -> None:
    """A tar with exactly these members (names and bytes as given), optionally cut short."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data[:truncate_to] if truncate_to is not None else data)


# A distinctive secret, so tests can prove it never reaches a log, a manifest or MLflow.
S3_SECRET = "unclip-test-secret-5c1d7e"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


class MlflowServer:
    """A real `mlflow server` on loopback with a sqlite backend and its own artifact folder.

    ``stop``/``start`` keep the same port and store, so tests can take it down and bring it back.
    """

    def __init__(self, root, artifacts: str | None = None, env: dict | None = None):
        self.root = root
        self.artifacts = artifacts or str(root / "artifacts")
        self.env = env or {}
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        import os
        import subprocess
        import sys
        from pathlib import Path

        mlflow_bin = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", self.artifacts],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_http(f"{self.uri}/health", timeout=240)

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback; yields the env to use it."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint)
        env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint,
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": S3_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1"}
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_bucket(env: dict, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key=S3_SECRET).create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """A real two-node Ray cluster on loopback: `ray start --head` plus a worker node joined with
    `ray start --address`, each with its own resources (own ports, temp dir and auth token).

    The nodes hold the S3 credentials in their own environment, as cluster nodes would.
    Yields (dashboard address for job submission, env the clients need).
    """
    import secrets
    import shutil
    import time
    import subprocess
    import sys
    from pathlib import Path

    temp_dir = Path("/tmp") / f"ray-test-{secrets.token_hex(3)}"  # short: unix socket paths
    ray_bin = str(Path(sys.executable).parent / "ray")
    # the cluster's `python` is this environment's, as a cluster image would have the project
    env = {**os.environ, **s3_server, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)

    def ports(*names):
        return {name: free_port() for name in names}

    node_ports = ("node-manager-port", "object-manager-port", "metrics-export-port",
                  "runtime-env-agent-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port")
    head = ports("port", "dashboard-port", "ray-client-server-port", *node_ports)
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
                    "--disable-usage-stats", f"--temp-dir={temp_dir}",
                    *[f"--{k}={v}" for k, v in head.items()]],
                   env=env, check=True, capture_output=True, timeout=180)
    worker = ports(*node_ports)
    subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{head['port']}",
                    "--node-ip-address=127.0.0.1", "--num-cpus=1", '--resources={"worker_node": 1}',
                    "--disable-usage-stats", *[f"--{k}={v}" for k, v in worker.items()]],
                   env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{head['dashboard-port']}"
    try:
        _wait_job_agent(address, env)
        yield address, {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    finally:
        # not `ray stop`: that would stop every Ray on the machine, the session's own included
        for sig in ("-TERM", "-KILL"):
            subprocess.run(["pkill", sig, "-f", str(temp_dir)], capture_output=True)
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def jobs_client_call(address: str, env: dict, code: str, timeout: float = 120) -> str:
    """Run ``code`` with ``client`` bound to a JobSubmissionClient, in a fresh process.

    Ray reads its auth mode once per process, so a client with the cluster's token lives apart
    from the test process (which runs its own token-less local Ray).
    """
    import subprocess
    import sys

    prog = ("import json, time\n"
            "from ray.job_submission import JobSubmissionClient, JobStatus\n"
            f"client = JobSubmissionClient({address!r})\n" + code)
    done = subprocess.run([sys.executable, "-c", prog], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout


def _wait_job_agent(address: str, env: dict, timeout: float = 90.0) -> None:
    """The head answers before its job agent does; wait until a job really runs."""
    jobs_client_call(address, env, (
        f"deadline = time.monotonic() + {timeout}\n"
        "while True:\n"
        "    try:\n"
        "        job = client.submit_job(entrypoint='python -c pass'); break\n"
        "    except Exception:\n"
        "        if time.monotonic() > deadline: raise\n"
        "        time.sleep(1.0)\n"
        "while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):\n"
        "    time.sleep(0.5)\n"), timeout=timeout + 60)
