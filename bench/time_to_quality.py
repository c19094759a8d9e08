"""Time to quality, ours against dalle2-pytorch: the diffusion prior of a finished run, both sides
trained from scratch for the same CPU seconds on the same training rows, scored on the same
held-out rows at 25%, 50% and 100% of the budget.

Inputs come from ``--run-dir`` (any finished prior stage: its embeddings, held-out split, CLIP and
prior config). The captions' per-token states are computed once with the run's CLIP, outside the
budget, and fed to both sides (theirs zero-padded to the CLIP context, as their models expect).
Both draw the same batches in the same order. Ours: the run's prior config with the stage's
AdamW, warm-up, clipping and EMA, at a constant learning rate after the warm-up (the stage's
cosine decay needs a step count, which a CPU-seconds budget does not fix). Theirs: their ``DiffusionPrior`` sized to
our FLOPs per sample (``bench/their_dalle2.py``), trained by their own ``DiffusionPriorTrainer``
(its AdamW with its default weight decay; gradients clipped at 1.0 and its EMA updated every
step at our decay, as ours: its default EMA would lag in so short a training) at each learning
rate of a small sweep, so the comparison is fair to them. Their DDIM samples with eta 0, as ours. Score: the mean cosine of each side's EMA samples (DDIM, the same step count, one
candidate, the run's guidance) to the true z_i, beside the two baselines a prior must beat (z_t
itself and the mean training z_i). Budgets count training CPU seconds only (1 thread); sampling
and scoring are outside them.

    .venv/bin/python -m bench.time_to_quality --run-dir RUN [--budget-s 120] [--lrs 1e-4 3e-4 1e-3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from bench import common

FRACTIONS = (0.25, 0.5, 1.0)


def batch_order(n: int, batch: int, seed: int) -> Iterator[np.ndarray]:
    """Endless seeded epochs of row indices, whole batches only: both sides draw this sequence."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            yield order[i:i + batch]


