"""``make gpu-check``: a prepared check of one GPU in at most 8 minutes.

Three sections, in order, each skipped with its reason once the time budget is spent:

* ``pipeline``: the smoke pipeline (``python -m pipelines run preset=smoke``) in a subprocess, with
  every stage free to use the GPU (the training stages' Ray Train workers, embed's CLIP actors,
  evaluate's cascade actors); per stage its seconds (from its manifest) and whether a process
  held GPU memory while it ran (``nvidia-smi``, sampled every second);
* ``steps``: one bf16 training step (autocast, AdamW, EMA, as the stages train) of every model the
  preset trains, at its size (``--scale paper``: the paper preset, decoder 2.26B, both priors
  ~1.2B, upsamplers 648M / 242M), built by the plan's own builders (:mod:`pipelines.plan.models`)
  and stepped by the plan's per-stage step (:mod:`pipelines.plan.activations`: the stage's loss on
  a batch of its shapes); step time, MFU (the plan's FLOPs per sample, counted on fake tensors, x
  batch / step time / the GPU's dense bf16 peak) and peak memory (``max_memory_allocated``). The
  batch is the preset's per-worker batch, halved until it fits;
* ``cascade``: sampling latency of the cascade at those sizes with random weights (it measures
  time): prior, decoder, upsampler 1, upsampler 2 with ``--sample-steps`` steps each, one caption,
  and the configured step counts extrapolated from the measured time per step.

A table goes to stdout and the JSON (GPU name, date, every figure) to ``--out`` (default
bench/results/gpu_check-<date>.json). Each section and model is started only while the budget
lasts; a watchdog ends the run at the budget (exit 3) with what was measured written. Without a CUDA device it exits 2 with one line, unless it
is asked for the CPU dry run (``--device cpu --scale smoke``: tiny models, a few steps), which a
fast test runs so the script cannot rot.

    make gpu-check                                            # on a GPU machine
    .venv/bin/python -m bench.gpu_check --device cpu --scale smoke --skip pipeline   # dry run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench import common

BUDGET_S = 470.0          # 8 minutes with the interpreter's start and imports (~5 s)
SECTIONS = ("pipeline", "steps", "cascade")
PIPELINE_SHARE = 0.5      # of the budget: the smoke pipeline may use at most this much
MIN_MODEL_S = 15.0        # a model's step + sampling is not started with less budget left
# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name(); the
# longest matching key wins. Unknown GPUs: a measured bf16 matmul peak (marked as such).
BF16_PEAK = {"H100": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}
STAGE_LINE = re.compile(r"stage (\S+)\s+running")


class Budget:
    """Wall seconds left of ``total`` since construction."""

    def __init__(self, total: float) -> None:
        self.total, self.t0 = float(total), time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total - self.spent()


# ---- device facts ------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, where it came from): the GPU's dense bf16 peak from its datasheet when its name is
    known, else a measured bf16 (GPU) or fp32 (CPU) matmul throughput."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        keys = [k for k in BF16_PEAK if k in name]
        if keys:
            k = max(keys, key=len)
            return BF16_PEAK[k], f"{k} dense bf16 datasheet peak"
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        t = common.timed(lambda: a @ a, 5, warmup=2)["median_s"]
        return 2 * n**3 / t, "measured bf16 matmul (unknown GPU)"
    threads = torch.get_num_threads()
    return common.matmul_peak_gflops(threads) * 1e9 * threads, f"measured fp32 matmul, {threads} threads"


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


# ---- (a) the smoke pipeline --------------------------------------------------------------------


class GpuWatch:
    """Samples ``nvidia-smi``'s compute processes every second; :meth:`mark` names the stage that
    is running, so each stage gets whether any process held GPU memory while it ran."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.seen: dict[str, float] = {}          # stage -> most MiB held by compute processes
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuWatch":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=5)

    def mark(self, stage: str) -> None:
        self.stage = stage
        self.seen.setdefault(stage, 0.0)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            stage = self.stage
            if stage is None:
                continue
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            rows = [line.split(",") for line in out.strip().splitlines() if "," in line]
            # a process listed counts even where the memory column reads [N/A] (some containers)
            mib = sum(float(r[1]) if r[1].strip().replace(".", "", 1).isdigit() else 1.0 for r in rows)
            self.seen[stage] = max(self.seen.get(stage, 0.0), mib)


