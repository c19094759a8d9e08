"""Side by side with the public dalle2-pytorch package: prior training step, decoder training step,
and sampling, at the same model sizes and batch sizes.

Our side runs here (the project's venv); theirs runs as ``bench/their_dalle2.py`` inside
``bench/.venv-dalle2`` (created by ``bench.dalle2_env`` when missing; dalle2-pytorch is never a
dependency of the project), fed the same spec as JSON, printing JSON back. CLIP is not involved on
either side: embeddings and per-token text encodings are random tensors of the tiny preset's
shapes (their ``clip=None``).

Sizes: the decoder is the tiny preset's (configs/decoder/default.yaml + preset tiny); the prior is
the tiny preset's depth and heads at width = CLIP dim (96), because dalle2-pytorch's prior network
is as wide as the embedding (ours is 128 wide in the tiny preset; its own step is in
bench.training). Both sides report parameters and counted FLOPs, since the architectures differ in
detail (theirs: SwiGLU, rotary embeddings, cross-attention in every UNet block).

Ratios are ``their seconds / our seconds`` (> 1: ours is faster), from CPU seconds of 1-thread runs
(the busy shared machine makes wall time a measure of the neighbours).

    .venv/bin/python -m bench.dalle2 [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench import common
from bench import models as M

THEIRS = Path(__file__).resolve().parent / "their_dalle2.py"


def our_prior(s: M.Sizes, p: dict[str, Any], repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    model = M.make_prior(s, width=s.clip_dim)
    step = M.Stepper(model, M.prior_loss(g), M.prior_batch(s, p["batch"], g))
    out = {"params": M.params(model), "batch": p["batch"], "train_step": common.timed(step, repeats),
           "flops_fwd_bwd": common.count_flops(step.forward_backward)}
    model.eval()
    sb = p["sample_batch"]
    b = M.prior_batch(s, sb, g)
    sampling = {}
    for name, (sampler, steps) in p["ours"].items():
        fn = (lambda sa=sampler, st=steps: model.sample(b["tokens"], b["mask"], b["z_t"], steps=st,
                                                        sampler=sa, num_candidates=1, generator=g))
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


def run_theirs(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.dalle2_env import ensure_env

    python = ensure_env()
    proc = subprocess.run([str(python), str(THEIRS), json.dumps(spec)], capture_output=True,
                          text=True, cwd=str(THEIRS.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"their_dalle2.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"their_dalle2.py printed no JSON:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def compare(ours: dict[str, Any], theirs: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    rows = []
    for model in ("prior", "decoder"):
        o, t = ours[model], theirs[model]
        os_, ts = common.seconds(o["train_step"], threads), common.seconds(t["train_step"], threads)
        rows.append({"what": f"{model} training step", "batch": o["batch"],
                     "ours": f"{o['batch'] / os_:.1f} samples/s", "theirs": f"{t['batch'] / ts:.1f} samples/s",
                     "our_s": os_, "their_s": ts, "speedup": ts / os_,
                     "our_params": o["params"], "their_params": t["params"],
                     "our_gflop_per_sample": o["flops_fwd_bwd"] / o["batch"] / 1e9,
                     "their_gflop_per_sample": t["flops_fwd_bwd"] / t["batch"] / 1e9})
        for name, their in t["sampling"].items():
            for oname, our in o["sampling"].items():
                if not _paired(name, oname, our):
                    continue
                tsec = common.seconds(their, threads)
                if their.get("extrapolate_to"):
                    tsec = tsec / their["steps"] * their["extrapolate_to"]
                osec = common.seconds(our, threads)
                label = (f"{their.get('extrapolate_to') or their['steps']} steps "
                         f"{'DDPM (their default' + (', extrapolated' if their.get('extrapolate_to') else '') + ')' if name == 'default' else 'DDIM'}")
                rows.append({"what": f"{model} sampling", "batch": o.get("sample_batch"),
                             "ours": f"{our['sampler']} {our['steps']} steps",
                             "theirs": label, "our_s": osec, "their_s": tsec,
                             "speedup": tsec / osec})
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
    return {"threads": threads, "repeats": 2 if quick else 5,
            "sizes": {"clip_dim": s.clip_dim, "text_width": s.text_width, "context": s.context,
                      "caption_tokens": s.caption_tokens},
            "prior": prior, "decoder": dec}


def run(quick: bool = False, threads: int = 1, out: str | None = None) -> dict[str, Any]:
    common.set_threads(threads)
    torch.manual_seed(0)
    s = M.tiny_sizes()
    spec = spec_for(s, quick, threads)
    ours = {"prior": our_prior(s, spec["prior"], spec["repeats"]),
            "decoder": our_decoder(s, spec["decoder"], spec["repeats"])}
    ours["prior"]["sample_batch"] = spec["prior"]["sample_batch"]
    ours["decoder"]["sample_batch"] = spec["decoder"]["sample_batch"]
    theirs = run_theirs(spec)
    # their 1000-step DDPM decoder default costs ~1000 forwards x2 (guidance): its latency is the
    # measured per-step cost of their DDIM run x 1000 (the network dominates a step)
    d = next(iter(theirs["decoder"]["sampling"].values()))
    theirs["decoder"]["sampling"]["default"] = {**d, "extrapolate_to": 1000}
    rows = compare(ours, theirs, threads)
    common.print_table(rows, ["what", "batch", "ours", "theirs", "our_s", "their_s", "speedup"],
                       f"ours vs dalle2-pytorch {theirs.get('version')} (CPU seconds, torch "
                       f"{threads} thread(s); speedup = their s / our s)")
    result = {"name": "dalle2", "machine": common.machine(threads), "spec": spec, "ours": ours,
              "theirs": theirs, "rows": rows}
    path = common.write_result("dalle2", result, out)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    a = p.parse_args(argv)
    run(a.quick, a.threads, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
