"""dalle2-pytorch's side of the side-by-side benchmark. Runs ONLY inside bench/.venv-dalle2
(``bench/.venv-dalle2/bin/python bench/their_dalle2.py '<json spec>'``); the project never imports
dalle2_pytorch. Prints one JSON object on its last stdout line.

The spec (written by bench/dalle2.py) gives the sizes and, per model, our FLOPs per training
sample (``target_flops``): each of their models is sized to it from a small grid of their own knobs
(``match``: the candidate whose counted forward + backward FLOPs per sample are nearest), so the
two sides do equal work. CLIP is not used (``clip=None``): image embeddings, text embeddings and
per-token text encodings are fed directly, as random tensors of the tiny preset's shapes. A training step is forward (their ``DiffusionPrior.forward`` /
``Decoder.forward``, which sample t and noise and return the loss) + backward + gradient clipping +
Adam step, the way their trainers do it (``dalle2_pytorch.optimizer.get_optimizer``: AdamW when
weight decay > 0, Adam otherwise). Sampling uses their defaults (every one of the 1000 DDPM steps)
and their DDIM (``sample_timesteps``) with our step counts.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings

import torch


def timed(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "cpu_median_s": statistics.median(cpu), "repeats": repeats}


def flops(fn) -> float:
    """Counted as bench.common.count_flops counts ours (CPU attention kernels included; this file
    runs in the other venv and cannot import it)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu:
               lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
               aten._scaled_dot_product_flash_attention_for_cpu_backward:
               lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn()
    return float(fc.get_total_flops())


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def text_encodings(s: dict, b: int) -> torch.Tensor:
    # their models derive the mask from non-zero rows: pad the context with zeros past the caption
    enc = torch.zeros(b, s["context"], s["text_width"])
    enc[:, : s["caption_tokens"]] = torch.randn(b, s["caption_tokens"], s["text_width"])
    return enc


def step_fn(model, loss_fn, lr: float = 1e-4):
    from dalle2_pytorch.optimizer import get_optimizer

    opt = get_optimizer(model.parameters(), lr=lr, wd=0.0)

    def fwd_bwd():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def step():
        loss = fwd_bwd()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return step, fwd_bwd


def match(build, candidates: list[dict], flops_per_sample, target: float) -> tuple[dict, float]:
    """The candidate whose FLOPs per training sample are nearest ``target`` (by ratio); ties within
    2% go to the earlier candidate (their defaults come first)."""
    import math

    best, best_f, best_d = None, 0.0, math.inf
    for c in candidates:
        f = flops_per_sample(build(c))
        d = abs(math.log(f / target))
        if d < best_d - 0.02:
            best, best_f, best_d = c, f, d
    return best, best_f


def prior_knobs(layers: int) -> list[dict]:
    """Their prior's sizing grid, their defaults first (dim_head 64, ff_mult 4): their network is
    as wide as the embedding, so depth, head width and feed-forward multiple are the knobs."""
    return [{"depth": dep, "dim_head": dh, "ff_mult": ff} for dep in (layers, layers + 1)
            for ff in (4, 2, 1) for dh in (64, 32, 16, 8)]


def make_prior(s: dict, p: dict, knobs: dict):
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    dim = s["clip_dim"]
    net = DiffusionPriorNetwork(dim=dim, depth=knobs["depth"], heads=p["heads"],
                                dim_head=knobs["dim_head"], ff_mult=knobs["ff_mult"],
                                max_text_len=s["context"], num_timesteps=1000)
    return DiffusionPrior(net=net, clip=None, image_embed_dim=dim, timesteps=1000,
                          cond_drop_prob=0.1, condition_on_text_encodings=True,
                          image_embed_scale=dim ** 0.5)


def prior_loss(s: dict, model, b: int):
    dim = s["clip_dim"]
    z_i, z_t = unit(torch.randn(b, dim)), unit(torch.randn(b, dim))
    enc = text_encodings(s, b)
    return lambda: model(text_embed=z_t, image_embed=z_i.clone(), text_encodings=enc)


def per_sample(s: dict, loss_for, b: int = 2):
    return lambda model: flops(lambda: loss_for(s, model, b)().backward()) / b