def run_pipeline(device: torch.device, timeout_s: float) -> dict[str, Any]:
    """The smoke pipeline in a subprocess (its own Ray, the GPU visible), cut off at ``timeout_s``."""
    from pipelines.manifest import read_manifest

    run_dir = Path(tempfile.mkdtemp(prefix="unclip-gpu-check-"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "pipelines", "run", "preset=smoke", f"run_dir={run_dir / 'run'}"]
    t0 = time.monotonic()
    tail: list[str] = []
    with GpuWatch() as watch:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        timer = threading.Timer(max(1.0, timeout_s - 15.0), lambda: _kill_group(proc))
        timer.start()
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                tail = (tail + [line.rstrip()])[-20:]
                m = STAGE_LINE.search(line)
                if m:
                    watch.mark(m.group(1))
            rc = proc.wait()
        finally:
            timer.cancel()
    wall = time.monotonic() - t0
    timed_out = wall >= timeout_s - 16 and rc != 0
    stages = []
    for name in ("data", "filter", "clip", "embed", "pca", "prior", "upsample1", "upsample2",
                 "decoder", "evaluate"):
        try:
            m = read_manifest(str(run_dir / "run"), name)
        except Exception:  # noqa: BLE001 - not finished
            m = None
        gpu_mib = watch.seen.get(name) if watch.available else None
        stages.append({"stage": name, "done": m is not None,
                       "seconds": m.duration_s if m is not None else None,
                       "gpu_mib": gpu_mib,
                       "on_gpu": None if gpu_mib is None else gpu_mib > 0})
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"rc": rc, "wall_s": wall, "timed_out": timed_out, "timeout_s": timeout_s,
            "stages": stages, "log_tail": tail if rc != 0 else [],
            "gpu_watch": "nvidia-smi" if watch.available else "no nvidia-smi: GPU use not checked"}


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop the pipeline: SIGINT first (its driver then shuts its local Ray down), and after
    ``grace_s`` SIGKILL to every process of its session (Ray's workers sit in process groups of
    their own inside it)."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    for pid in _session_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (Linux /proc; none elsewhere)."""
    out = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            out.append(int(entry.parent.name))
    return out


# ---- (b) one training step per model, (c) the cascade's latency --------------------------------


def _models(cfg, clip, device: torch.device) -> list[tuple[str, str, Any]]:
    """(stage, plan row name, Built) of every trained model, built on ``device`` by the plan."""
    from pipelines.plan import models

    built = models.priors(cfg, clip, device) + [models.decoder(cfg, clip, device)] + \
        [models.upsampler(cfg, n, device) for n in ("upsample1", "upsample2")]
    return [(b.stage, b.name, b) for b in built]


def flops_per_sample(stage: str, name: str, cfg, meta_clip) -> float:
    """The plan's count: the stage's step (forward + backward, the frozen CLIP's text tower
    included) at batch 1 on fake tensors (:func:`pipelines.plan.activations.count_flops`)."""
    from pipelines.plan import activations

    (_, _, b), = _models_one(cfg, meta_clip, stage, name)
    probe = activations.probe_for(stage, name, b.module, cfg, meta_clip.model)
    with activations.fake_copy(probe) as (model, frozen):
        return activations.count_flops(probe, model, frozen, False)


def _models_one(cfg, clip, stage: str, name: str, device: torch.device | None = None):
    """The one model ``name`` of ``stage`` (the priors are built in pairs by the plan)."""
    from pipelines.plan import models

    device = device or models.META
    if stage == "prior":
        only = "diffusion" if name.startswith("diffusion") else "autoregressive"
        return [(stage, b.name, b) for b in models.priors(cfg, clip, device, only)]
    if stage == "decoder":
        b = models.decoder(cfg, clip, device)
    else:
        b = models.upsampler(cfg, stage, device)
    return [(stage, b.name, b)]


