"""Data stage: synthetic shapes shards, an image-folder import, or existing shards as they are."""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import numpy as np
import ray
from omegaconf import DictConfig

from stages.contract import StageContext, StageResult
from stages.progress import ray_progress
from unclip import storage
from unclip.data import importer
from unclip.data.shards import ShardWriter, list_shards, sample_key, shard_name

log = logging.getLogger("unclip")


def source_kind(c: DictConfig) -> str:
    """'shapes', 'shards' (a folder of *.tar) or 'import' (a folder of images + a caption table)."""
    if c.source == "shapes":
        return "shapes"
    if c.captions:
        return "import"
    if list_shards(c.source):
        return "shards"
    raise ValueError(f"data.source={c.source}: no *.tar shards there; for a folder of images set "
                     "data.captions to a CSV/Parquet caption table")


def fingerprint(cfg: DictConfig) -> Any:
    """Identity of external inputs: the listing of the source shards or of the import files."""
    c = cfg.data
    if c.source == "shapes":
        return None
    if c.captions:
        return {"captions": storage.fingerprint([c.captions])}
    return {"shards": storage.fingerprint(list_shards(c.source))}


def run(ctx: StageContext) -> StageResult:
    c = ctx.stage_cfg
    kind = source_kind(c)
    if kind == "shards":
        shards = list_shards(c.source)
        log.info("data: using %d existing shards at %s as they are", len(shards), c.source)
        return StageResult(outputs={"shards": c.source}, metrics={"num_shards": len(shards)},
                           summary=f"{len(shards)} shards at {c.source}")
    out = ctx.path("shards")
    storage.makedirs(out)
    if kind == "shapes":
        metrics = _generate(c, out, ctx)
    else:
        metrics = _import(c, out, ctx)
    return StageResult(outputs={"shards": out}, metrics=metrics,
                       summary=", ".join(f"{k}={v}" for k, v in metrics.items()))


def _scene_kwargs(c: DictConfig) -> dict[str, float]:
    return {"two_object_prob": float(c.two_object_prob), "size_word_prob": float(c.size_word_prob),
            "position_word_prob": float(c.position_word_prob)}


def write_shapes_shard(out: str, shard_index: int, start: int, count: int, seed: int, resolution: int,
                       supersample: int, image_format: str, samples_per_shard: int,
                       scene_kwargs: dict[str, float]) -> int:
    """Render samples [start, start+count) into shard ``shard_index``; deterministic per seed."""
    from unclip.data import shapes

    fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[image_format]
    ext = "jpg" if fmt == "JPEG" else image_format
    with ShardWriter(out, shard_name(shard_index)) as w:
        for j in range(count):
            index = start + j
            rng = np.random.default_rng([seed, index])
            scene = shapes.sample_scene(rng, **scene_kwargs)
            img = shapes.render(scene, resolution, supersample=supersample)
            buf = io.BytesIO()
            img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            meta = {"width": img.width, "height": img.height, "index": index, "seed": seed,
                    "scene": scene.to_json()}
            w.write(sample_key(shard_index, j, samples_per_shard), buf.getvalue(), ext, scene.caption,
                    meta)
    return count


def _generate(c: DictConfig, out: str, ctx: StageContext) -> dict[str, Any]:
    if not 1 <= int(c.resolution) <= 1024:
        raise ValueError(f"data.resolution={c.resolution}: must be between 1 and 1024")
    if str(c.image_format) not in ("png", "jpg", "jpeg", "webp"):
        raise ValueError(f"data.image_format={c.image_format}: use png, jpg or webp")
    n, per = int(c.num_samples), int(c.samples_per_shard)
    n_shards = math.ceil(n / per)
    task = ray.remote(num_cpus=1)(write_shapes_shard)
    refs = [task.remote(out, i, i * per, min(per, n - i * per), int(c.seed), int(c.resolution),
                        int(c.supersample), str(c.image_format), per, _scene_kwargs(c))
            for i in range(n_shards)]
    written = sum(ray_progress(refs, desc="data: shards", unit="shard"))
    return {"num_samples": written, "num_shards": n_shards, "resolution": int(c.resolution)}


def _import(c: DictConfig, out: str, ctx: StageContext) -> dict[str, Any]:
    rows = importer.read_caption_table(c.captions, c.image_column, c.caption_column)
    per = int(c.samples_per_shard)
    groups = [rows[i:i + per] for i in range(0, len(rows), per)]
    task = ray.remote(num_cpus=1)(importer.write_import_shard)
    refs = [task.remote(c.source, i, g, out, per) for i, g in enumerate(groups)]
    totals: dict[str, int] = {}
    for counts in ray_progress(refs, desc="data: import", unit="shard"):
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    skipped = {k: v for k, v in totals.items() if k != "written" and v}
    if skipped:
        log.warning("data: import skipped %s", skipped)
    return {"num_samples": totals.get("written", 0), "num_shards": len(groups),
            "rows_in_table": len(rows), **{f"skipped_{k}": v for k, v in skipped.items()}}