def prior(s: dict, p: dict, repeats: int) -> dict:
    cands = prior_knobs(p["layers"])
    knobs, f = match(lambda k: make_prior(s, p, k), cands, per_sample(s, prior_loss), p["target_flops"])
    model = make_prior(s, p, knobs)
    b = p["batch"]
    step, fwd_bwd = step_fn(model, prior_loss(s, model, b))
    out = {"params": sum(q.numel() for q in model.net.parameters()), "batch": b, "knobs": knobs,
           "train_step": timed(step, repeats), "flops_fwd_bwd": flops(fwd_bwd)}
    model.eval()
    dim = s["clip_dim"]
    sb = p["sample_batch"]
    cond = {"text_embed": unit(torch.randn(sb, dim)), "text_encodings": text_encodings(s, sb)}
    sampling = {}
    for name, steps in p["sample_steps"].items():
        # their sample() needs CLIP for the text; p_sample_loop is what it calls after embedding
        fn = (lambda st=steps: model.p_sample_loop((sb, dim), text_cond=cond, cond_scale=p["guidance_scale"],
                                                   timesteps=st))
        # one warm-up call, as ours
        sampling[name] = {"steps": steps or 1000, **timed(fn, p["sample_repeats"], warmup=1)}
    out["sampling"] = sampling
    return out


def groups_for(dim: int, groups: int) -> int:
    """Their ResNet blocks' group count: ours where it divides the width, else the largest that does."""
    return next(g for g in (groups, 8, 4, 2, 1) if dim % g == 0)


