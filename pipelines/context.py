"""The stage contract lives with the stages (:mod:`stages.contract`); re-exported for the executor."""

from stages.contract import StageContext, StageResult, Upstream

__all__ = ["StageContext", "StageResult", "Upstream"]
