"""Done / stale / missing for every stage, from the manifests and the current config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from omegaconf import DictConfig

from pipelines.config import config_hash
from pipelines.graph import Graph, StageSpec
from pipelines.manifest import Manifest, code_version, read_manifest
from pipelines.schema.derive import without_added_defaults

DONE, STALE, MISSING = "done", "stale", "missing"


@dataclass
class StageStatus:
    name: str
    state: str
    reasons: list[str] = field(default_factory=list)
    manifest: Manifest | None = None


# 2: the hash covers only the keys that define a stage's result (StageSpec.operational left out);
# 1 (manifests without the field): the whole config subtree. In both, a key the schema added to a
# subtree (pipelines.schema.derive.ADDED) counts only once set to something else than its default,
# so a run directory written before the schema hashes as it did.
HASH_VERSION = 2


def stage_config_hash(spec: StageSpec, cfg: DictConfig) -> str:
    return config_hash(spec.result_config(cfg))


def legacy_config_hash(spec: StageSpec, cfg: DictConfig) -> str:
    """The hash written before HASH_VERSION 2: every key of the stage's subtrees, each subtree as
    its ``str`` (in key order), as ``json.dumps(default=str)`` wrote a DictConfig."""
    return config_hash({k: str(without_added_defaults(cfg[k])) for k in spec.config_keys})


def config_matches(spec: StageSpec, cfg: DictConfig, manifest: Manifest) -> bool:
    if manifest.config_hash == stage_config_hash(spec, cfg):
        return True
    # a run directory written before: its stages stay done while their whole subtree is unchanged
    return manifest.hash_version < 2 and manifest.config_hash == legacy_config_hash(spec, cfg)


def evaluate(spec: StageSpec, cfg: DictConfig, manifest: Manifest | None,
             upstream: dict[str, StageStatus]) -> StageStatus:
    """Status of one stage given its manifest and the statuses of its inputs (already evaluated)."""
    if manifest is None:
        return StageStatus(spec.name, MISSING)
    reasons = []
    if not config_matches(spec, cfg, manifest):
        reasons.append("config changed")
    for name in spec.inputs:
        up = upstream[name]
        if up.state != DONE:
            reasons.append(f"input {name} is {up.state}")
        elif up.manifest is None or manifest.inputs.get(name) != up.manifest.digest:
            reasons.append(f"input {name} changed")
    if cfg.pipeline.code_version_invalidates and \
            manifest.code_version.get("source_sha") != code_version()["source_sha"]:
        reasons.append("code changed")
    if spec.fingerprint and manifest.external_inputs != _json_normal(spec.external_fingerprint(cfg)):
        reasons.append("external input changed")
    return StageStatus(spec.name, STALE if reasons else DONE, reasons, manifest)


def _json_normal(obj):
    return json.loads(json.dumps(obj, default=str))


def evaluate_all(graph: Graph, cfg: DictConfig) -> dict[str, StageStatus]:
    out: dict[str, StageStatus] = {}
    for spec in graph.stages:
        out[spec.name] = evaluate(spec, cfg, read_manifest(cfg.run_dir, spec.name), out)
    return out