def make_decoder(s: dict, d: dict, knobs: dict):
    from dalle2_pytorch import Decoder, Unet

    levels = len(d["channel_mult"])
    sides = [d["resolution"] >> i for i in range(levels)]
    dim = knobs["dim"]
    # their Unet skips its z_i -> tokens projection when the two widths are equal and then fails
    # on the token shape: one more context channel keeps the projection (smoke-size models only)
    cond_dim = d["context_dim"] + (d["context_dim"] == s["clip_dim"])
    unet = Unet(dim=dim, image_embed_dim=s["clip_dim"], text_embed_dim=s["text_width"],
                cond_dim=cond_dim, num_image_tokens=d["num_clip_tokens"],
                dim_mults=tuple(d["channel_mult"]), num_resnet_blocks=d["layers_per_block"],
                self_attn=tuple(side in d["attention_resolutions"] for side in sides),
                attn_dim_head=d["head_channels"],
                attn_heads=max(1, dim * d["channel_mult"][-1] // d["head_channels"]),
                resnet_groups=groups_for(dim, d["norm_groups"]), cond_on_text_encodings=True,
                init_cross_embed=knobs["init_cross_embed"],
                cond_on_image_embeds=True, max_text_len=s["context"], channels=3)
    return Decoder(unet=unet, clip=None, image_size=d["resolution"], timesteps=1000,
                   image_cond_drop_prob=d.get("p_drop_clip", 0.1),
                   text_cond_drop_prob=d.get("p_drop_caption", 0.5), learned_variance=True,
                   beta_schedule="cosine", sample_timesteps=d.get("sample_timesteps"))


def decoder_loss(s: dict, model, b: int):
    side = model.image_sizes[0]
    img = torch.rand(b, 3, side, side)      # their input range is [0, 1]
    z = unit(torch.randn(b, s["clip_dim"]))
    enc = text_encodings(s, b)
    return lambda: model(img, image_embed=z, text_encodings=enc)


def widths(ours: int) -> list[int]:
    """Their base widths to try: ours first, then steps of an eighth of it (at least 2) around it."""
    step = max(2, ours // 8)
    return [ours] + [w for w in range(max(step, ours // 2), 2 * ours + 1, step) if w != ours]


def decoder(s: dict, d: dict, repeats: int) -> dict:
    cands = [{"dim": w, "init_cross_embed": ice} for ice in (True, False)
             for w in widths(d["base_channels"])]
    knobs, _ = match(lambda k: make_decoder(s, d, k), cands, per_sample(s, decoder_loss), d["target_flops"])
    model = make_decoder(s, d, knobs)
    b = d["batch"]
    step, fwd_bwd = step_fn(model, decoder_loss(s, model, b))
    out = {"params": sum(q.numel() for q in model.unets.parameters()), "batch": b, "knobs": knobs,
           "train_step": timed(step, repeats), "flops_fwd_bwd": flops(fwd_bwd)}
    model.eval()
    sb = d["sample_batch"]
    zs, encs = unit(torch.randn(sb, s["clip_dim"])), text_encodings(s, sb)
    sampling = {}
    for name, steps in d["sample_steps"].items():
        model.sample_timesteps = (steps,)
        fn = (lambda: model.sample(image_embed=zs, text_encodings=encs, cond_scale=d["guidance_scale"]))
        # one warm-up call, as ours
        sampling[name] = {"steps": steps or 1000, **timed(fn, d["sample_repeats"], warmup=1)}
    out["sampling"] = sampling
    return out


def make_upsampler(u: dict, knobs: dict):
    """Their cascade with a throwaway first UNet: the second (``lowres_cond``, conv-only as ours,
    no attention) is the upsampler trained at the crop side, predicting x0 like ours."""
    from dalle2_pytorch import Decoder, Unet

    dim, mults = knobs["dim"], tuple(c // u["channels"][0] for c in u["channels"])
    first = Unet(dim=8, dim_mults=(1,), num_resnet_blocks=1, attend_at_middle=False, channels=3)
    up = Unet(dim=dim, dim_mults=mults, num_resnet_blocks=u["layers_per_block"], lowres_cond=True,
              self_attn=False, attend_at_middle=False, resnet_groups=groups_for(dim, u["norm_groups"]),
              init_cross_embed=knobs["init_cross_embed"], channels=3)
    return Decoder(unet=(first, up), image_sizes=(u["crop"] // u["scale"], u["crop"]), clip=None,
                   unconditional=True, timesteps=1000, learned_variance=False,
                   predict_x_start=(False, True), beta_schedule="cosine")


def upsampler_loss(s: dict, model, b: int):
    side = model.image_sizes[-1]
    img = torch.rand(b, 3, side, side)
    return lambda: model(img, unet_number=2)


def upsampler(s: dict, u: dict, repeats: int) -> dict:
    cands = [{"dim": w, "init_cross_embed": ice} for ice in (True, False)
             for w in widths(u["channels"][0])]
    knobs, _ = match(lambda k: make_upsampler(u, k), cands, per_sample(s, upsampler_loss), u["target_flops"])
    model = make_upsampler(u, knobs)
    b = u["batch"]
    step, fwd_bwd = step_fn(model, upsampler_loss(s, model, b))
    out = {"params": sum(q.numel() for q in model.unets[1].parameters()), "batch": b, "knobs": knobs,
           "train_step": timed(step, repeats), "flops_fwd_bwd": flops(fwd_bwd)}
    return out


def budgeted(spec: dict, n: int, step, sample) -> list[dict]:
    """Train with ``step(batch indices)`` until each fraction of ``spec["budget_s"]`` training CPU
    seconds; then ``sample(k)`` (not counted; its own seeded noise, leaving the training stream
    alone). Batches are seeded epochs of whole batches: the sequence ours draws
    (``bench.time_to_quality.batch_order`` / ``budgeted``, restated because this file runs in
    dalle2-pytorch's venv, without our package)."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    b = spec["batch"]

    def order():
        while True:
            perm = rng.permutation(n)
            for i in range(0, n - b + 1, b):
                yield torch.as_tensor(perm[i:i + b])

    batches = order()
    points, spent, steps = [], 0.0, 0
    for k, frac in enumerate(spec["fractions"]):
        while spent < frac * spec["budget_s"]:
            idx = next(batches)
            c0 = time.process_time()
            step(idx)
            spent += time.process_time() - c0
            steps += 1
        with torch.random.fork_rng():
            torch.manual_seed(spec["seed"] + 1)
            points.append({"fraction": frac, "cpu_s": spent, "steps": steps, **sample(k)})
    return points


def time_to_quality(spec: dict) -> dict:
    """Their prior (sized to our FLOPs per sample) trained by their DiffusionPriorTrainer from
    scratch at each learning rate for the same training CPU seconds and batches as ours; its EMA
    sampled (DDIM) on the held-out rows at each fraction of the budget, written as .npy files."""
    import numpy as np
    from dalle2_pytorch.trainer import DiffusionPriorTrainer

    rows = torch.load(spec["data"], weights_only=True)
    s, p = spec["sizes"], spec["prior"]
    first = torch.as_tensor(spec["first_batch"])  # ours is counted on the same rows
    prior_loss_rows = lambda model: (lambda: model(  # noqa: E731 - the sizing grid's loss
        text_embed=rows["zt"][first], image_embed=rows["zi"][first].clone(),
        text_encodings=rows["states"][first]))
    cands = prior_knobs(p["layers"])
    knobs, f = match(lambda k: make_prior(s, p, k), cands,
                     lambda m: flops(lambda: prior_loss_rows(m)().backward()) / len(first),
                     p["target_flops"])
    runs = []
    for lr in spec["lrs"]:
        torch.manual_seed(spec["seed"])
        model = make_prior(s, p, knobs)
        # their trainer, its AdamW (weight decay 1e-2); our clipping at 1.0, and its EMA updated
        # every step from the first at our decay: their default EMA (0.9999, every 10 steps from
        # step 100) would lag far behind the weights in a budget of a few hundred steps
        trainer = DiffusionPriorTrainer(model, lr=lr, max_grad_norm=1.0, use_ema=True,
                                        ema_beta=spec["ema_decay"], ema_update_every=1,
                                        ema_update_after_step=0)
        trainer.train()

        def step(idx: torch.Tensor) -> None:
            trainer(text_embed=rows["zt"][idx], image_embed=rows["zi"][idx].clone(),
                    text_encodings=rows["states"][idx])
            trainer.update()

        def sample(k: int) -> dict:
            z = trainer.p_sample_loop((len(rows["ho_zt"]), s["clip_dim"]),
                                      text_cond={"text_embed": rows["ho_zt"],
                                                 "text_encodings": rows["ho_states"]},
                                      cond_scale=spec["guidance_scale"], timesteps=spec["steps"],
                                      eta=0.0)  # deterministic DDIM, as ours (their default: 1)
            name = f"z_{lr:g}_{k}.npy"
            np.save(f"{spec['out']}/{name}", z.float().numpy())
            return {"z_file": name}

        points = budgeted(spec, len(rows["zi"]), step, sample)
        runs.append({"lr": lr, "points": points})
    return {"knobs": knobs, "gflop_per_sample": f / 1e9, "runs": runs}


def decoder_time_to_quality(spec: dict) -> dict:
    """Their decoder (sized to our FLOPs per sample on the same first batch) trained by their
    DecoderTrainer from scratch at each learning rate for the same training CPU seconds and batches
    as ours; its EMA samples the held-out z_i (DDIM, eta 0) at each fraction of the budget, written
    as uint8 (N, H, W, 3) .npy files for our scorer."""
    import numpy as np
    from dalle2_pytorch.trainer import DecoderTrainer

    rows = torch.load(spec["data"], weights_only=True)
    s = spec["sizes"]
    d = {**spec["decoder"], "p_drop_clip": spec["p_drop_clip"], "p_drop_caption": spec["p_drop_caption"],
         "sample_timesteps": spec["steps"]}
    first = torch.as_tensor(spec["first_batch"])  # ours is counted on the same rows
    cands = [{"dim": w, "init_cross_embed": ice} for ice in (True, False) for w in widths(d["base_channels"])]
    knobs, f = match(lambda k: make_decoder(s, d, k), cands,
                     lambda m: flops(lambda: m(rows["images"][first], image_embed=rows["zi"][first],
                                               text_encodings=rows["states"][first]).backward()) / len(first),
                     d["target_flops"])
    runs, params = [], None
    for lr in spec["lrs"]:
        torch.manual_seed(spec["seed"])
        model = make_decoder(s, d, knobs)
        params = sum(q.numel() for q in model.unets.parameters())
        # their trainer and its AdamW (weight decay 1e-2); our clipping, and its EMA at our decay
        # updated every step from the first (their default, 0.9999 every 10 steps from step 100,
        # would lag far behind the weights in a budget of a few hundred steps)
        trainer = DecoderTrainer(model, lr=lr, max_grad_norm=spec["grad_clip"], use_ema=True,
                                 ema_beta=spec["ema_decay"], ema_update_every=1, ema_update_after_step=0)
        trainer.train()

        def step(idx: torch.Tensor) -> None:
            trainer(rows["images"][idx], image_embed=rows["zi"][idx], text_encodings=rows["states"][idx],
                    unet_number=1)
            trainer.update(1)

        def sample(k: int) -> dict:
            x = trainer.sample(image_embed=rows["ho_zi"], text_encodings=rows["ho_states"],
                               cond_scale=spec["guidance_scale"])
            name = f"x_{lr:g}_{k}.npy"
            img = (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
            np.save(f"{spec['out']}/{name}", img.numpy())
            return {"images_file": name}

        points = budgeted(spec, len(rows["zi"]), step, sample)
        runs.append({"lr": lr, "points": points})
    return {"knobs": knobs, "gflop_per_sample": f / 1e9, "params": params, "runs": runs}


def main() -> int:
    spec = json.loads(sys.argv[1])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    if spec.get("mode") == "time_to_quality":
        print(json.dumps(time_to_quality(spec)))
        return 0
    if spec.get("mode") == "decoder_time_to_quality":
        print(json.dumps(decoder_time_to_quality(spec)))
        return 0
    import dalle2_pytorch

    result = {"package": "dalle2-pytorch", "version": getattr(dalle2_pytorch, "__version__", None),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        from importlib.metadata import version

        result["version"] = version("dalle2-pytorch")
    except Exception:  # noqa: BLE001 - the version is informative only
        pass
    s = spec["sizes"]
    if "prior" in spec:
        result["prior"] = prior(s, spec["prior"], int(spec["repeats"]))
    if "decoder" in spec:
        result["decoder"] = decoder(s, spec["decoder"], int(spec["repeats"]))
    if "upsampler" in spec:
        result["upsampler"] = upsampler(s, spec["upsampler"], int(spec["repeats"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
