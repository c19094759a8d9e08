"""MLflow set-up: the configured server, or a local sqlite store inside the run directory."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from omegaconf import DictConfig

from unclip import storage

log = logging.getLogger(__name__)


def tracking_uri(cfg: DictConfig) -> str:
    """``mlflow.tracking_uri`` (or MLFLOW_TRACKING_URI), else ``sqlite:///<run_dir>/mlflow.db``.

    With a remote run_dir and no server, the sqlite file stays on local disk (sqlite cannot live
    on S3) under ``runs/<preset>/``, while artifacts still go to the run_dir.
    """
    if cfg.mlflow.tracking_uri:
        return str(cfg.mlflow.tracking_uri)
    local_dir = cfg.run_dir if not storage.is_remote(cfg.run_dir) else \
        os.path.abspath(os.path.join("runs", str(cfg.preset_name)))
    os.makedirs(local_dir, exist_ok=True)
    return f"sqlite:///{os.path.join(local_dir, 'mlflow.db')}"


def artifact_location(cfg: DictConfig) -> str | None:
    """Artifacts of a database store live under the run directory; a server decides its own."""
    if str(tracking_uri(cfg)).startswith(("http://", "https://", "databricks")):
        return None
    loc = storage.join(cfg.run_dir, "mlartifacts")
    return loc if storage.is_remote(loc) else "file://" + loc


class TrackingError(RuntimeError):
    """The configured MLflow server cannot be used; the message says which and what to do."""


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail at once, in one line, when a tracking server is down at start.

    Mid-run hiccups are a different matter: the MLflow client retries each request with backoff
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR), so a server that comes
    back within a minute or two loses nothing.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # an authenticating proxy answers: the server is there
            return
        raise TrackingError(f"MLflow tracking server {_redact(uri)} answered HTTP {exc.code} on "
                            f"/health; check MLFLOW_TRACKING_URI") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"MLflow tracking server {_redact(uri)} is not reachable ({reason}); "
                            f"start it, or unset MLFLOW_TRACKING_URI to use the local store in "
                            f"the run directory") from None


def _redact(uri: str) -> str:
    """user:password@host -> ***@host: credentials never reach a log line."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


# MLflow 3 exports what set_tracking_uri / set_experiment are given as these variables; the
# config reads MLFLOW_TRACKING_URI as the user's server, so a second run in the same process (on
# another run_dir) would log to the first one's store. setup keeps them as the user left them.
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextlib.contextmanager
def _user_env_kept() -> Iterator[None]:
    before = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def setup(cfg: DictConfig) -> str:
    """Point mlflow at the run's store and experiment (this process only: the user's
    MLFLOW_* variables stay as they were); return the experiment id."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    check_reachable(uri)
    with _user_env_kept():
        mlflow.set_tracking_uri(uri)
        name = str(cfg.mlflow.experiment)
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            exp_id = mlflow.create_experiment(name, artifact_location=artifact_location(cfg))
        else:
            exp_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextlib.contextmanager
def stage_run(cfg: DictConfig, stage: str) -> Iterator[str]:
    """An MLflow run for one stage execution; yields its run id."""
    import mlflow

    setup(cfg)
    with mlflow.start_run(run_name=stage, tags={"unclip.stage": stage, "unclip.run_dir": cfg.run_dir,
                                                 "unclip.preset": str(cfg.preset_name)}) as run:
        yield run.info.run_id
