"""Training throughput with 1 and 2 Ray Train workers: a short run of the tiny diffusion prior
through the very glue every training stage uses (``stages.training.fit`` -> TorchTrainer ->
``stages.training.train_worker``: ``prepare`` (DDP), AdamW, EMA, restore, ``loop.train``),
on random batches of the stage's shapes made inside each worker (the data path is measured in
bench.pipeline_stages). Batch size is per worker, as in the stage, so 2 workers process twice the
samples per step. Throughput is timed inside the workers after warm-up steps (no start-up).

The embed stage's 1 vs 2 actors are in bench.pipeline_stages.

    .venv/bin/python -m bench.scaling [--quick] [--num-cpus 2] [--workers 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

from bench import common

WARMUP_STEPS = 3


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the training stages' worker template on random prior batches."""
    import ray.train
    import torch

    from bench import models as M
    from stages import training
    from unclip.training.loop import LoopConfig
    from unclip.training.state import unwrap

    torch.set_num_threads(int(config["threads"]))
    s = M.tiny_sizes()
    cfg = LoopConfig(total_steps=int(config["steps"]), lr=1e-4, warmup_steps=1, log_every=10**6,
                     checkpoint_every=10**6, ema_decay=0.999)
    stamps: list[float] = []

    def steps(w: training.Worker) -> training.Steps:
        def batches(epoch: int):
            for _ in range(cfg.total_steps):
                stamps.append(time.perf_counter())
                yield {k: v.to(w.device) for k, v in
                       M.prior_batch(s, int(config["batch"]), w.generator).items()}

        def step_loss(m, b):
            return unwrap(m).losses(b["z_i"], b["tokens"], b["mask"], b["z_t"], w.generator, net=m)

        return training.Steps(batches, step_loss)

    training.train_worker({**config, "train": {"seed": 0}}, lambda: M.make_prior(s), cfg, steps)
    stamps.append(time.perf_counter())
    timed = stamps[WARMUP_STEPS:]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    out = {"rank": rank, "world_size": ctx.get_world_size(), "steps": len(timed) - 1,
           "seconds": timed[-1] - timed[0]}
    with open(os.path.join(config["out_dir"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def run_workers(num_workers: int, steps: int, batch: int, threads: int, tmp: str) -> dict[str, Any]:
    from pipelines.config import load_config
    from pipelines.context import StageContext
    from stages import training

    run_dir = os.path.join(tmp, f"w{num_workers}")
    os.makedirs(run_dir)
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))  # a GPU cluster: one GPU under each worker
    cfg = load_config(["preset=tiny", f"run_dir={run_dir}"] + ([f"ray.num_gpus={gpus}"] if gpus else []))
    ctx = StageContext(cfg=cfg, name="prior", stage_dir=os.path.join(run_dir, "prior"), upstream={})
    t0 = time.perf_counter()
    training.fit(ctx, train_loop, {"steps": steps, "batch": batch, "threads": threads,
                                   "out_dir": run_dir}, num_workers, max_failures=0)
    total = time.perf_counter() - t0
    ranks = [json.load(open(os.path.join(run_dir, f"rank{r}.json"))) for r in range(num_workers)]
    sec = max(r["seconds"] for r in ranks)
    n_steps = min(r["steps"] for r in ranks)
    return {"model": "prior (tiny)", "workers": num_workers, "batch_per_worker": batch,
            "steps_timed": n_steps, "seconds": sec, "steps_per_s": n_steps / sec,
            "samples_per_s": n_steps * batch * num_workers / sec, "wall_with_startup_s": total}


def run(quick: bool = False, threads: int = 1, out: str | None = None,
        num_cpus: int = 2, workers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    from bench import models as M

    batch = M.tiny_sizes().prior_batch
    steps = WARMUP_STEPS + (5 if quick else 20)
    rows = []
    with tempfile.TemporaryDirectory(prefix="unclip-bench-") as tmp, common.local_ray(num_cpus):
        for n in workers:
            rows.append(run_workers(n, steps, batch, threads, tmp))
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup_vs_1"] = r["samples_per_s"] / base
    common.print_table(rows, ["model", "workers", "batch_per_worker", "steps_timed", "steps_per_s",
                              "samples_per_s", "speedup_vs_1", "wall_with_startup_s"],
                       f"Ray Train data-parallel scaling (local Ray, {num_cpus} CPUs, torch {threads} "
                       "thread(s) per worker; wall seconds)")
    result = {"name": "scaling", "machine": common.machine(threads), "num_cpus": num_cpus,
              "rows": rows}
    path = common.write_result("scaling", result, out)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    common.add_common_args(p)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="Ray Train worker counts to compare (the first is the baseline)")
    a = p.parse_args(argv)
    run(a.quick, a.threads, a.out, a.num_cpus, tuple(a.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
