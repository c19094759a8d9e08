"""dalle2-pytorch's side of the side-by-side benchmark. Runs ONLY inside bench/.venv-dalle2
(``bench/.venv-dalle2/bin/python bench/their_dalle2.py '<json spec>'``); the project never imports
dalle2_pytorch. Prints one JSON object on its last stdout line.

The spec (written by bench/dalle2.py) gives the sizes; CLIP is not used (``clip=None``): image
embeddings, text embeddings and per-token text encodings are fed directly, as random tensors of
the tiny preset's shapes. A training step is forward (their ``DiffusionPrior.forward`` /
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
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
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


def prior(s: dict, p: dict, repeats: int) -> dict:
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    dim = s["clip_dim"]
    net = DiffusionPriorNetwork(dim=dim, depth=p["layers"], heads=p["heads"],
                                dim_head=dim // p["heads"], max_text_len=s["context"],
                                num_timesteps=1000)
    model = DiffusionPrior(net=net, clip=None, image_embed_dim=dim, timesteps=1000,
                           cond_drop_prob=0.1, condition_on_text_encodings=True,
                           image_embed_scale=dim ** 0.5)
    b = p["batch"]
    z_i, z_t = unit(torch.randn(b, dim)), unit(torch.randn(b, dim))
    enc = text_encodings(s, b)
    step, fwd_bwd = step_fn(model, lambda: model(text_embed=z_t, image_embed=z_i.clone(),
                                                 text_encodings=enc))
    out = {"params": sum(q.numel() for q in net.parameters()), "batch": b,
           "train_step": timed(step, repeats), "flops_fwd_bwd": flops(fwd_bwd)}
    out["samples_per_s"] = b / out["train_step"]["median_s"]
    model.eval()
    sb = p["sample_batch"]
    cond = {"text_embed": unit(torch.randn(sb, dim)), "text_encodings": text_encodings(s, sb)}
    sampling = {}
    for name, steps in p["sample_steps"].items():
        # their sample() needs CLIP for the text; p_sample_loop is what it calls after embedding
        fn = (lambda st=steps: model.p_sample_loop((sb, dim), text_cond=cond, cond_scale=1.0,
                                                   timesteps=st))
        sampling[name] = {"steps": steps, **timed(fn, p["sample_repeats"], warmup=0)}
    out["sampling"] = sampling
    return out


def decoder(s: dict, d: dict, repeats: int) -> dict:
    from dalle2_pytorch import Decoder, Unet

    levels = len(d["channel_mult"])
    sides = [d["resolution"] >> i for i in range(levels)]
    unet = Unet(dim=d["base_channels"], image_embed_dim=s["clip_dim"], text_embed_dim=s["text_width"],
                cond_dim=d["context_dim"], num_image_tokens=d["num_clip_tokens"],
                dim_mults=tuple(d["channel_mult"]), num_resnet_blocks=d["layers_per_block"],
                self_attn=tuple(side in d["attention_resolutions"] for side in sides),
                attn_dim_head=d["head_channels"], attn_heads=max(1, d["base_channels"] * d["channel_mult"][-1]
                                                                  // d["head_channels"]),
                resnet_groups=d["norm_groups"], cond_on_text_encodings=True,
                cond_on_image_embeds=True, max_text_len=s["context"], channels=3)
    model = Decoder(unet=unet, clip=None, image_size=d["resolution"], timesteps=1000,
                    image_cond_drop_prob=0.1, text_cond_drop_prob=0.5, learned_variance=True,
                    beta_schedule="cosine")
    b = d["batch"]
    img = torch.rand(b, 3, d["resolution"], d["resolution"])      # their input range is [0, 1]
    z = unit(torch.randn(b, s["clip_dim"]))
    enc = text_encodings(s, b)
    step, fwd_bwd = step_fn(model, lambda: model(img, image_embed=z, text_encodings=enc))
    out = {"params": sum(q.numel() for q in model.unets.parameters()), "batch": b,
           "train_step": timed(step, repeats), "flops_fwd_bwd": flops(fwd_bwd)}
    out["samples_per_s"] = b / out["train_step"]["median_s"]
    model.eval()
    sb = d["sample_batch"]
    zs, encs = unit(torch.randn(sb, s["clip_dim"])), text_encodings(s, sb)
    sampling = {}
    for name, steps in d["sample_steps"].items():
        model.sample_timesteps = (steps,)
        fn = (lambda: model.sample(image_embed=zs, text_encodings=encs, cond_scale=d["guidance_scale"]))
        sampling[name] = {"steps": steps or 1000, **timed(fn, d["sample_repeats"], warmup=0)}
    out["sampling"] = sampling
    return out


def main() -> int:
    spec = json.loads(sys.argv[1])
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
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
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
