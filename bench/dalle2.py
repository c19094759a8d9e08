"""Side by side with the public dalle2-pytorch package at equal work: prior training and sampling,
decoder training and sampling, and the first upsampler's training step.

Our side runs here (the project's venv): the tiny preset's models as they are. Theirs runs as
``bench/their_dalle2.py`` inside ``bench/.venv-dalle2`` (created by ``bench.dalle2_env`` when
missing; dalle2-pytorch is never a dependency of the project), fed a JSON spec that carries our
counted forward + backward FLOPs per training sample for each model: their side sizes each of its
models to it from a small grid of its own knobs (the prior's head width, feed-forward multiple and
depth; the UNets' base width and first layer), so every compared pair is within 10% of each
other's FLOPs per sample (the table says so per row). CLIP is not involved on either side:
embeddings and per-token text encodings are random tensors of the tiny preset's shapes (their
``clip=None``).

Ratios: ``their seconds / our seconds`` at the same batch, which is also the ratio of samples/s
(> 1: ours is faster), and our achieved FLOP/s over theirs (counted fwd + bwd FLOPs of a step over
its CPU seconds). CPU seconds of 1-thread runs: the shared machine makes wall time a measure of the
neighbours.

    .venv/bin/python -m bench.dalle2 [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from bench import common
from bench import models as M
from bench.dalle2_env import run_theirs



def our_prior(s: M.Sizes, p: dict[str, Any], repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    model = M.make_prior(s)
    step = M.Stepper(model, M.prior_loss(g), M.prior_batch(s, p["batch"], g))
    out = {"params": M.params(model), "batch": p["batch"], "train_step": common.timed(step, repeats),
           "flops_fwd_bwd": common.count_flops(step.forward_backward)}
    model.eval()
    sb = p["sample_batch"]
    b = M.prior_batch(s, sb, g)
    sampling = {}
    for name, (sampler, steps) in p["ours"].items():
        fn = (lambda sa=sampler, st=steps: model.sample(b["tokens"], b["mask"], b["z_t"], steps=st,
                                                        sampler=sa, num_candidates=1, generator=g,
                                                        guidance_scale=p["guidance_scale"]))
        sampling[name] = {"sampler": sampler, "steps": steps,
                          **common.timed(fn, p["sample_repeats"], warmup=1)}
    out["sampling"] = sampling
    return out


def our_decoder(s: M.Sizes, d: dict[str, Any], repeats: int) -> dict[str, Any]:
    from unclip.models.decoder_sampling import TextCondition, decode

    g = torch.Generator().manual_seed(0)
    model = M.make_decoder(s)
    step = M.Stepper(model, M.decoder_loss(g), M.decoder_batch(s, d["batch"], g))
    out = {"params": M.params(model), "batch": d["batch"], "train_step": common.timed(step, repeats),
           "flops_fwd_bwd": common.count_flops(step.forward_backward)}
    model.eval()
    b = M.decoder_batch(s, d["sample_batch"], g)
    text = TextCondition(b["tokens"], b["mask"])
    sampling = {}
    for name, (sampler, steps) in d["ours"].items():
        fn = (lambda sa=sampler, st=steps: decode(model, b["z_i"], text, d["guidance_scale"], sa, st,
                                                  generator=g))
        sampling[name] = {"sampler": sampler, "steps": steps,
                          **common.timed(fn, d["sample_repeats"], warmup=1)}
    out["sampling"] = sampling
    return out


def upsampler_config() -> tuple[dict[str, Any], int, int]:
    """The tiny preset's first upsampler (its model config as the stage builds it), its training
    batch and its output side."""
    from pipelines.config import load_config
    from stages.upsample import model_config

    c = load_config(["preset=tiny"]).upsample1
    return model_config(c), int(c.train.batch_size), int(c.high_res)


def our_upsampler(u: dict[str, Any], repeats: int) -> dict[str, Any]:
    from unclip.models.upsampler import Upsampler

    g = torch.Generator().manual_seed(0)
    model = Upsampler(u["config"])
    step = M.Stepper(model, M.upsampler_loss(g), M.upsampler_batch(u["high_res"], u["scale"], u["batch"], g))
    return {"params": M.params(model), "batch": u["batch"], "train_step": common.timed(step, repeats),
            "flops_fwd_bwd": common.count_flops(step.forward_backward), "sampling": {}}


MODELS = ("prior", "decoder", "upsampler")
EQUAL = 0.10   # the widest FLOPs-per-sample gap a row may have to count as equal work


def compare(ours: dict[str, Any], theirs: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    rows = []
    for model in MODELS:
        if model not in ours or model not in theirs:
            continue
        o, t = ours[model], theirs[model]
        os_, ts = common.seconds(o["train_step"], threads), common.seconds(t["train_step"], threads)
        of, tf = o["flops_fwd_bwd"] / o["batch"], t["flops_fwd_bwd"] / t["batch"]
        our_fs, their_fs = o["flops_fwd_bwd"] / os_, t["flops_fwd_bwd"] / ts
        rows.append({"what": f"{model} training step", "batch": o["batch"],
                     "ours": f"{o['batch'] / os_:.1f} samples/s", "theirs": f"{t['batch'] / ts:.1f} samples/s",
                     "our_s": os_, "their_s": ts, "speedup": ts / os_,
                     "our_params": o["params"], "their_params": t["params"],
                     "our_gflop_per_sample": of / 1e9, "their_gflop_per_sample": tf / 1e9,
                     "flop_ratio": tf / of, "equal_work": abs(tf / of - 1) <= EQUAL,
                     "our_gflops": our_fs / 1e9, "their_gflops": their_fs / 1e9,
                     "flops_speedup": our_fs / their_fs, "their_knobs": t.get("knobs")})
        for name, their in t.get("sampling", {}).items():
            for oname, our in o["sampling"].items():
                if not _paired(name, oname, our):
                    continue
                tsec = common.seconds(their, threads)
                if their.get("extrapolate_to"):
                    tsec = tsec / their["steps"] * their["extrapolate_to"]
                osec = common.seconds(our, threads)
                label = (f"{their.get('extrapolate_to') or their['steps'] or 1000} steps "
                         f"{'DDPM (their default' + (', extrapolated' if their.get('extrapolate_to') else '') + ')' if name == 'default' else 'DDIM'}")
                rows.append({"what": f"{model} sampling", "batch": o.get("sample_batch"),
                             "ours": f"{our['sampler']} {our['steps']} steps",
                             "theirs": label, "our_s": osec, "their_s": tsec,
                             "speedup": tsec / osec, "flop_ratio": tf / of,
                             "equal_work": abs(tf / of - 1) <= EQUAL and "DDIM" in label})
    return rows


def _paired(their_name: str, our_name: str, our: dict[str, Any]) -> bool:
    """Their default is compared with our configured sampler; their DDIM with our DDIM of the same
    step count."""
    if their_name == "default":
        return our_name == "configured"
    return our_name == their_name


def spec_for(s: M.Sizes, quick: bool, threads: int) -> dict[str, Any]:
    ps = s.prior_sampling
    ds = s.decoder_sampling
    prior = {"layers": int(s.prior["layers"]), "heads": int(s.prior["heads"]),
             "guidance_scale": float(ps["guidance_scale"]),
             "batch": s.prior_batch, "sample_batch": 8, "sample_repeats": 1 if quick else 3,
             "ours": {"configured": (ps["sampler"], int(ps["steps"])),
                      f"ddim{int(ps['steps'])}": ("ddim", int(ps["steps"]))},
             "sample_steps": {"default": None, f"ddim{int(ps['steps'])}": int(ps["steps"])}}
    dec = {**{k: s.decoder[k] for k in ("resolution", "base_channels", "channel_mult",
                                        "layers_per_block", "attention_resolutions", "head_channels",
                                        "context_dim", "num_clip_tokens", "norm_groups")},
           "batch": s.decoder_batch, "sample_batch": 4, "sample_repeats": 1 if quick else 2,
           "guidance_scale": float(ds["guidance_scale"]),
           "ours": {"configured": (ds["sampler"], int(ds["steps"])),
                    f"ddim{int(ds['steps'])}": ("ddim", int(ds["steps"])),
                    "dpm10": ("dpm", 10)},
           "sample_steps": {f"ddim{int(ds['steps'])}": int(ds["steps"])}}
    if quick:
        prior["sample_steps"] = {f"ddim{int(ps['steps'])}": int(ps["steps"])}
    up, up_batch, high = upsampler_config()
    upsampler = {"channels": list(up["channels"]), "layers_per_block": int(up["layers_per_block"]),
                 "norm_groups": int(up["norm_num_groups"]), "scale": int(up["scale"]),
                 "crop": high // 4, "batch": up_batch}
    return {"threads": threads, "repeats": 2 if quick else 5,
            "sizes": {"clip_dim": s.clip_dim, "text_width": s.text_width, "context": s.context,
                      "caption_tokens": s.caption_tokens},
            "prior": prior, "decoder": dec, "upsampler": upsampler,
            "ours_upsampler": {"config": up, "high_res": high, "scale": int(up["scale"]), "batch": up_batch}}


def run(quick: bool = False, threads: int = 1, out: str | None = None) -> dict[str, Any]:
    common.set_threads(threads)
    torch.manual_seed(0)
    s = M.tiny_sizes()
    spec = spec_for(s, quick, threads)
    ours = {"prior": our_prior(s, spec["prior"], spec["repeats"]),
            "decoder": our_decoder(s, spec["decoder"], spec["repeats"]),
            "upsampler": our_upsampler(spec.pop("ours_upsampler"), spec["repeats"])}
    ours["prior"]["sample_batch"] = spec["prior"]["sample_batch"]
    ours["decoder"]["sample_batch"] = spec["decoder"]["sample_batch"]
    for model in MODELS:  # their side sizes its models to our FLOPs per training sample
        spec[model]["target_flops"] = ours[model]["flops_fwd_bwd"] / ours[model]["batch"]
    theirs = run_theirs(spec)
    # their 1000-step DDPM decoder default costs ~1000 forwards x2 (guidance): its latency is the
    # measured per-step cost of their DDIM run x 1000 (the network dominates a step)
    d = next(iter(theirs["decoder"]["sampling"].values()))
    theirs["decoder"]["sampling"]["default"] = {**d, "extrapolate_to": 1000}
    rows = compare(ours, theirs, threads)
    common.print_table(rows, ["what", "batch", "ours", "theirs", "our_params", "their_params", "our_gflop_per_sample",
                              "their_gflop_per_sample", "equal_work", "our_s", "their_s", "speedup",
                              "our_gflops", "their_gflops", "flops_speedup"],
                       f"ours vs dalle2-pytorch {theirs.get('version')} at equal FLOPs per sample "
                       f"(CPU seconds, torch {threads} thread(s); speedup = their s / our s = our "
                       f"samples/s over theirs; flops_speedup = our achieved FLOP/s over theirs)")
    off = [r["what"] for r in rows if "training" in r["what"] and not r["equal_work"]]
    if off:
        print(f"NOT equal work (FLOPs per sample more than {EQUAL:.0%} apart): {', '.join(off)}")
    result = {"name": "dalle2", "machine": common.machine(threads), "spec": spec, "ours": ours,
              "theirs": theirs, "rows": rows}
    path = common.write_result("dalle2", result, out)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    common.add_common_args(p)
    a = p.parse_args(argv)
    run(a.quick, a.threads, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
