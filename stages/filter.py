"""Filter stage on Ray Data: drop bad samples by reason, convert the rest to RGB, keep shard names.

Two passes over the shards. The first decodes and checks every sample in parallel and returns a
small row per sample (no pixels); duplicates are then decided in shard order on the driver (keys
and content hashes only). The second pass re-reads each shard and writes the kept samples.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from stages.contract import StageContext, StageResult
from unclip import storage
from unclip.data.filtering import (REASONS, FilterConfig, Verdict, check, clean_caption, encode_rgb,
                                   mark_duplicates)
from unclip.data.shards import RawSample, ShardWriter, iter_shard, list_shards

log = logging.getLogger("unclip")
SCAN_COLUMNS = ["shard", "order", "key", "reason", "detail", "image_sha", "width", "height",
                "caption_cleaned"]


def scan_shard(row: dict[str, Any], cfg: FilterConfig) -> list[dict[str, Any]]:
    """Pass 1: one verdict row per sample (or shard problem), in shard order."""
    out = []
    for order, item in enumerate(iter_shard(row["shard"])):
        v = check(item, cfg)
        out.append(dict(zip(SCAN_COLUMNS, (row["shard"], order, v.key, v.reason, v.detail,
                                           v.image_sha, v.width, v.height, v.caption_cleaned))))
    return out


def write_shard(row: dict[str, Any], cfg: FilterConfig, out: str) -> dict[str, Any]:
    """Pass 2: copy the samples at the kept positions, as RGB, into a shard of the same name."""
    keep = set(row["keep"])
    name = storage.basename(row["shard"])[: -len(".tar")]
    written = 0
    if keep:
        with ShardWriter(out, name) as w:
            for order, item in enumerate(iter_shard(row["shard"])):
                if order not in keep or not isinstance(item, RawSample):
                    continue
                data, ext = encode_rgb(item, cfg)
                meta = item.meta()
                caption = item.caption()
                if caption is not None:  # the text the checks passed, in the .txt and the .json
                    caption = meta["caption"] = clean_caption(caption)[0]
                with Image.open(io.BytesIO(data)) as im:
                    meta.update({"width": im.width, "height": im.height})
                w.write(item.key, data, ext, caption, meta)
                written += 1
        if written != len(keep):
            raise RuntimeError(f"filter: {row['shard']} changed while filtering "
                               f"({written} of {len(keep)} kept samples found)")
    return {"shard": row["shard"], "written": written}


def run(ctx: StageContext) -> StageResult:
    cfg = FilterConfig.from_mapping(ctx.stage_cfg)
    source = ctx.input("data", "shards")
    shards = list_shards(source)
    if not shards:
        raise ValueError(f"filter: no *.tar shards in {source}")
    out = ctx.path("shards")
    storage.makedirs(out)

    rows = (ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
            .flat_map(scan_shard, fn_kwargs={"cfg": cfg})
            .take_all())
    rows.sort(key=lambda r: (r["shard"], r["order"]))
    verdicts = [Verdict(r["key"], r["reason"], r["detail"], r["image_sha"], r["width"], r["height"],
                        bool(r["caption_cleaned"])) for r in rows]
    mark_duplicates(verdicts, cfg)

    keep: dict[str, list[int]] = {s: [] for s in shards}
    for r, v in zip(rows, verdicts):
        if v.reason is None:
            keep[r["shard"]].append(int(r["order"]))
    written = (ray.data.from_items([{"shard": s, "keep": k} for s, k in keep.items()],
                                   override_num_blocks=len(shards))
               .map(write_shard, fn_kwargs={"cfg": cfg, "out": out})
               .take_all())
    n_written = sum(int(r["written"]) for r in written)
    n_cleaned = sum(v.reason is None and v.caption_cleaned for v in verdicts)

    dropped = [(storage.basename(r["shard"]), v.key, v.reason, v.detail)
               for r, v in zip(rows, verdicts) if v.reason is not None]
    counts = Counter(d[2] for d in dropped)
    unknown = set(counts) - set(REASONS)
    if unknown:
        raise RuntimeError(f"filter: reasons without a name in REASONS: {sorted(unknown)}")
    count_table = pa.table({"reason": list(REASONS), "count": [int(counts.get(r, 0)) for r in REASONS]})
    _write_parquet(ctx.path("drop_counts.parquet"), count_table)
    _write_parquet(ctx.path("dropped.parquet"), pa.table(
        dict(zip(["shard", "key", "reason", "detail"], map(list, zip(*dropped)))) if dropped else
        {c: pa.array([], pa.string()) for c in ["shard", "key", "reason", "detail"]}))

    # stray files and unreadable shard tails are not samples
    samples = len(rows) - counts.get("stray_file", 0) - counts.get("unreadable_shard_tail", 0)
    metrics: dict[str, Any] = {"input_samples": samples, "kept": n_written,
                               "dropped": int(sum(counts.values())), "num_shards": len(shards),
                               "caption_cleaned": int(n_cleaned)}
    metrics.update({f"dropped_{r}": int(counts.get(r, 0)) for r in REASONS})
    _log_table(counts, n_written, n_cleaned)
    if ctx.mlflow_run_id:
        import mlflow

        mlflow.log_dict({r: int(counts.get(r, 0)) for r in REASONS}, "filter/drop_counts.json")
    return StageResult(
        outputs={"shards": out, "drop_counts": ctx.path("drop_counts.parquet"),
                 "dropped": ctx.path("dropped.parquet")},
        metrics=metrics,
        summary=(f"kept {n_written} of {samples} samples ({n_cleaned} with control characters "
                 f"cleaned from the caption); dropped {dict(counts) or 'none'}"),
    )


def _write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def _log_table(counts: Counter, kept: int, cleaned: int) -> None:
    lines = ["filter: drop counts by reason"]
    for r in REASONS:
        if counts.get(r):
            lines.append(f"  {r:24s} {counts[r]:8d}")
    lines.append(f"  {'kept':24s} {kept:8d}")
    lines.append(f"  {'  caption_cleaned':24s} {cleaned:8d}  (kept, control characters replaced)")
    log.info("\n".join(lines))
