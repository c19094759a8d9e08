"""Execute one stage: check its inputs, clear its old output, run it, write its manifest last."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

from omegaconf import DictConfig

from pipelines import runtime, tracking
from pipelines.config import to_container
from pipelines.context import StageContext, StageResult
from pipelines.graph import Graph
from pipelines.manifest import Manifest, code_version, manifest_uri, write_manifest
from pipelines.status import DONE, HASH_VERSION, evaluate_all, stage_config_hash
from unclip import storage

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot run or failed; the message names the stage and the cause."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def execute(graph: Graph, cfg: DictConfig, name: str) -> Manifest:
    spec = graph[name]
    statuses = evaluate_all(graph, cfg)
    upstream = {}
    for up in spec.inputs:
        st = statuses[up]
        if st.state != DONE or st.manifest is None:
            why = f" ({'; '.join(st.reasons)})" if st.reasons else ""
            raise StageError(f"stage {name!r} needs {up!r}, which is {st.state}{why}: "
                             f"run `make pipeline` or `make stage STAGE={up}` first")
        upstream[up] = st.manifest

    stage_dir = storage.join(cfg.run_dir, name)
    # The manifest goes first: from here until the new one is written, the stage is not done.
    storage.remove(manifest_uri(cfg.run_dir, name))
    storage.remove(stage_dir)
    storage.makedirs(stage_dir)

    external = json.loads(json.dumps(spec.external_fingerprint(cfg), default=str))
    runtime.ensure_ray(cfg)
    started, t0 = _now(), time.monotonic()
    with tracking.stage_run(cfg, name) as run_id:
        import mlflow

        mlflow.log_params(_flat_params({k: to_container(cfg[k]) for k in spec.config_keys}))
        ctx = StageContext(cfg=cfg, name=name, stage_dir=stage_dir, upstream=upstream,
                           mlflow_run_id=run_id)
        result: StageResult = spec.load()(ctx)
        numeric = {k: float(v) for k, v in result.metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            mlflow.log_metrics(numeric)
        duration = time.monotonic() - t0
        mlflow.log_metric("stage_seconds", duration)
    manifest = Manifest(
        stage=name,
        config_hash=stage_config_hash(spec, cfg),
        inputs={up: m.digest for up, m in upstream.items()},
        code_version=code_version(),
        outputs=result.outputs,
        metrics=result.metrics,
        external_inputs=external,
        mlflow_run_id=run_id,
        config={k: to_container(cfg[k]) for k in spec.config_keys},
        started_at=started,
        finished_at=_now(),
        duration_s=round(duration, 3),
        hash_version=HASH_VERSION,
    )
    write_manifest(cfg.run_dir, manifest)
    if result.summary:
        log.info("%s: %s", name, result.summary)
    return manifest


def _flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out
