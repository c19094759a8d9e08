"""Embed stage: CLIP image and text embeddings of every filtered sample, to Parquet.

Ray Data feeds shards to a pool of CLIP actors (one GPU each when there are GPUs, one CPU here);
each actor embeds a whole shard in batches and writes ``<shard>.parquet`` under a deterministic
name, so a re-run replaces files and never appends. Optional embedding-space filters (image-text
similarity, near-duplicates) run afterwards in shard order, each drop counted.

Per-token text encodings are *not* stored: the prior and decoder recompute them from the caption
with the frozen text tower. bench/README.md ("Per-token text encodings: stored or recomputed?",
measured by ``python -m bench.text_tokens``) has the trade-off: storing costs context_length x width
floats per sample, 77 x 1024 float32 = 315 KB in the paper, 77 times the pooled embedding (315 GB
per million samples), while recomputing costs ~1.1% of a decoder training step and ~8.8% of a prior
step in FLOPs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from stages.contract import StageContext, StageResult
from unclip import storage
from unclip.data.loading import iter_decoded
from unclip.data.shards import list_shards
from unclip.embeddings import io as eio

log = logging.getLogger("unclip")


class ShardEmbedder:
    """A Ray Data actor holding one CLIP; embeds whole shards, one Parquet file each."""

    def __init__(self, model_ref: str, out: str, batch_size: int, tracking_uri: str | None):
        import torch

        from unclip.models.clip import load_clip

        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.encoder = load_clip(model_ref)  # the clip stage's record: no clip.arch needed
        if torch.cuda.is_available():
            self.encoder.to("cuda")
        self.out = out
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from PIL import Image

        counts = []
        for shard in batch["shard"]:
            rows = list(iter_decoded(str(shard)))
            keys = [r["key"] for r in rows]
            captions = [r["caption"] for r in rows]
            img, txt = [], []
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i:i + self.batch_size]
                img.append(self.encoder.encode_images([Image.fromarray(r["image"]) for r in chunk],
                                                      normalize=False))
                txt.append(self.encoder.encode_text([r["caption"] for r in chunk]))
            dim = self.encoder.dim
            # unit rows as every stage reads them, and their norms (raw = unit * norm) for models
            # conditioned on raw projections (an imported Karlo decoder being fine-tuned)
            image, norms = eio.unit_rows(np.concatenate(img) if img else np.zeros((0, dim), np.float32))
            text = np.concatenate(txt) if txt else np.zeros((0, dim), np.float32)
            table = eio.to_table(keys, captions, image, text, self.encoder.identity, norms)
            eio.write_table(storage.join(self.out, eio.part_name(storage.basename(str(shard)))), table)
            counts.append(len(rows))
        return {"shard": list(batch["shard"]), "rows": counts}


def run(ctx: StageContext) -> StageResult:
    c = ctx.stage_cfg
    out = ctx.path("embeddings")
    storage.makedirs(out)
    if c.import_from:
        from unclip.embeddings.interop import import_clip_retrieval

        counts = import_clip_retrieval(str(c.import_from), out)
        metrics: dict[str, Any] = {f"import_{k}": v for k, v in counts.items()}
    else:
        shards = list_shards(ctx.input("filter", "shards"))
        actors = int(c.num_actors or ctx.parallelism)
        gpus = 1 if ray.cluster_resources().get("GPU") else 0
        rows = (ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
                .map_batches(ShardEmbedder, batch_size=1, concurrency=min(actors, len(shards)),
                             num_cpus=0 if gpus else 1, num_gpus=gpus,
                             fn_constructor_kwargs={
                                 "model_ref": ctx.input("clip", "model"),
                                 "out": out,
                                 "batch_size": int(c.batch_size),
                                 "tracking_uri": ctx.tracking_uri})
                .take_all())
        metrics = {"embedded": int(sum(r["rows"] for r in rows)), "files": len(rows)}
    metrics.update(_filter(out, c))
    files = eio.list_files(out)
    identity = eio.read_identity(files[0]) if files else None
    kept = sum(eio.read_file(f, ["key"]).num_rows for f in files)
    metrics["rows"] = kept
    return StageResult(outputs={"embeddings": out}, metrics={**metrics, "dim": (identity or {}).get("dim")},
                       summary=f"{kept} embedding rows in {len(files)} files; CLIP {identity}")


def _filter(folder: str, c) -> dict[str, int]:
    """Embedding-space filters over the files in order; rewrites a file only when rows drop."""
    if c.min_similarity is None and c.dedup_threshold is None:
        return {}
    from unclip.embeddings.filters import EmbeddingFilterConfig, NearDuplicateFilter, apply_filters

    fcfg = EmbeddingFilterConfig(min_similarity=c.min_similarity, dedup_threshold=c.dedup_threshold)
    dedup = None
    totals: dict[str, int] = {}
    for uri in eio.list_files(folder):
        table = eio.read_file(uri)
        if dedup is None and c.dedup_threshold is not None:
            dedup = NearDuplicateFilter(float(c.dedup_threshold), table.schema.field(
                "image_embedding").type.list_size)
        kept, counts = apply_filters(table, fcfg, dedup)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + int(v)
        if kept.num_rows != table.num_rows:
            eio.write_table(uri, kept.replace_schema_metadata(table.schema.metadata))
    log.info("embed: embedding filters dropped %s", totals)
    return {f"dropped_{k}": v for k, v in totals.items()}
