"""Training throughput of the prior, the decoder and the two upsamplers at the tiny preset's sizes:
samples/s of one full step (forward + diffusion loss + backward + clipping + AdamW + EMA, as the
shared loop does it), FLOPs per step (torch's FlopCounterMode on forward + backward) and the
achieved FLOP/s as a fraction of this machine's measured float32 matmul peak.

    .venv/bin/python -m bench.training [--quick] [--threads 1] [--device cpu|cuda]

Each upsampler is the preset's own (its stage's model config and training batch); its batches are
crops a quarter of the target side (tiny: 32 px crops for 32->128, 128 px crops for 128->512).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch

from bench import common
from bench import models as M


def cases(s: M.Sizes, quick: bool) -> list[tuple[str, Callable[[], torch.nn.Module], Callable, Callable]]:
    """(name, model factory, loss factory, batch factory(generator))."""
    return [
        ("prior", lambda: M.make_prior(s), M.prior_loss,
         lambda g: M.prior_batch(s, s.prior_batch, g)),
        ("decoder", lambda: M.make_decoder(s), M.decoder_loss,
         lambda g: M.decoder_batch(s, s.decoder_batch, g)),
        (f"upsampler {s.up_sides[0] // 4}->{s.up_sides[0]}", lambda: M.make_upsampler(s, 0), M.upsampler_loss,
         lambda g: M.upsampler_batch(s.up_sides[0], s.up_scale, M.up_batch(s, 0), g)),
        (f"upsampler {s.up_sides[0]}->{s.up_sides[1]}", lambda: M.make_upsampler(s, 1), M.upsampler_loss,
         lambda g: M.upsampler_batch(s.up_sides[1], s.up_scale, M.up_batch(s, 1), g)),
    ]


def measure(name: str, make: Callable, loss: Callable, batch: Callable, repeats: int, threads: int,
            device: str, peak: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    b = batch(g)
    step = M.Stepper(make(), loss(g), b, device=device)
    n = next(iter(b.values())).shape[0]
    t = common.timed(step, repeats)
    flops = common.count_flops(step.forward_backward)
    sec = common.seconds(t, threads, device)
    return {"model": name, "batch": n, "params": M.params(step.model),
            "step_s": sec, "wall_step_s": t["median_s"], "samples_per_s": n / sec,
            "gflop_per_step": flops / 1e9, "achieved_gflops": flops / sec / 1e9,
            "fraction_of_peak": flops / sec / 1e9 / peak, "timing": t}


def run(quick: bool = False, threads: int = 1, out: str | None = None,
        device: str | None = None) -> dict[str, Any]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    common.set_threads(threads)
    torch.manual_seed(0)
    s = M.tiny_sizes()
    peak = common.matmul_peak_gflops(threads, device)
    repeats = 2 if quick else 5
    rows = []
    for name, make, loss, batch in cases(s, quick):
        if quick and name.startswith("upsampler") and name.endswith(str(s.up_sides[1])):
            continue  # the 512 px crops take seconds per step on a CPU
        rows.append(measure(name, make, loss, batch, repeats, threads, device, peak))
    common.print_table(rows, ["model", "batch", "params", "step_s", "samples_per_s", "gflop_per_step",
                              "achieved_gflops", "fraction_of_peak"],
                       f"training steps, tiny preset sizes ({device}, torch {threads} thread(s); "
                       f"matmul peak {peak:.1f} GFLOP/s; CPU seconds per step)")
    result = {"name": "training", "machine": common.machine(threads), "device": device,
              "matmul_peak_gflops": peak, "rows": rows}
    path = common.write_result("training", result, out)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    common.add_common_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    run(a.quick, a.threads, a.out, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