def load_rows(run_dir: str, max_holdout: int) -> dict[str, Any]:
    """Training and held-out rows of the run's embeddings, the per-token caption states of both
    (the run's CLIP, padded to its context) and the run's prior config."""
    from pipelines.manifest import read_manifest
    from stages.prior_data import read_holdout, read_split
    from unclip.embeddings import io as eio
    from unclip.models.captions import CaptionEncoder
    from unclip.models.clip import load_clip

    manifests = {st: read_manifest(run_dir, st) for st in ("clip", "embed", "prior")}
    missing = [st for st, m in manifests.items() if m is None]
    if missing:
        raise SystemExit(f"{run_dir}: stage(s) {', '.join(missing)} not finished; run the pipeline "
                         "through the prior stage first")
    prior = manifests["prior"]
    cfg = prior.config["prior"]
    if cfg["kind"] != "diffusion":
        raise SystemExit(f"{run_dir}: the prior stage trained a {cfg['kind']} prior; this compares "
                         "diffusion priors (dalle2-pytorch has no autoregressive one)")
    if cfg.get("init_from"):
        raise SystemExit(f"{run_dir}: the prior was fine-tuned from {cfg['init_from']} (an imported "
                         "model's own architecture and inputs); this trains the run's prior config "
                         "from scratch, so it needs a run whose prior was trained from scratch")
    frac = float(cfg["holdout_fraction"])
    files = eio.list_files(manifests["embed"].outputs["embeddings"])
    parts = [read_split({"uri": np.array([u])}, "train", frac) for u in files]
    train = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    held = read_holdout(files, frac, max_holdout)
    batch = int(cfg["train"]["batch_size"])
    if len(train["caption"]) < batch or not len(held["captions"]):
        raise SystemExit(f"{run_dir}: {len(train['caption'])} training rows (a batch is {batch}) and "
                         f"{len(held['captions'])} held-out rows: too few to compare on")
    clip = load_clip(manifests["clip"].outputs["model"])
    encoder = CaptionEncoder(clip, "cpu")
    context = int(clip.context_length)

    def states(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros(len(captions), context, clip.text_width)
        mask = torch.zeros(len(captions), context, dtype=torch.bool)
        for i in range(0, len(captions), 256):
            s, m = encoder(captions[i:i + 256])
            out[i:i + 256, :s.shape[1]], mask[i:i + 256, :m.shape[1]] = s, m
        return out, mask

    tr_states, tr_mask = states([str(c) for c in train["caption"]])
    ho_states, ho_mask = states([str(c) for c in held["captions"]])
    folder = prior.outputs["prior"]
    from unclip import checkpoint

    ckpt = checkpoint.read_config(folder)
    return {"zi": torch.as_tensor(train["image_embedding"]), "zt": torch.as_tensor(train["text_embedding"]),
            "states": tr_states, "mask": tr_mask,
            "ho_zi": held["image"], "ho_zt": torch.as_tensor(held["text"]),
            "ho_states": ho_states, "ho_mask": ho_mask,
            "mean_train_zi": train["image_embedding"].mean(0),
            "model": ckpt["config"], "sampling": ckpt["sampling"], "cfg": cfg}


def train_ours(rows: dict[str, Any], budget_s: float, steps: int, seed: int) -> list[dict[str, Any]]:
    """Our prior from scratch, trained as the stage does, for ``budget_s`` CPU seconds; the EMA
    sampled on the held-out rows at each fraction of the budget."""
    from unclip.models.prior import DiffusionPrior
    from unclip.training.loop import LoopConfig, make_optimizer
    from unclip.training.state import EMA

    c = rows["cfg"]
    t, o = c["train"], c[c["kind"]]["optim"]
    torch.manual_seed(seed)
    model = DiffusionPrior(rows["model"]).train()
    loop = LoopConfig.from_dict({"lr": o["lr"], "weight_decay": o["weight_decay"],
                                 "ema_decay": o["ema_decay"], "grad_clip": t.get("grad_clip", 1.0),
                                 "warmup_steps": t.get("warmup_steps", 100)})
    opt = make_optimizer(model, loop, betas=(0.9, float(o["adam_beta2"])), eps=float(o["adam_eps"]))
    ema = EMA(model, loop.ema_decay)
    g = torch.Generator().manual_seed(seed)
    order = batch_order(len(rows["zi"]), int(t["batch_size"]), seed)
    warmup = max(1, int(loop.warmup_steps))

    def step(i: int) -> float:
        idx = torch.as_tensor(next(order))
        for group in opt.param_groups:  # the loop's linear warm-up; no decay inside a short budget
            group["lr"] = float(o["lr"]) * min(1.0, (i + 1) / warmup)
        mask = rows["mask"][idx]
        n = int(mask.sum(1).max())
        loss = model.losses(rows["zi"][idx], rows["states"][idx][:, :n], mask[:, :n], rows["zt"][idx], g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
        opt.step()
        ema.update(model)
        return float(loss.detach())

    def sample(m: torch.nn.Module) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed + 1)
        n = int(rows["ho_mask"].sum(1).max())
        with torch.no_grad():
            z = m.sample(rows["ho_states"][:, :n], rows["ho_mask"][:, :n], rows["ho_zt"], steps=steps,
                         sampler="ddim", guidance_scale=float(rows["sampling"]["guidance_scale"]),
                         num_candidates=1, generator=gen)
        return z.numpy()

    return budgeted(step, lambda: sample(ema.model), budget_s)


def budgeted(step, sample, budget_s: float) -> list[dict[str, Any]]:
    """Train with ``step(i)`` until ``budget_s`` CPU seconds of training; ``sample()`` (not counted)
    at each fraction of the budget."""
    out, spent, i, losses = [], 0.0, 0, []
    for frac in FRACTIONS:
        while spent < frac * budget_s:
            c0 = time.process_time()
            losses.append(step(i))
            spent += time.process_time() - c0
            i += 1
        out.append({"fraction": frac, "cpu_s": spent, "steps": i,
                    "loss": float(np.mean(losses[-20:])), "z": sample()})
        print(f"  ours: {frac:.0%} of {budget_s:g} CPU s, {i} steps, loss {out[-1]['loss']:.4f}", flush=True)
    return out


def run_theirs(rows: dict[str, Any], budget_s: float, steps: int, lrs: list[float], seed: int,
               target_flops: float, first: np.ndarray, threads: int) -> dict[str, Any]:
    from bench.dalle2_env import run_theirs as call

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.pt"
        torch.save({k: rows[k] for k in ("zi", "zt", "states", "ho_zt", "ho_states")}, data)
        c = rows["cfg"]
        spec = {"mode": "time_to_quality", "threads": threads, "data": str(data), "out": tmp,
                "budget_s": budget_s, "fractions": list(FRACTIONS), "lrs": lrs, "seed": seed,
                "steps": steps, "guidance_scale": float(rows["sampling"]["guidance_scale"]),
                "batch": int(c["train"]["batch_size"]), "first_batch": first.tolist(),
                "ema_decay": float(c[c["kind"]]["optim"]["ema_decay"]),
                "sizes": {"clip_dim": int(rows["model"]["dim"]), "context": int(rows["states"].shape[1]),
                          "text_width": int(rows["states"].shape[2])},
                "prior": {"layers": int(rows["model"]["layers"]), "heads": int(rows["model"]["heads"]),
                          "target_flops": target_flops}}
        print(f"  theirs: sized to our FLOPs per sample, then {len(lrs)} learning rate(s) x {budget_s:g} "
              "CPU s, sampled at each fraction (dalle2-pytorch's venv, a subprocess)", flush=True)
        result = call(spec)
        for r in result["runs"]:
            for p in r["points"]:
                p["z"] = np.load(Path(tmp) / p.pop("z_file"))
        return result


def our_flops_per_sample(rows: dict[str, Any], idx: np.ndarray) -> float:
    """Counted on a training batch (``idx``): each batch is trimmed to its longest caption."""
    from unclip.models.prior import DiffusionPrior

    model = DiffusionPrior(rows["model"]).train()
    g = torch.Generator().manual_seed(0)
    idx = torch.as_tensor(idx)
    mask = rows["mask"][idx]
    n = int(mask.sum(1).max())
    return common.count_flops(lambda: model.losses(rows["zi"][idx], rows["states"][idx][:, :n], mask[:, :n],
                                                   rows["zt"][idx], g)["loss"].backward()) / len(idx)


def run(run_dir: str, budget_s: float, lrs: list[float], steps: int = 64, max_holdout: int = 256,
        seed: int = 0, threads: int = 1, out: str | None = None) -> dict[str, Any]:
    from unclip.models.prior import mean_cosine

    common.set_threads(threads)
    rows = load_rows(run_dir, max_holdout)
    first = next(batch_order(len(rows["zi"]), int(rows["cfg"]["train"]["batch_size"]), seed))
    target = our_flops_per_sample(rows, first)
    ours = train_ours(rows, budget_s, steps, seed)
    theirs = run_theirs(rows, budget_s, steps, lrs, seed, target, first, threads)
    equal = abs(theirs["gflop_per_sample"] * 1e9 / target - 1) <= 0.10
    if not equal:
        print(f"NOT equal work: their prior {theirs['gflop_per_sample']:.4f} GFLOP per sample against "
              f"our {target / 1e9:.4f} (more than 10% apart)")
    truth = rows["ho_zi"]
    table = []
    for i, frac in enumerate(FRACTIONS):
        row = {"budget": f"{frac:.0%}", "cpu_s": round(frac * budget_s, 1),
               "ours": mean_cosine(ours[i]["z"], truth), "our_steps": ours[i]["steps"]}
        for r in theirs["runs"]:
            p = r["points"][i]
            row[f"theirs lr {r['lr']:g}"] = mean_cosine(p["z"], truth)
            row[f"their steps lr {r['lr']:g}"] = p["steps"]
        table.append(row)
    baselines = {"z_t": mean_cosine(rows["ho_zt"].numpy(), truth),
                 "mean_train_z_i": mean_cosine(rows["mean_train_zi"], truth)}
    common.print_table(table, list(table[0]),
                       f"prior: held-out cosine to the true z_i after equal training CPU seconds "
                       f"(budget {budget_s:g} s, {threads} thread(s); DDIM {steps}; baselines: z_t "
                       f"{baselines['z_t']:.3f}, mean training z_i {baselines['mean_train_z_i']:.3f})")
    result = {"name": "time_to_quality", "machine": common.machine(threads), "run_dir": run_dir,
              "budget_s": budget_s, "steps": steps, "n_holdout": len(truth),
              "n_train": int(len(rows["zi"])), "our_gflop_per_sample": target / 1e9,
              "their_knobs": theirs.get("knobs"), "their_gflop_per_sample": theirs.get("gflop_per_sample"),
              "equal_work": equal,
              "baselines": baselines, "rows": table,
              "ours": [{k: v for k, v in p.items() if k != "z"} for p in ours],
              "theirs": [{"lr": r["lr"], "points": [{k: v for k, v in p.items() if k != "z"} for p in r["points"]]}
                         for r in theirs["runs"]]}
    path = common.write_result("time_to_quality", result, out)
    print(f"wrote {path}")
    return result


DEFAULTS = {"budget_s": 120.0, "lrs": [3e-4, 1e-3, 3e-3], "steps": 64, "max_holdout": 256}
QUICK = {"budget_s": 20.0, "lrs": [1e-3], "steps": 16, "max_holdout": 64}  # python -m bench --quick


def parser(doc: str, needs: str, defaults: dict[str, Any], scored: str,
           their_lr: str) -> argparse.ArgumentParser:
    """The command line both time-to-quality benchmarks share, with each one's defaults."""
    p = argparse.ArgumentParser(description=common.description(doc))
    p.add_argument("--run-dir", required=True, metavar="RUN", help=f"a run whose {needs} stage finished")
    p.add_argument("--budget-s", type=float, default=defaults["budget_s"],
                   help="training CPU seconds per side and run (default %(default)s)")
    p.add_argument("--lrs", type=float, nargs="+", default=defaults["lrs"],
                   help=f"their learning-rate sweep (their trainer's default is {their_lr})")
    p.add_argument("--steps", type=int, default=defaults["steps"],
                   help="DDIM steps both sides sample with (default %(default)s)")
    p.add_argument("--holdout", dest="max_holdout", metavar="N", type=int, default=defaults["max_holdout"],
                   help=f"held-out {scored} scored (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, both sides")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json)")
    return p


def run_on(run_dir: str, quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """``python -m bench --run-dir RUN``: the defaults, or a short pass with ``--quick``."""
    return run(run_dir, **(QUICK if quick else DEFAULTS), threads=threads)


def main(argv: list[str] | None = None) -> int:
    a = parser(__doc__, "prior (diffusion)", DEFAULTS, "rows", "3e-4").parse_args(argv)
    run(**vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
