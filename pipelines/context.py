"""What a stage function receives, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from pipelines.manifest import Manifest
from unclip import storage


@dataclass
class StageContext:
    cfg: DictConfig
    name: str
    stage_dir: str                       # the stage's own folder under run_dir; emptied before a run
    upstream: dict[str, Manifest]        # manifests of the stages it reads
    mlflow_run_id: str | None = None

    @property
    def stage_cfg(self) -> DictConfig:
        return self.cfg[self.name]

    def path(self, *parts: str) -> str:
        return storage.join(self.stage_dir, *parts)

    def input(self, stage: str, output: str) -> str:
        """URI of a named output of an upstream stage."""
        try:
            return self.upstream[stage].outputs[output]
        except KeyError:
            raise KeyError(f"stage {self.name!r}: upstream {stage!r} has no output {output!r}") from None


@dataclass
class StageResult:
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: str = ""                    # one or two human lines printed after the stage
