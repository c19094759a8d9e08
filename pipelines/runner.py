"""Run the stage graph: every stale or missing stage in order, locally or as Ray jobs."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from pipelines import runtime, tracking
from pipelines.executor import StageError, execute
from pipelines.graph import Graph
from pipelines.lock import run_lock
from pipelines.plan.checks import check as check_config
from pipelines.manifest import read_manifest
from pipelines.status import DONE, evaluate_all

log = logging.getLogger("unclip")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class StageRun:
    name: str
    action: str          # "ran" | "skipped"
    seconds: float
    note: str = ""


def run(graph: Graph, cfg: DictConfig, overrides: Sequence[str], stages: Sequence[str] | None = None,
        force: bool = False) -> list[StageRun]:
    """Run ``stages`` (default: all) in graph order, skipping those already done unless forced."""
    wanted = [s.name for s in graph.stages] if stages is None else [graph[s].name for s in stages]
    check_config(cfg)  # a value out of its range fails now (keys and types did at composition)
    tracking.check_reachable(tracking.tracking_uri(cfg))  # a dead server fails now, not mid-run
    lock_cfg = cfg.pipeline.get("lock") or {}
    with run_lock(str(cfg.run_dir), float(lock_cfg.get("stale_after_s", 120)),
                  float(lock_cfg.get("refresh_s", 30))) as lock:
        return _run_locked(graph, cfg, overrides, wanted, force, lock)


def _run_locked(graph: Graph, cfg: DictConfig, overrides: Sequence[str], wanted: list[str],
                force: bool, lock) -> list[StageRun]:
    report: list[StageRun] = []
    names = [s.name for s in graph.stages if s.name in wanted]
    for i, name in enumerate(names, 1):
        lock.check()
        st = evaluate_all(graph, cfg)[name]
        step = f"[{i}/{len(names)}]"
        if st.state == DONE and not force:
            log.info("%s stage %-9s done, skipped", step, name)
            report.append(StageRun(name, "skipped", 0.0, "done"))
            continue
        why = "forced" if force and st.state == DONE else (
            "; ".join(st.reasons) if st.reasons else st.state)
        log.info("%s stage %-9s running (%s)", step, name, why)
        t0 = time.monotonic()
        address = runtime.cluster_address(cfg)
        if address:
            submit_stage(address, cfg, name, overrides)
        else:
            execute(graph, cfg, name)
        seconds = time.monotonic() - t0
        manifest = read_manifest(cfg.run_dir, name)
        if manifest is None:
            raise StageError(f"stage {name!r} finished without a manifest in {cfg.run_dir}")
        log.info("%s stage %-9s finished in %s", step, name, _duration(seconds))
        report.append(StageRun(name, "ran", seconds, why))
    return report


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def submit_stage(address: str, cfg: DictConfig, name: str, overrides: Sequence[str]) -> None:
    """Run one stage as a Ray job on the cluster at ``address`` and wait for it, streaming its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    _use_token_if_available()
    client = JobSubmissionClient(address)
    args = " ".join(_shell_quote(o) for o in [*overrides, f"run_dir={cfg.run_dir}"])
    env = {runtime.IN_JOB_ENV: "1"}
    # Non-secret settings travel with the job; credentials must come from the cluster's own
    # environment (the job's runtime_env is visible in the Ray dashboard).
    for var in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
                "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    job_id = client.submit_job(
        entrypoint=f"python -m pipelines.job {name} {args}",
        runtime_env={"working_dir": str(ROOT), "env_vars": env,
                     "excludes": [".venv", "runs", ".git", "*.pyc", "__pycache__", ".pytest_cache"]},
        metadata={"unclip.stage": name},
    )
    log.info("stage %-9s submitted as Ray job %s to %s", name, job_id, address)
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            print(logs[shown:], end="", flush=True)
            shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1.0)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise StageError(f"stage {name!r}: Ray job {job_id} {status.value.lower()}: "
                         f"{(info.message or '').strip().splitlines()[-1:] or ''}")


def _use_token_if_available() -> None:
    """Ray enables token auth on a new head whenever a token exists: present it if we have one."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def _shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)
