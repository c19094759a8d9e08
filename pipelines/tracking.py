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


def setup(cfg: DictConfig) -> str:
    """Point mlflow at the run's store and experiment; return the experiment id."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(cfg))
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