def train_step(probe, model: torch.nn.Module, frozen, batch: int, device: torch.device,
               steps: int) -> dict[str, float]:
    """``steps`` timed bf16 steps (after one warm-up) of the probe's loss: autocast, backward,
    clipping, the stage's AdamW (fused on CUDA) and the EMA update."""
    from unclip.training.loop import LoopConfig, make_optimizer
    from unclip.training.state import EMA

    lcfg = LoopConfig(lr=1e-4, grad_clip=1.0, ema_decay=0.9999)
    opt = make_optimizer(model, lcfg)
    ema = EMA(model, lcfg.ema_decay)
    if frozen is not None:
        frozen.requires_grad_(False)

    def step() -> None:
        with torch.device(device):  # the probe makes its batch with torch's factories
            inputs = probe.inputs(batch)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = probe.loss(model, frozen, inputs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), lcfg.grad_clip)
        opt.step()
        ema.update(model)

    try:
        t = common.timed(step, steps, warmup=1)
    finally:
        opt.zero_grad(set_to_none=True)
        del opt, ema
    return t


def measure_model(stage: str, name: str, cfg, meta_clip, clip, device: torch.device, steps: int,
                  peak: float) -> tuple[dict[str, Any], torch.nn.Module]:
    """One model's training step row (and the model, for the cascade). ``meta_clip`` / ``clip``:
    the plan's ClipEncoder on meta and on ``device`` (its text tower makes the caption states)."""
    from pipelines.plan import activations

    t0 = time.monotonic()
    flops = flops_per_sample(stage, name, cfg, meta_clip)
    t_flops = time.monotonic() - t0
    (_, _, built), = _models_one(cfg, clip, stage, name, device)
    model = built.module.to(device).train()
    probe = activations.probe_for(stage, name, model, cfg, clip.model)
    batch = int(cfg[stage].train.batch_size)
    row: dict[str, Any] = {"stage": stage, "model": name, "params": built.params,
                           "gflop_per_sample": flops / 1e9, "flop_count_s": t_flops}
    while True:
        reset_memory(device)
        try:
            t = train_step(probe, model, clip.model, batch, device, steps)
            break
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            if batch == 1:
                raise
            row.setdefault("oom_batches", []).append(batch)
            batch //= 2
    sec = common.seconds(t, torch.get_num_threads(), device.type)
    row.update({"batch": batch, "step_s": sec, "samples_per_s": batch / sec,
                "tflops": flops * batch / sec / 1e12, "mfu": flops * batch / sec / peak,
                "peak_mem_gb": peak_memory_gb(device)})
    model.zero_grad(set_to_none=True)
    return row, model.eval()


@torch.no_grad()
def sample_latency(stage: str, model: torch.nn.Module, cfg, clip, device: torch.device,
                   steps: int) -> dict[str, Any]:
    """Seconds to sample one caption's output of this model with ``steps`` steps (random
    conditioning of the shapes the cascade feeds), and the configured step count extrapolated."""
    from unclip.models.decoder_sampling import TextCondition, decode

    g = torch.Generator().manual_seed(0)  # the samplers draw on the CPU and move the noise
    ctx_len, width = int(clip.context_length), int(clip.text_width)
    tokens = torch.randn(1, ctx_len, width, device=device)
    mask = torch.ones(1, ctx_len, dtype=torch.bool, device=device)
    z = torch.nn.functional.normalize(torch.randn(1, int(clip.dim), device=device), dim=-1)
    if stage == "prior":
        c = cfg.prior[str(cfg.prior.kind)].sampling
        sampler = str(c.get("sampler", "ddim"))
        if hasattr(model, "sample_codes"):  # AR: one forward per code, the step count is fixed
            fn, configured = (lambda: model.sample(tokens, mask, z, num_candidates=int(c.num_candidates),
                                                   generator=g)), int(model.cfg.n_components)
            steps = configured
        else:
            fn = lambda: model.sample(tokens, mask, z, steps=steps, sampler="ddim",  # noqa: E731
                                      num_candidates=int(c.num_candidates), generator=g)
            configured = int(c.steps)
    elif stage == "decoder":
        c = cfg.decoder.sampling
        sampler, configured = str(c.sampler), int(c.steps)
        text = TextCondition(tokens, mask) if model.cfg.use_caption else None
        fn = lambda: decode(model, z, text, float(c.guidance_scale), "ddim", steps,  # noqa: E731
                            generator=g)
    else:
        c = cfg[stage]
        high, low, _ = _sizes(c)
        x = torch.rand(1, 3, low, low, device=device) * 2 - 1
        sampler, configured = str(c.sampling.sampler), int(c.sampling.steps)
        fn = lambda: model.upsample(x, steps=steps, sampler="ddim", generator=g)  # noqa: E731
    t = common.timed(fn, 1, warmup=1)
    sec = common.seconds(t, torch.get_num_threads(), device.type)
    return {"stage": stage, "steps": steps, "seconds": sec, "per_step_s": sec / steps,
            "configured": f"{sampler} {configured}", "configured_s_est": sec / steps * configured}


def _sizes(c) -> tuple[int, int, int]:
    from stages.upsample import sizes

    return sizes(c)


def run_models(cfg, device: torch.device, budget: Budget, steps: int, sample_steps: int,
               do_cascade: bool, result: dict[str, Any]) -> None:
    """Fills ``result``'s steps rows, cascade rows and skipped items (with reasons) as it goes, so
    the watchdog writes what was measured when it cuts the run off."""
    from pipelines.plan import models

    meta_clip_enc, _, _ = models.clip_encoder(cfg)
    clip_enc, _, _ = models.clip_encoder(cfg, device)
    clip_enc.model.to(device).eval().requires_grad_(False)
    peak, peak_src = peak_flops(device)
    step_rows, cascade_rows, skipped = result["steps"], result["cascade"], result["skipped"]
    kind = str(cfg.prior.kind)
    order = [("prior", "diffusion prior" if kind == "diffusion" else "AR prior"),
             ("prior", "AR prior" if kind == "diffusion" else "diffusion prior"),
             ("decoder", "decoder"), ("upsample1", None), ("upsample2", None)]
    for stage, name in order:
        if name is None:
            name = _models_one(cfg, meta_clip_enc, stage, "")[0][1]
        if budget.left() < MIN_MODEL_S:
            skipped.append({"item": f"{stage} {name}", "reason": f"time budget spent "
                            f"({budget.spent():.0f} of {budget.total:.0f} s)"})
            continue
        model = None
        result["running"] = f"{stage} {name}"
        try:
            row, model = measure_model(stage, name, cfg, meta_clip_enc, clip_enc, device, steps, peak)
            row["peak_source"] = peak_src
            step_rows.append(row)
            in_cascade = name != ("AR prior" if kind == "diffusion" else "diffusion prior")
            if do_cascade and in_cascade:
                if budget.left() < MIN_MODEL_S / 3:
                    skipped.append({"item": f"cascade {stage}", "reason": "time budget spent"})
                else:
                    cascade_rows.append({"model": name, **sample_latency(
                        stage, model, cfg, clip_enc, device, sample_steps)})
        except Exception as exc:  # noqa: BLE001 - reported, the others still run
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            skipped.append({"item": f"{stage} {name}", "reason": f"failed: {type(exc).__name__}: {msg}"})
        finally:
            del model
            reset_memory(device)
    if cascade_rows:
        cascade_rows.append({"model": "cascade", "stage": "sum",
                             "steps": sum(r["steps"] for r in cascade_rows),
                             "seconds": sum(r["seconds"] for r in cascade_rows),
                             "configured": "as configured",
                             "configured_s_est": sum(r["configured_s_est"] for r in cascade_rows)})


