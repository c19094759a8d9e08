"""Per-token text encodings: store them next to the embeddings, or recompute them while training?

The prior and the decoder condition on the CLIP text tower's final token states (context x width
floats per caption), not only on the pooled embedding. This script measures both options:

* recompute: ``ClipEncoder.encode_text_tokens`` on a batch of captions (tokenize + text tower);
* store: read the same batch back from a Parquet file holding the per-token encodings (written
  here, float32 and float16, dictionary encoding off so repeated values cannot flatter the size);

for the tiny preset's CLIP (configs/preset/tiny.yaml, random weights: the cost does not depend on
them) and the paper's sizes (open_clip ViT-H-14 text tower: context 77 x width 1024, 24 layers).
Bytes per sample are measured from the files and, for the paper, also computed analytically. The
paper-size text tower is timed on a small batch (it is a 354M-parameter tower on whatever CPU runs
this), and the hardware-independent comparison is in FLOPs, counted by torch's FlopCounterMode on
meta tensors (no weights, no memory): the text tower's forward pass per caption against a training
step of the consumers.

    .venv/bin/python -m bench.text_tokens [--batch 128] [--paper-batch 8] [--repeats 5] [--threads 1]

Prints a table and writes bench/results/text_tokens.json; the conclusion is in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench import common

RESULTS = Path(__file__).resolve().parent / "results" / "text_tokens.json"
PAPER_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}
PAPER_EMBED_DIM = 1024
PAPER_NUM_SAMPLES = 1_000_000  # configs/preset/paper.yaml data.num_samples
# The paper's decoder (Table 3: 64x64, channels 512, depth 3, multipliers 1,2,3,4, attention at
# 32/16/8, learned variance), as a diffusers UNet2DModel without GLIDE's text transformer: fewer
# parameters (1.9B) than the paper's 3.5B, so its FLOPs are a lower bound on the real decoder's.
PAPER_DECODER = dict(sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
                     block_out_channels=(512, 1024, 1536, 2048),
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                       "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=64)
PAPER_PRIOR_PARAMS = 1.0e9     # Table 3: 1B-parameter decoder-only transformer
PAPER_PRIOR_TOKENS = 77 + 4    # text tokens + z_t, timestep, noised z_i, final query


def captions(n: int, seed: int = 0) -> list[str]:
    """Captions of the embedded synthetic data set (what the tiny preset trains on)."""
    from unclip.data.shapes import sample_scene

    rng = np.random.default_rng(seed)
    return [sample_scene(rng).caption for _ in range(n)]


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def token_table(tokens: np.ndarray, dtype: np.dtype) -> pa.Table:
    """Per-token encodings as one fixed-size list column (L*W values per row) + the valid length."""
    b, length, width = tokens.shape
    flat = pa.array(np.ascontiguousarray(tokens, dtype=dtype).reshape(-1))
    col = pa.FixedSizeListArray.from_arrays(flat, length * width)
    return pa.table({"text_tokens": col, "n_tokens": pa.array(np.full(b, length, np.int16))})


def read_tokens(path: str, length: int, width: int) -> np.ndarray:
    table = pq.read_table(path)
    col = table.column("text_tokens").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, length, width)


def measure_store(tokens: np.ndarray, repeats: int, tmp: str, tag: str) -> list[dict[str, Any]]:
    """Write the batch to Parquet (float32 and float16), time reading it back into (B, L, W)."""
    rows = []
    b, length, width = tokens.shape
    for name, dtype in (("float32", np.float32), ("float16", np.float16)):
        path = os.path.join(tmp, f"{tag}-{name}.parquet")
        pq.write_table(token_table(tokens, dtype), path, use_dictionary=False, compression="snappy")
        back = read_tokens(path, length, width)
        assert back.shape == tokens.shape
        seconds = timed(lambda: read_tokens(path, length, width), repeats)
        rows.append({"option": f"store {name} (Parquet read, local disk, page cache warm)",
                     "bytes_per_sample": os.path.getsize(path) / b,
                     "batch_seconds": seconds, "ms_per_sample": 1e3 * seconds / b})
    return rows


def text_tower_flops(text_cfg: dict[str, Any], embed_dim: int) -> tuple[float, int]:
    """(forward FLOPs per caption, parameters) of an open_clip text tower, counted on meta tensors."""
    from open_clip.model import CLIPTextCfg, _build_text_tower
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        tower = _build_text_tower(embed_dim, CLIPTextCfg(**text_cfg))
        tokens = torch.zeros(1, int(text_cfg["context_length"]), dtype=torch.long)
        with FlopCounterMode(display=False) as fc:
            tower(tokens)
    return float(fc.get_total_flops()), sum(p.numel() for p in tower.parameters())


def decoder_step_flops() -> tuple[float, int]:
    """(forward + backward FLOPs per sample, parameters) of the paper-sized decoder UNet (meta)."""
    from diffusers import UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DModel(**PAPER_DECODER)
        x, t = torch.zeros(1, 3, 64, 64), torch.zeros(1)
        with FlopCounterMode(display=False) as fc:
            unet(x, t).sample.sum().backward()
    return float(fc.get_total_flops()), sum(p.numel() for p in unet.parameters())


def bench_tiny(batch: int, repeats: int, tmp: str) -> dict[str, Any]:
    from pipelines.config import load_config, to_container
    from unclip.models.clip import ClipEncoder, create_custom

    model_cfg = to_container(load_config(["preset=tiny"]).clip.model)
    enc = ClipEncoder(create_custom(model_cfg), {"arch": "custom", "source": "bench"}, model_cfg)
    caps = captions(batch)
    pooled, tokens, mask = enc.encode_text_tokens(caps)
    seconds = timed(lambda: enc.encode_text_tokens(caps), repeats)
    length, width = tokens.shape[1:]
    mean_tokens = float(mask.sum(1).mean())
    rows = [{"option": "recompute (tokenize + text tower, CPU)",
             "bytes_per_sample": 0.0, "batch_seconds": seconds, "ms_per_sample": 1e3 * seconds / batch}]
    rows += measure_store(tokens, repeats, tmp, "tiny")
    flops, params = text_tower_flops(model_cfg["text_cfg"], int(model_cfg["embed_dim"]))
    return {"config": "tiny", "context_length": int(length), "width": int(width),
            "embed_dim": int(pooled.shape[1]), "batch": batch, "mean_tokens": mean_tokens,
            "caption_bytes_per_sample": float(np.mean([len(c.encode()) for c in caps])),
            "pooled_bytes_per_sample": 4 * int(pooled.shape[1]),
            "tokens_float32_bytes_per_sample": 4 * int(length * width),
            "text_tower_gflop_per_sample": flops / 1e9, "text_tower_params": params, "rows": rows}


def bench_paper(batch: int, paper_batch: int, repeats: int, tmp: str) -> dict[str, Any]:
    from unclip.models.clip import ClipEncoder, create_custom

    length, width = PAPER_TEXT["context_length"], PAPER_TEXT["width"]
    caps = captions(batch)
    # the real-size text tower (random weights) behind a minimal image tower, so the timed call is
    # the very ClipEncoder.encode_text_tokens training would make; timed on a small batch
    model_cfg = {"embed_dim": PAPER_EMBED_DIM, "text_cfg": PAPER_TEXT,
                 "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 64, "layers": 1,
                                "head_width": 32}}
    enc = ClipEncoder(create_custom(model_cfg), {"arch": "custom", "source": "bench"}, model_cfg)
    mean_tokens = float(enc.encode_text_tokens(caps[:32])[2].sum(1).mean())
    small = caps[:paper_batch]
    seconds = timed(lambda: enc.encode_text_tokens(small), max(1, repeats // 2))
    del enc
    rows = [{"option": f"recompute (tokenize + text tower, CPU, timed at batch {paper_batch})",
             "bytes_per_sample": 0.0, "batch_seconds": seconds * batch / paper_batch,
             "ms_per_sample": 1e3 * seconds / paper_batch}]
    # stored encodings of unit scale; Gaussian values so the file size is what real floats give
    tokens = np.random.default_rng(0).standard_normal((batch, length, width), dtype=np.float32)
    rows += measure_store(tokens, repeats, tmp, "paper")
    text_flops, text_params = text_tower_flops(PAPER_TEXT, PAPER_EMBED_DIM)
    dec_flops, dec_params = decoder_step_flops()
    prior_flops = 6 * PAPER_PRIOR_PARAMS * PAPER_PRIOR_TOKENS
    fp32 = 4 * length * width
    return {"config": "paper", "context_length": length, "width": width, "embed_dim": PAPER_EMBED_DIM,
            "batch": batch, "mean_tokens_shapes_captions": mean_tokens,
            "pooled_bytes_per_sample": 4 * PAPER_EMBED_DIM,
            "tokens_float32_bytes_per_sample": fp32,
            "tokens_float16_bytes_per_sample": fp32 // 2,
            "tokens_float32_trimmed_bytes_per_sample": 4 * width * mean_tokens,
            "storage_float32_gb_for_paper_preset": fp32 * PAPER_NUM_SAMPLES / 1e9,
            "storage_float16_gb_for_paper_preset": fp32 // 2 * PAPER_NUM_SAMPLES / 1e9,
            "text_tower_gflop_per_sample": text_flops / 1e9, "text_tower_params": text_params,
            "decoder_unet_gflop_per_sample_fwd_bwd": dec_flops / 1e9, "decoder_unet_params": dec_params,
            "prior_gflop_per_sample_fwd_bwd_6NT": prior_flops / 1e9,
            "recompute_share_of_decoder_step": text_flops / (dec_flops + text_flops),
            "recompute_share_of_prior_step": text_flops / (prior_flops + text_flops),
            "rows": rows}


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'config':7} {'option':68} {'bytes/sample':>13} {'s/batch':>9} {'ms/sample':>10}"
    print(head)
    print("-" * len(head))
    for res in results:
        for r in res["rows"]:
            print(f"{res['config']:7} {r['option']:68} {r['bytes_per_sample']:13,.0f} "
                  f"{r['batch_seconds']:9.4f} {r['ms_per_sample']:10.3f}")
    for res in results:
        print(f"\n{res['config']}: context {res['context_length']} x width {res['width']}; pooled "
              f"embedding {res['pooled_bytes_per_sample']:,} B/sample, per-token float32 "
              f"{res['tokens_float32_bytes_per_sample']:,} B/sample "
              f"({res['tokens_float32_bytes_per_sample'] / res['pooled_bytes_per_sample']:.0f}x); "
              f"text tower {res['text_tower_gflop_per_sample']:.3f} GFLOP/caption")
    paper = next((r for r in results if r["config"] == "paper"), None)
    if paper:
        print(f"paper: storing float32 tokens for {PAPER_NUM_SAMPLES:,} samples = "
              f"{paper['storage_float32_gb_for_paper_preset']:.0f} GB "
              f"(float16 {paper['storage_float16_gb_for_paper_preset']:.0f} GB); recomputing costs "
              f"{100 * paper['recompute_share_of_decoder_step']:.1f}% of a decoder training step "
              f"(UNet {paper['decoder_unet_gflop_per_sample_fwd_bwd']:.0f} GFLOP/sample fwd+bwd, a "
              f"lower bound) and {100 * paper['recompute_share_of_prior_step']:.1f}% of a prior step "
              f"(6NT = {paper['prior_gflop_per_sample_fwd_bwd_6NT']:.0f} GFLOP/sample)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    p.add_argument("--batch", type=int, default=128, help="captions per batch")
    p.add_argument("--paper-batch", type=int, default=8,
                   help="captions the paper-size text tower is timed on (CPU: keep small)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 keeps timings stable on a shared machine (two threads "
                        "on two busy cores spin and measured 10-20x slower here)")
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_tiny(args.batch, args.repeats, tmp)]
        if not args.skip_paper:
            results.append(bench_paper(args.batch, args.paper_batch, args.repeats, tmp))
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpu_count": os.cpu_count(), "torch_threads":
                                           torch.get_num_threads(), "platform": platform.platform()},
                               "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
