"""The CLIP stage keeps its decoded training images in memory only when they fit the limit."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from pipelines.context import StageContext
from pipelines.manifest import Manifest
from stages.clip import _cache_decoded


def _ctx(kept: int | None, *overrides: str) -> StageContext:
    cfg = load_config(["preset=tiny", *overrides])
    upstream = {} if kept is None else {"filter": Manifest(
        stage="filter", config_hash="", inputs={}, code_version={}, outputs={}, metrics={"kept": kept})}
    return StageContext(cfg=cfg, name="clip", stage_dir="/nonexistent", upstream=upstream)


def test_small_data_sets_are_cached() -> None:
    assert _cache_decoded(_ctx(4000), 32)           # the tiny preset: 12 MB


def test_data_sets_larger_than_the_limit_stream() -> None:
    assert not _cache_decoded(_ctx(1_000_000), 256)  # paper-like: 196 GB
    limit_rows = int(load_config(["preset=tiny"]).clip.train.cache_decoded_max_mb * 2**20 // (32 * 32 * 3))
    assert _cache_decoded(_ctx(limit_rows), 32)
    assert not _cache_decoded(_ctx(limit_rows + 1), 32)


@pytest.mark.parametrize("kept, overrides", [(4000, ["clip.train.cache_decoded_max_mb=0"]),
                                             (None, [])])
def test_cache_off_or_unknown_size(kept, overrides) -> None:
    assert not _cache_decoded(_ctx(kept, *overrides), 32)