def watchdog(budget: Budget, result: dict[str, Any], out: Path) -> threading.Timer:
    """At the budget's end, whatever is still running: write what was measured, say what was cut
    off, exit 3. The sections' own checks skip work that would not fit; this is the hard stop."""

    def fire() -> None:
        result["skipped"].append({"item": result.get("running") or "the running item",
                                  "reason": f"cut off at the {budget.total:.0f} s hard limit"})
        result["total_s"] = budget.spent()
        path = common.write_result("gpu_check", result, out)
        print(f"gpu_check: cut off at the {budget.total:.0f} s budget; partial results in {path}",
              file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(max(0.0, budget.left()), fire)
    timer.daemon = True
    timer.start()
    return timer


# ---- main ----------------------------------------------------------------------------------------


def default_out(now: datetime.datetime) -> Path:
    return common.results_path(f"gpu_check-{now:%Y-%m-%d}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default; exits 2 without one) or cpu for the dry run")
    p.add_argument("--scale", default=None, choices=("paper", "smoke"),
                   help="model sizes: the paper preset (default on cuda) or smoke (default on cpu)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"wall seconds for everything (default {BUDGET_S:.0f}); what does not fit "
                        "is skipped with its reason")
    p.add_argument("--skip", action="append", choices=SECTIONS, default=[],
                   help="leave a section out (repeatable)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model (after 1 warm-up)")
    p.add_argument("--sample-steps", type=int, default=4, help="sampling steps per cascade stage")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_check-<date>.json)")
    a = p.parse_args(argv)
    budget = Budget(a.budget_s)
    scale = a.scale or ("paper" if a.device == "cuda" else "smoke")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); for a dry run "
              "without one: --device cpu --scale smoke", file=sys.stderr)
        return 2
    if a.device == "cpu" and scale == "paper":
        print("gpu_check: --scale paper needs a GPU (a 2.26B decoder step on the CPU would take "
              "minutes); use --scale smoke with --device cpu", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    now = datetime.datetime.now(datetime.timezone.utc)
    from pipelines.config import load_config

    cfg = load_config([f"preset={scale}"])
    result: dict[str, Any] = {"name": "gpu_check", "date": now.isoformat(timespec="seconds"),
                              "device": device_name(device), "scale": scale, "budget_s": a.budget_s,
                              "machine": common.machine(), "steps": [], "cascade": [],
                              "skipped": []}
    out = Path(a.out) if a.out else default_out(now)
    timer = watchdog(budget, result, out)
    if device.type == "cuda":
        result["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    print(f"gpu_check on {result['device']}, {now:%Y-%m-%d %H:%M} UTC, scale {scale}, "
          f"budget {a.budget_s:.0f} s", flush=True)

    if "pipeline" in a.skip:
        result["skipped"].append({"item": "pipeline", "reason": "--skip pipeline"})
    else:
        timeout = max(0.0, min(PIPELINE_SHARE * budget.total, budget.left()))
        if timeout < 30:
            result["skipped"].append({"item": "pipeline", "reason": "time budget spent"})
        else:
            result["running"] = "pipeline"
            result["pipeline"] = run_pipeline(device, timeout)
            pl = result["pipeline"]
            common.print_table(pl["stages"], ["stage", "done", "seconds", "gpu_mib", "on_gpu"],
                               f"(a) smoke pipeline on {a.device}: exit {pl['rc']}, "
                               f"{pl['wall_s']:.0f} s{' (cut off at the budget)' if pl['timed_out'] else ''}"
                               f"; GPU use from {pl['gpu_watch']}")
            for line in pl["log_tail"]:
                print(f"  | {line}")

    if "steps" in a.skip:
        result["skipped"].append({"item": "steps", "reason": "--skip steps"})
        if "cascade" not in a.skip:
            result["skipped"].append({"item": "cascade", "reason": "needs the steps section's models"})
    else:
        run_models(cfg, device, budget, a.steps, a.sample_steps, "cascade" not in a.skip, result)
        steps, cascade = result["steps"], result["cascade"]
        if "cascade" in a.skip:
            result["skipped"].append({"item": "cascade", "reason": "--skip cascade"})
        common.print_table(steps, ["stage", "model", "params", "batch", "step_s", "samples_per_s",
                                   "gflop_per_sample", "tflops", "mfu", "peak_mem_gb"],
                           f"(b) one bf16 training step per model, {scale} sizes (AdamW + EMA; MFU "
                           f"against {steps[0]['peak_source'] if steps else '-'})")
        common.print_table(cascade, ["model", "stage", "steps", "seconds", "per_step_s", "configured",
                                     "configured_s_est"],
                           f"(c) cascade latency, one caption, random weights, {scale} sizes "
                           "(DDIM; the configured step counts extrapolated)")
    for s in result["skipped"]:
        print(f"skipped {s['item']}: {s['reason']}")
    timer.cancel()
    result.pop("running", None)
    result["total_s"] = budget.spent()
    path = common.write_result("gpu_check", result, out)
    print(f"wrote {path} ({budget.spent():.0f} s of {budget.total:.0f})")
    failed = [s for s in result["skipped"] if s["reason"].startswith("failed")]
    pipeline_failed = "pipeline" in result and result["pipeline"]["rc"] != 0 and \
        not result["pipeline"]["timed_out"]
    return 1 if failed or pipeline_failed else 0


if __name__ == "__main__":
    sys.exit(main())
