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
from pipelines.status import DONE, HASH_VERSION, evaluate_all, legacy_config_hash, stage_config_hash
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
        ctx = stage_context(spec, cfg, upstream, stage_dir, run_id)
        result: StageResult = spec.load()(ctx)
        _check_outputs(spec, result)
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


def stage_context(spec, cfg: DictConfig, upstream: dict, stage_dir: str,
                  run_id: str | None = None) -> StageContext:
    """All a stage gets from the run, in one object (Ray must be up: parallelism asks the cluster)."""
    return StageContext(cfg=cfg, name=spec.name, stage_dir=stage_dir, upstream=upstream,
                        mlflow_run_id=run_id, reads=spec.reads,
                        config_hash=stage_config_hash(spec, cfg),
                        legacy_hashes=(legacy_config_hash(spec, cfg),),
                        tracking_uri=tracking.tracking_uri(cfg), parallelism=runtime.parallelism(cfg),
                        verbose=bool(cfg.pipeline.get("verbose", False)))


def _check_outputs(spec, result: StageResult) -> None:
    """A stage returns exactly the outputs its spec declares (what downstream stages may read)."""
    if spec.outputs and set(result.outputs) != set(spec.outputs):
        missing = sorted(set(spec.outputs) - set(result.outputs))
        extra = sorted(set(result.outputs) - set(spec.outputs))
        raise StageError(f"stage {spec.name!r} returned outputs {sorted(result.outputs)}; its spec "
                         f"declares {list(spec.outputs)} (missing {missing}, undeclared {extra})")


def _flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out
