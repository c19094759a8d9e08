"""Time to quality for the decoder, ours against dalle2-pytorch: both trained from scratch for the
same training CPU seconds on a finished run's own training pairs, scored on its held-out images at
25%, 50% and 100% of the budget (the prior's counterpart is ``bench/time_to_quality.py``).

Inputs come from ``--run-dir`` (a finished decoder stage: its training and held-out pairs at the
decoder's resolution, the run's CLIP, the stage's model, diffusion, optimiser and dropout config).
The captions' per-token states are computed once with the run's CLIP, outside the budget, and fed to
both sides (theirs zero-padded to the CLIP context, as their models expect); both draw the same
batches in the same order, without flips. Ours: the stage's model and diffusion (its prediction
target, learned variance, Min-SNR weighting), AdamW, warm-up, clipping, guidance dropouts and EMA,
at a constant learning rate after the warm-up (a cosine decay needs a step count, which a CPU budget
does not fix). Theirs: their ``Decoder`` + ``Unet`` sized to our FLOPs per training sample (the grid
of ``bench/their_dalle2.py``, their learned variance and cosine schedule), trained by their own
``DecoderTrainer`` at each learning rate of a small sweep (our clipping, their EMA at our decay
updated every step, as for the prior). Both sample the held-out true z_i with deterministic DDIM at
the same step count and the run's guidance scale; the decodes are scored as the stage scores its
own: CLIP cosine to the z_i decoded (beside mismatched pairs) and, where the data has a ground
truth (shapes), the detector's colour / shape / position accuracies. Budgets count training CPU
seconds only; sampling and scoring are outside them.

    .venv/bin/python -m bench.time_to_quality_decoder --run-dir RUN [--budget-s 480] [--threads 2]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from bench.time_to_quality import FRACTIONS, batch_order, budgeted, parser

SCORES = ("val_clip_cosine", "val_clip_cosine_mismatched", "val_color", "val_shape", "val_position")


def load_pairs(run_dir: str, max_holdout: int) -> dict[str, Any]:
    """The decoder stage's training and held-out pairs (the same key split), their caption token
    states from the run's CLIP (padded to its context), the stage's config and the run's CLIP."""
    from pipelines.manifest import read_manifest
    from stages.decoder import _holdout
    from unclip.data.paired import iter_paired
    from unclip.data.shards import list_shards
    from unclip.models.clip import load_clip
    from unclip.models.decoder_sampling import caption_condition

    manifests = {st: read_manifest(run_dir, st) for st in ("filter", "clip", "embed", "decoder")}
    missing = [st for st, m in manifests.items() if m is None]
    if missing:
        raise SystemExit(f"{run_dir}: stage(s) {', '.join(missing)} not finished; run the pipeline "
                         "through the decoder stage first")
    cfg = manifests["decoder"].config["decoder"]
    if cfg.get("init_from"):
        raise SystemExit(f"{run_dir}: the decoder was fine-tuned from {cfg['init_from']}; this "
                         "trains the run's decoder config from scratch, so it needs a run whose "
                         "decoder was trained from scratch")
    size, frac = int(cfg["resolution"]), float(cfg["holdout_fraction"])
    shards = list_shards(manifests["filter"].outputs["shards"])
    embeddings = manifests["embed"].outputs["embeddings"]
    rows = [r for s in shards for r in iter_paired(s, embeddings, size, "train", frac)]
    held = _holdout(shards, embeddings, size, frac, max_holdout)
    batch = int(cfg["train"]["batch_size"])
    if len(rows) < batch or len(held["captions"]) < 2:
        raise SystemExit(f"{run_dir}: {len(rows)} training pairs (a batch is {batch}) and "
                         f"{len(held['captions'])} held-out pairs: too few to compare on")
    clip = load_clip(manifests["clip"].outputs["model"])
    context = int(clip.context_length)

    def states(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros(len(captions), context, clip.text_width)
        mask = torch.zeros(len(captions), context, dtype=torch.bool)
        with torch.no_grad():
            for i in range(0, len(captions), 256):
                t = caption_condition(clip, captions[i:i + 256])
                n = t.states.shape[1]
                out[i:i + 256, :n], mask[i:i + 256, :n] = t.states, t.mask
        return out, mask

    st, mask = states([str(r["caption"]) for r in rows])
    return {"images": np.stack([r["image"] for r in rows]),
            "zi": torch.as_tensor(np.stack([r["image_embedding"] for r in rows])),
            "states": st, "mask": mask, "held": held, "clip": clip, "cfg": cfg,
            "ho_states": states([str(c) for c in held["captions"]])[0]}


def our_model(pairs: dict[str, Any]):
    from stages.decoder import build_model

    c = pairs["cfg"]
    mcfg = {**c["model"], "resolution": int(c["resolution"]), "clip_dim": int(pairs["zi"].shape[1]),
            "text_width": int(pairs["states"].shape[2]), "use_caption": bool(c["use_caption"]),
            "learn_variance": bool(c["diffusion"]["learn_variance"])}
    return build_model(mcfg, dict(c["diffusion"]), imported=False)


def our_loss(pairs: dict[str, Any], model, idx: np.ndarray, g: torch.Generator) -> torch.Tensor:
    """The stage's step loss on rows ``idx`` (its guidance dropouts; captions trimmed to the batch's
    longest, as the stage's CLIP tokenizer does)."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.models.decoder import dropout_masks
    from unclip.models.decoder_sampling import from_uint8

    c = pairs["cfg"]
    x0 = from_uint8(pairs["images"][idx])
    i = torch.as_tensor(idx)
    z = pairs["zi"][i]
    mask = pairs["mask"][i]
    n = int(mask.sum(1).max())
    states, mask = (pairs["states"][i][:, :n], mask[:, :n]) if c["use_caption"] else (None, None)
    drop_clip, drop_caption = dropout_masks(len(idx), float(c["p_drop_clip"]), float(c["p_drop_caption"]), g)
    gd = GaussianDiffusion(model.diffusion)
    losses = gd.training_losses(lambda x, t: model(x, t, z, states, mask, drop_clip, drop_caption),
                                x0, generator=g)
    return losses["loss"].mean()


def evaluator(pairs: dict[str, Any], steps: int):
    from unclip.eval.decoder_eval import DecoderEvaluator

    c = pairs["cfg"]
    sampling = {"sampler": "ddim", "steps": steps, "guidance_scale": float(c["sampling"]["guidance_scale"])}
    return DecoderEvaluator(pairs["held"], pairs["clip"], sampling, dict(c["eval"]), bool(c["use_caption"]))


def train_ours(pairs: dict[str, Any], budget_s: float, seed: int, score) -> list[dict[str, Any]]:
    from unclip.training.loop import LoopConfig, make_optimizer
    from unclip.training.state import EMA

    t = pairs["cfg"]["train"]
    torch.manual_seed(seed)
    model = our_model(pairs).train()
    loop = LoopConfig.from_dict({"lr": t["lr"], "weight_decay": t.get("weight_decay", 0.0),
                                 "ema_decay": t["ema_decay"], "grad_clip": t.get("grad_clip", 1.0),
                                 "warmup_steps": t.get("warmup_steps", 100)})
    opt = make_optimizer(model, loop)
    ema = EMA(model, loop.ema_decay)
    g = torch.Generator().manual_seed(seed)
    order = batch_order(len(pairs["images"]), int(t["batch_size"]), seed)
    warmup = max(1, int(loop.warmup_steps))

    def step(i: int) -> float:
        for group in opt.param_groups:  # the loop's linear warm-up; no decay inside a short budget
            group["lr"] = float(t["lr"]) * min(1.0, (i + 1) / warmup)
        loss = our_loss(pairs, model, next(order), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
        opt.step()
        ema.update(model)
        return float(loss.detach())

    def sample() -> dict[str, float]:
        with torch.no_grad():
            return score.scores(score.decode(ema.model.eval(), len(pairs["held"]["captions"])))

    return budgeted(step, sample, budget_s)


def our_flops_per_sample(pairs: dict[str, Any], idx: np.ndarray) -> float:
    model = our_model(pairs).train()
    g = torch.Generator().manual_seed(0)
    return common.count_flops(lambda: our_loss(pairs, model, idx, g).backward()) / len(idx)


def run_theirs(pairs: dict[str, Any], budget_s: float, steps: int, lrs: list[float], seed: int,
               target_flops: float, first: np.ndarray, threads: int) -> dict[str, Any]:
    from bench.dalle2_env import run_theirs as call
    from unclip.models.decoder_sampling import from_uint8

    c = pairs["cfg"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.pt"
        torch.save({"images": (from_uint8(pairs["images"]) + 1) / 2,  # their data range is [0, 1]
                    "zi": pairs["zi"], "states": pairs["states"],
                    "ho_zi": torch.as_tensor(np.asarray(pairs["held"]["embeddings"], np.float32)),
                    "ho_states": pairs["ho_states"]}, data)
        m = c["model"]
        spec = {"mode": "decoder_time_to_quality", "threads": threads, "data": str(data), "out": tmp,
                "budget_s": budget_s, "fractions": list(FRACTIONS), "lrs": lrs, "seed": seed,
                "steps": steps, "guidance_scale": float(c["sampling"]["guidance_scale"]),
                "batch": int(c["train"]["batch_size"]), "first_batch": first.tolist(),
                "ema_decay": float(c["train"]["ema_decay"]),
                "grad_clip": float(c["train"].get("grad_clip", 1.0)),
                "p_drop_clip": float(c["p_drop_clip"]), "p_drop_caption": float(c["p_drop_caption"]),
                "sizes": {"clip_dim": int(pairs["zi"].shape[1]), "context": int(pairs["states"].shape[1]),
                          "text_width": int(pairs["states"].shape[2])},
                "decoder": {**{k: m[k] for k in ("base_channels", "channel_mult", "layers_per_block",
                                                 "attention_resolutions", "head_channels", "context_dim",
                                                 "norm_groups", "num_clip_tokens")},
                            "resolution": int(c["resolution"]), "target_flops": target_flops}}
        print(f"  theirs: sized to our FLOPs per sample, then {len(lrs)} learning rate(s) x {budget_s:g} "
              "CPU s, sampled at each fraction (dalle2-pytorch's venv, a subprocess)", flush=True)
        result = call(spec)
        for r in result["runs"]:
            for p in r["points"]:
                p["images"] = np.load(Path(tmp) / p.pop("images_file"))
        return result


def run(run_dir: str, budget_s: float, lrs: list[float], steps: int = 50, max_holdout: int = 64,
        seed: int = 0, threads: int = 1, out: str | None = None) -> dict[str, Any]:
    common.set_threads(threads)
    pairs = load_pairs(run_dir, max_holdout)
    score = evaluator(pairs, steps)
    first = next(batch_order(len(pairs["images"]), int(pairs["cfg"]["train"]["batch_size"]), seed))
    target = our_flops_per_sample(pairs, first)
    ours = train_ours(pairs, budget_s, seed, score)
    theirs = run_theirs(pairs, budget_s, steps, lrs, seed, target, first, threads)
    equal = abs(theirs["gflop_per_sample"] * 1e9 / target - 1) <= 0.10
    if not equal:
        print(f"NOT equal work: their decoder {theirs['gflop_per_sample']:.4f} GFLOP per sample "
              f"against our {target / 1e9:.4f} (more than 10% apart)")
    keys = [k for k in SCORES if k in ours[0]["z"]]
    table = [{"side": "ours", "lr": float(pairs["cfg"]["train"]["lr"]), "budget": f"{p['fraction']:.0%}",
              "steps": p["steps"], **{k[4:]: p["z"][k] for k in keys}} for p in ours]
    for r in theirs["runs"]:
        for p in r["points"]:
            p["scores"] = score.scores(p["images"])
            table.append({"side": "theirs", "lr": r["lr"], "budget": f"{p['fraction']:.0%}",
                          "steps": p["steps"], **{k[4:]: p["scores"][k] for k in keys}})
    common.print_table(table, list(table[0]),
                       f"decoder: held-out scores after equal training CPU seconds (budget {budget_s:g} s, "
                       f"{threads} thread(s); DDIM {steps}, guidance "
                       f"{pairs['cfg']['sampling']['guidance_scale']:g}; {len(pairs['held']['captions'])} "
                       "images; clip_cosine_mismatched: the same decodes against other images' z_i"
                       + "".join(f"; chance {k[4:]} {ours[0]['z']['chance_' + k[4:]]:.2f}" for k in keys
                                 if "chance_" + k[4:] in ours[0]["z"]) + ")")
    result = {"name": "time_to_quality_decoder", "machine": common.machine(threads), "run_dir": run_dir,
              "budget_s": budget_s, "steps": steps, "n_holdout": len(pairs["held"]["captions"]),
              "n_train": int(len(pairs["images"])), "our_gflop_per_sample": target / 1e9,
              "their_knobs": theirs.get("knobs"), "their_gflop_per_sample": theirs.get("gflop_per_sample"),
              "their_params": theirs.get("params"),
              "our_params": sum(p.numel() for p in our_model(pairs).parameters()),
              "equal_work": equal, "rows": table,
              "ours": [{"fraction": p["fraction"], "cpu_s": p["cpu_s"], "steps": p["steps"],
                        "loss": p["loss"], "scores": p["z"]} for p in ours],
              "theirs": [{"lr": r["lr"], "points": [{k: v for k, v in p.items() if k != "images"}
                                                    for p in r["points"]]} for r in theirs["runs"]]}
    path = common.write_result("time_to_quality_decoder", result, out)
    print(f"wrote {path}")
    return result


DEFAULTS = {"budget_s": 480.0, "lrs": [3e-4, 1e-3, 3e-3], "steps": 50, "max_holdout": 64}
QUICK = {"budget_s": 60.0, "lrs": [1e-3], "steps": 10, "max_holdout": 16}  # python -m bench --quick


def run_on(run_dir: str, quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """``python -m bench --run-dir RUN``: the defaults, or a short pass with ``--quick``."""
    return run(run_dir, **(QUICK if quick else DEFAULTS), threads=threads)


def main(argv: list[str] | None = None) -> int:
    a = parser(__doc__, "decoder", DEFAULTS, "images", "1e-4").parse_args(argv)
    run(**vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
