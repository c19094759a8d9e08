"""How fast can each input pipeline feed the decoder, against how fast the decoder eats?

    .venv/bin/python -m bench.decoder_feed --run-dir /tmp/tiny-run [--size 32] [--batch 32]

Feeds compared (all yield batches of {image (B, S, S, 3) uint8, image_embedding, caption}, joined by
key with the embed stage's Parquet):

  ray-stream        Ray Data from the shards, decoding + resizing every epoch (2 CPU tasks)
  ray-materialized  the same, decoded once into the object store; an epoch re-reads 3 KB arrays
  wds-stream        webdataset (tar streaming, PIL decode, resize) in a torch DataLoader
  wds-stream-2w     the same with 2 DataLoader worker processes

and the consumer: one decoder training step (the tiny preset's model) in samples/s. Rates are wall
clock on whatever else the machine is doing: run it on a quiet machine for absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _shards_and_embeddings(run_dir: str) -> tuple[list[str], str]:
    from unclip.data.shards import list_shards

    def out(stage: str, key: str) -> str:
        with open(os.path.join(run_dir, stage, "manifest.json")) as f:
            return json.load(f)["outputs"][key]

    return list_shards(out("filter", "shards")), out("embed", "embeddings")


def _count(batches, limit: int) -> tuple[int, float]:
    t0, n = time.monotonic(), 0
    for b in batches:
        n += len(b["image"])
        if n >= limit:
            break
    return n, time.monotonic() - t0


def ray_feeds(shards: list[str], emb: str, size: int, batch: int, limit: int) -> dict[str, dict]:
    import ray

    from unclip.data.paired import PairedRows

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def ds():
        return (ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
                .flat_map(PairedRows(emb, size, "all", 0.0)))

    out = {}
    n, s = _count(ds().iter_batches(batch_size=batch, batch_format="numpy"), limit)
    out["ray-stream"] = {"samples": n, "seconds": s}
    t0 = time.monotonic()
    mat = ds().materialize()
    first = time.monotonic() - t0
    n, s = _count(mat.iter_batches(batch_size=batch, batch_format="numpy",
                                   local_shuffle_buffer_size=4096), limit)
    out["ray-materialized"] = {"samples": n, "seconds": s, "first_pass_s": first}
    return out


def wds_feed(shards: list[str], emb: str, size: int, batch: int, limit: int,
             workers: int) -> dict:
    import torch
    import webdataset as wds
    from PIL import Image

    from unclip.data.paired import shard_embeddings

    index: dict[str, np.ndarray] = {}
    for s in shards:
        index.update(shard_embeddings(s, emb))

    def prep(sample):
        img = sample["png"] if "png" in sample else sample["jpg"]
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        return {"image": np.asarray(img, np.uint8), "caption": sample["txt"],
                "image_embedding": index[sample["__key__"]]}

    def collate(rows):
        return {"image": np.stack([r["image"] for r in rows]),
                "image_embedding": np.stack([r["image_embedding"] for r in rows]),
                "caption": [r["caption"] for r in rows]}

    urls = [s[len("file://"):] if s.startswith("file://") else s for s in shards]
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
          .decode("pil").select(lambda s: s["__key__"] in index).map(prep))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                         collate_fn=collate)
    n, s = _count(loader, limit)
    return {"samples": n, "seconds": s}


def model_rate(size: int, batch: int, clip_dim: int, text_width: int, steps: int = 5) -> dict:
    """Samples/s of decoder training steps with the default (tiny) model at ``size`` px."""
    import torch
    from omegaconf import OmegaConf

    from pipelines.config import load_config
    from unclip.diffusion import DiffusionConfig, GaussianDiffusion
    from unclip.models.decoder import Decoder, DecoderConfig, dropout_masks

    c = load_config(["~preset"]).decoder  # the schema with configs/decoder/default.yaml
    mcfg = {**OmegaConf.to_container(c.model), "resolution": size, "clip_dim": clip_dim,
            "text_width": text_width}
    dcfg = DiffusionConfig.from_dict(OmegaConf.to_container(c.diffusion))
    m = Decoder(DecoderConfig.from_dict(mcfg), dcfg)
    gd = GaussianDiffusion(dcfg)
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    x0 = torch.rand(batch, 3, size, size) * 2 - 1
    z, ts = torch.randn(batch, clip_dim), torch.randn(batch, 24, text_width)
    times = []
    for i in range(steps + 2):
        t0, c0 = time.monotonic(), time.process_time()
        drop_clip, drop_caption = dropout_masks(batch, 0.1, 0.5)
        loss = gd.training_losses(lambda x, t: m(x, t, z, ts, None, drop_clip, drop_caption), x0)["loss"]
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        if i >= 2:
            times.append((time.monotonic() - t0, time.process_time() - c0))
    wall, cpu = np.mean(times, axis=0)
    return {"samples": batch * steps, "seconds": wall * steps, "cpu_s_per_step": cpu,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a run with the filter and embed stages done")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--limit", type=int, default=2000, help="samples read per feed")
    a = p.parse_args()
    shards, emb = _shards_and_embeddings(a.run_dir)
    from unclip.embeddings import io as eio

    ident = eio.read_identity(eio.list_files(emb)[0]) or {}
    rows = {}
    rows.update(ray_feeds(shards, emb, a.size, a.batch, a.limit))
    rows["wds-stream"] = wds_feed(shards, emb, a.size, a.batch, a.limit, 0)
    rows["wds-stream-2w"] = wds_feed(shards, emb, a.size, a.batch, a.limit, 2)
    rows["decoder-train-step"] = model_rate(a.size, a.batch, int(ident.get("dim", 96)), int(ident.get("dim", 96)))
    from bench.common import machine, write_result

    write_result("decoder_feed", {"machine": machine(), "size": a.size, "batch": a.batch,
                                  "rows": [{"feed": k, **v, "samples_per_s": v["samples"] / v["seconds"]}
                                           for k, v in rows.items()]})
    print(f"{'feed':<20}{'samples':>9}{'seconds':>9}{'samples/s':>11}  notes")
    for name, r in rows.items():
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r.items() if k not in ("samples", "seconds"))
        print(f"{name:<20}{r['samples']:>9}{r['seconds']:>9.2f}{r['samples'] / r['seconds']:>11.0f}  {notes}")


if __name__ == "__main__":
    main()
