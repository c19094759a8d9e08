"""The stage contract: what the executor hands a stage, and what the stage hands back.

Stages import this module, never the orchestrator (``pipelines``): everything a stage needs from
the run (its config and the hash of the keys that define its result, its upstream stages' declared
outputs, its folder, the tracking server, the cluster's parallelism) arrives in
:class:`StageContext`. Dependencies point one way: pipelines -> stages -> unclip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from omegaconf import DictConfig, OmegaConf

from unclip import storage


class Upstream(Protocol):
    """A finished upstream stage as the executor found it (its manifest)."""

    outputs: dict[str, str]
    metrics: dict[str, Any]


@dataclass
class StageContext:
    cfg: DictConfig
    name: str
    stage_dir: str                       # the stage's own folder under run_dir; emptied before a run
    upstream: Mapping[str, Upstream]     # the finished stages it reads, by name
    mlflow_run_id: str | None = None
    # "stage.output" pairs the stage spec declares it reads (empty: any output of ``upstream``)
    reads: tuple[str, ...] = ()
    config_hash: str = ""                # of the keys that define the result: checkpoint names
    legacy_hashes: tuple[str, ...] = ()  # what older versions named the same result
    tracking_uri: str = ""               # the MLflow server (or local store) the run logs to
    parallelism: int = 1                 # Ray tasks the cluster runs at once (its CPUs, or ray.parallelism)
    verbose: bool = False                # pipeline.verbose: Ray Train / Data at INFO on the console

    @property
    def stage_cfg(self) -> DictConfig:
        return self.cfg[self.name]

    def path(self, *parts: str) -> str:
        return storage.join(self.stage_dir, *parts)

    def input(self, stage: str, output: str) -> str:
        """URI of a declared output of an upstream stage."""
        if self.reads and f"{stage}.{output}" not in self.reads:
            raise KeyError(f"stage {self.name!r} reads {stage}.{output}, which its spec does not "
                           f"declare (declared: {', '.join(self.reads)})")
        try:
            return self.upstream[stage].outputs[output]
        except KeyError:
            raise KeyError(f"stage {self.name!r}: upstream {stage!r} has no output {output!r}") from None


@dataclass
class StageResult:
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: str = ""                    # one or two human lines printed after the stage


def to_container(cfg: Any) -> Any:
    """A config subtree as plain (resolved) Python values; anything else as it is."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg
