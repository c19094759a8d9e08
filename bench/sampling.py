"""Sampling latency per stage (prior, decoder, upsampler x4, upsampler x4 again) and for the whole
cascade, per sampler and step count, at the tiny preset's sizes (random weights: latency does not
depend on them), one caption at a time.

A stage's latency is measured end to end (``DiffusionPrior.sample``, ``decode``,
``Upsampler.upsample``) where a network call is cheap; the upsamplers cost ~1 s (128 px) to
~10 s (512 px) per network call on this CPU, so for a stage whose call takes longer than
``ESTIMATE_ABOVE_S`` one call is timed and the latency is ``steps`` x that call (the network is
>99% of such a step; marked ``estimated``). The cascade is the sum of its stages' latencies
for the sampler/step setting, beside the configured one (prior ddpm 64, decoder ddim 25 with
guidance 3, upsamplers ddim 27).

A second section times the autoregressive prior's sampling with its key/value cache against the
uncached path (a full forward per code), same generator, at the tiny preset's size and at a mid
size (the prior stage's default model, 6 x 256, over the paper's 319 components x 1024 buckets;
``--quick``: 64 components), unguided and guided (both branches in one batch), and reports the
speed-up and whether the two gave the same samples. ``--section ar_prior`` re-measures only that
section and keeps the other from the existing JSON.

    .venv/bin/python -m bench.sampling [--quick] [--threads 1] [--section stages|ar_prior]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from bench import common
from bench import models as M


ESTIMATE_ABOVE_S = 0.25  # network calls slower than this: latency = steps x call (not looped)
SECTIONS = ("stages", "ar_prior")
AR_MID_TOKENS_QUICK = 64  # --quick: the mid AR prior over this many components, not 319
AR_GUIDANCE = (1.0, 3.0)


def grid(quick: bool) -> list[tuple[str, int]]:
    return [("ddim", 10), ("dpm", 10)] if quick else [("ddim", 10), ("dpm", 10), ("ddim", 25),
                                                     ("dpm", 25), ("ddim", 50)]


def stage_fns(s: M.Sizes, g: torch.Generator, device: str = "cpu") -> dict[str, tuple[Callable[[str, int], Any], Callable[[], Any]]]:
    """name -> (sample(sampler, steps), one network call)."""
    from unclip.models.decoder_sampling import TextCondition, decode

    prior = M.make_prior(s).eval().to(device)
    pb = {k: v.to(device) for k, v in M.prior_batch(s, 1, g).items()}
    k = int(s.prior_sampling.get("num_candidates", 2))
    decoder = M.make_decoder(s).eval().to(device)
    db = {k: v.to(device) for k, v in M.decoder_batch(s, 1, g).items()}
    text = TextCondition(db["tokens"], db["mask"])
    gs = float(s.decoder_sampling["guidance_scale"])
    ups = [M.make_upsampler(s, i).eval().to(device) for i in range(len(s.up_sides))]
    lows = [(torch.rand(1, 3, side // s.up_scale, side // s.up_scale, generator=g) * 2 - 1).to(device)
            for side in s.up_sides]
    t = torch.tensor([500], device=device)

    @torch.no_grad()
    def prior_call():
        x = torch.randn(k, s.clip_dim, device=device)
        rep = lambda v: v.repeat_interleave(k, 0)  # noqa: E731
        return prior(x, t.repeat(k), rep(pb["tokens"]), rep(pb["mask"]), rep(pb["z_t"]))

    @torch.no_grad()
    def decoder_call():
        x = torch.randn(2, 3, decoder.cfg.resolution, decoder.cfg.resolution, device=device)
        drop = torch.tensor([False, True], device=device)
        return decoder(x, t.repeat(2), db["z_i"].repeat(2, 1), db["tokens"].repeat(2, 1, 1),
                       db["mask"].repeat(2, 1), drop, drop)

    def up_call(i: int):
        @torch.no_grad()
        def call():
            side = s.up_sides[i]
            return ups[i](torch.randn(1, 3, side, side, device=device), t, lows[i],
                          torch.tensor([20], device=device))
        return call

    fns = {
        "prior": (lambda sa, st: prior.sample(pb["tokens"], pb["mask"], pb["z_t"], steps=st, sampler=sa,
                                              num_candidates=k, generator=g), prior_call),
        "decoder": (lambda sa, st: decode(decoder, db["z_i"], text, gs, sa, st, generator=g),
                    decoder_call),
    }
    for i, side in enumerate(s.up_sides):
        fns[f"upsampler {side // s.up_scale}->{side}"] = (
            lambda sa, st, i=i: ups[i].upsample(lows[i], steps=st, sampler=sa, generator=g), up_call(i))
    return fns


def ar_prior_rows(s: M.Sizes, quick: bool, threads: int, device: str) -> list[dict[str, Any]]:
    """Cached vs uncached AR prior sampling of one caption, one candidate (the configured
    ``num_candidates``): CPU (or wall, on a GPU) seconds, their ratio and whether the two gave
    the same samples (same generator)."""
    k = 1
    g = torch.Generator().manual_seed(0)
    rows = []
    sizes = M.ar_prior_sizes(s, AR_MID_TOKENS_QUICK if quick else 319)
    for name, cfg in sizes.items():
        model = M.make_ar_prior(cfg).eval().to(device)
        tokens = torch.randn(1, s.caption_tokens, cfg["text_width"], generator=g).to(device)
        mask = torch.ones(1, s.caption_tokens, dtype=torch.bool, device=device)
        zt = M.unit(torch.randn(1, cfg["dim"], generator=g)).to(device)
        slow = name == "mid" and not quick  # ~10 CPU s per uncached sample: time it once
        for gs in AR_GUIDANCE:
            out: dict[bool, torch.Tensor] = {}

            def draw(use_cache: bool) -> None:
                out[use_cache] = model.sample(tokens, mask, zt, guidance_scale=gs, num_candidates=k,
                                              generator=torch.Generator().manual_seed(1),
                                              use_cache=use_cache)

            reps = 1 if quick else 3
            cached = common.seconds(common.timed(lambda: draw(True), reps), threads, device)
            full = common.seconds(common.timed(lambda: draw(False), 1 if slow else reps,
                                               warmup=0 if slow else 1), threads, device)
            n = int(cfg["n_components"])
            rows.append({"model": name, "params": M.params(model),
                         "size": f"{cfg['layers']} x {cfg['width']}", "tokens": n,
                         "buckets": int(cfg["num_buckets"]), "prefix": int(tokens.shape[1]) + 2,
                         "guidance": gs, "batch_rows": k * (2 if gs != 1.0 else 1),
                         "uncached_s": full, "cached_s": cached, "speedup": full / cached,
                         "cached_ms_per_token": 1e3 * cached / n,
                         "same_samples": bool(torch.equal(out[True], out[False]))})
    return rows


def configured(s: M.Sizes) -> dict[str, tuple[str, int]]:
    from unclip.models.upsampler import DEFAULTS

    out = {"prior": (s.prior_sampling["sampler"], int(s.prior_sampling["steps"])),
           "decoder": (s.decoder_sampling["sampler"], int(s.decoder_sampling["steps"]))}
    for i, side in enumerate(s.up_sides):  # each upsampler's own setting, the library's without one
        c = s.up_models[i] if s.up_models else DEFAULTS
        out[f"upsampler {side // s.up_scale}->{side}"] = (str(c["sampler"]), int(c["steps"]))
    return out


def run(quick: bool = False, threads: int = 1, out: str | None = None,
        device: str | None = None, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    common.set_threads(threads)
    torch.manual_seed(0)
    s = M.tiny_sizes()
    if "stages" in sections:
        result = {"name": "sampling", "machine": common.machine(threads), "device": device,
                  **stage_latencies(s, quick, threads, device)}
    else:  # keep the stage table (and the machine it was measured on) from the last run
        path = Path(out) if out else common.results_path("sampling")
        result = json.loads(path.read_text()) if path.exists() else {"name": "sampling"}
    if "ar_prior" in sections:
        rows = ar_prior_rows(s, quick, threads, device)
        common.print_table(rows, ["model", "size", "tokens", "buckets", "guidance", "batch_rows",
                                  "uncached_s", "cached_s", "speedup", "cached_ms_per_token",
                                  "same_samples"],
                           f"AR prior sampling, one caption: key/value cache vs a full forward per "
                           f"code ({device}, torch {threads} thread(s); "
                           f"{'CPU' if device == 'cpu' else 'wall'} seconds)")
        result["ar_prior"] = {"machine": common.machine(threads), "quick": quick, "rows": rows}
    path = common.write_result("sampling", result, out)
    print(f"wrote {path}")
    return result


def stage_latencies(s: M.Sizes, quick: bool, threads: int, device: str) -> dict[str, Any]:
    """The per-stage and cascade latency table (the ``rows`` of the JSON)."""
    g = torch.Generator().manual_seed(0)
    fns = stage_fns(s, g, device)
    conf = configured(s)
    settings = [("configured", None)] + [(f"{sa} {st}", (sa, st)) for sa, st in grid(quick)]
    rows = []
    call_s: dict[str, float] = {}
    for stage, (sample, call) in fns.items():
        call_s[stage] = common.seconds(common.timed(call, 1 if quick else 3), threads, device)
        for label, setting in settings:
            sa, st = setting or conf[stage]
            if call_s[stage] > ESTIMATE_ABOVE_S:
                sec, how = st * call_s[stage], "estimated"
            else:
                sec = common.seconds(common.timed(lambda: sample(sa, st), 1 if quick else 2,
                                                  warmup=0), threads, device)
                how = "measured"
            rows.append({"stage": stage, "setting": label, "sampler": sa, "steps": st,
                         "latency_s": sec, "per_step_s": sec / st, "how": how})
    for label, _ in settings:
        part = [r for r in rows if r["setting"] == label]
        rows.append({"stage": "cascade", "setting": label, "sampler": "/".join(r["sampler"] for r in part),
                     "steps": sum(r["steps"] for r in part),
                     "latency_s": sum(r["latency_s"] for r in part),
                     "how": "sum of stages"})
    common.print_table(rows, ["stage", "setting", "sampler", "steps", "latency_s", "per_step_s", "how"],
                       f"sampling latency, one caption, tiny preset sizes ({device}, torch {threads} "
                       f"thread(s); {'CPU' if device == 'cpu' else 'wall'} seconds)")
    return {"network_call_s": call_s, "configured": conf, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    common.add_common_args(p)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when there is one)")
    p.add_argument("--section", action="append", choices=SECTIONS,
                   help="measure only this section (repeatable; default: all)")
    a = p.parse_args(argv)
    run(a.quick, a.threads, a.out, a.device, tuple(a.section or SECTIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
