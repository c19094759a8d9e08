"""Ray start-up: a local in-process Ray with explicit resources, or the cluster we run inside."""

from __future__ import annotations

import contextlib
import logging
import os

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Set in the runtime_env of every stage we submit as a Ray job, so the job connects to its cluster
# instead of submitting again.
IN_JOB_ENV = "UNCLIP_IN_RAY_JOB"


def in_ray_job() -> bool:
    return os.environ.get(IN_JOB_ENV) == "1"


def cluster_address(cfg: DictConfig) -> str | None:
    """The Ray cluster to submit stages to, or None for the embedded local Ray."""
    if in_ray_job():
        return None
    return str(cfg.ray.address) if cfg.ray.address else None


# Ray Train's placement-group cleaner asks the State API every second whether the controller still
# lives; the State API is served by the dashboard, which the embedded Ray leaves off (no HTTP job
# API on a user's machine), so it would log a warning a second for the whole training stage.
_QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
# Ray Data's execution plan / "Full logs are in" / progress lines for every dataset and Ray Train's
# controller and checkpoint lines reach the console only with pipeline.verbose; Ray's log files
# (/tmp/ray/session_*/logs: ray-data.log, ray-train-*.log) keep them either way.
VERBOSE_ENV = "UNCLIP_VERBOSE"
RAY_DATA_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")


def quiet_worker_logs() -> None:
    """Runs in every worker process of the embedded Ray before its tasks and actors."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if os.environ.get(VERBOSE_ENV) != "1":
        # Ray Train 2.5x names this one logger by its file path, so LoggingConfig does not reach
        # its "Reporting training result ..." line at every checkpoint
        with contextlib.suppress(Exception):
            from ray.train.v2._internal.execution import context

            logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_env(verbose: bool) -> dict[str, str]:
    """Environment for every Ray worker: Ray Data's console at WARNING unless ``verbose``."""
    env = {VERBOSE_ENV: "1" if verbose else "0"}
    if not verbose:
        env["RAY_DATA_LOGGING_CONFIG"] = RAY_DATA_CONFIG
    return env


def quiet_driver_logs(verbose: bool) -> None:
    """The driver's half: Ray Data's console handler to WARNING (its file handler keeps all)."""
    if verbose:
        return
    import ray.data

    for handler in logging.getLogger("ray.data").handlers:
        if "file" not in type(handler).__name__.lower():
            handler.setLevel(logging.WARNING)
    ray.data.DataContext.get_current().print_on_execution_start = False


def ensure_ray(cfg: DictConfig) -> None:
    import ray

    verbose = bool(cfg.pipeline.get("verbose", False))
    os.environ.update(quiet_env(verbose))  # the driver's own Ray Data and Ray Train read these too
    if ray.is_initialized():
        quiet_driver_logs(verbose)
        return
    if in_ray_job():
        ray.init(log_to_driver=True)  # RAY_ADDRESS is set by the job supervisor
        quiet_driver_logs(verbose)
        return
    os.environ.pop("RAY_ADDRESS", None)  # never attach to a stray cluster by accident
    ray.init(
        address="local",  # a new in-process Ray, even when a `ray start` cluster runs here
        num_cpus=cfg.ray.num_cpus or os.cpu_count(),
        num_gpus=cfg.ray.num_gpus,
        object_store_memory=cfg.ray.object_store_memory,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",  # the embedded Ray listens on loopback only
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
        runtime_env={"worker_process_setup_hook": "pipelines.runtime.quiet_worker_logs",
                     "env_vars": quiet_env(verbose)},
    )
    quiet_driver_logs(verbose)


def parallelism(cfg: DictConfig) -> int:
    import ray

    if cfg.ray.parallelism:
        return int(cfg.ray.parallelism)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
