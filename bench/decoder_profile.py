"""Where the tiny decoder's training step spends its time on the CPU, and what raises its achieved
FLOP/s against this machine's measured float32 matmul peak.

    .venv/bin/python -m bench.decoder_profile [--quick] [--threads 1] [--out PATH] [--skip-compile]

The step is the decoder stage's, as bench.training does it (bench.models.Stepper: the stage's
hybrid diffusion loss with guidance dropouts, backward, gradient clipping, make_optimizer's AdamW,
EMA) on the decoder at the tiny preset's sizes. Variants, each built from the same initial
weights and batch:

* ``baseline``: the step as the training stage runs it;
* ``no_sdpa``: attention through diffusers' plain processor (bmm + softmax) instead of
  ``F.scaled_dot_product_attention``: what the fused attention gives;
* ``channels_last``: model and inputs in channels_last memory format;
* ``fused_optim``: AdamW with ``fused=True`` (``foreach`` where the CPU build has no fused
  kernel), foreach gradient clipping and a foreach EMA update (``torch._foreach_lerp_``);
* ``compile``: ``torch.compile`` of the model (the loss stays eager); its cold compile time (a
  fresh inductor cache, first step) is reported separately; skipped with its reason if it fails;
* ``all``: channels_last + fused_optim + compile together (without compile when it is skipped).

The variants are timed interleaved: every round runs each variant once, in a rotated order, so the
machine's load hits all of them alike; a variant's speed-up is the median over rounds of
baseline seconds / variant seconds within the same round. Times are CPU seconds per thread (a
shared machine's wall time includes waiting for a core), FLOPs are the baseline's forward +
backward as torch's FlopCounterMode counts them (convolutions and matmuls; the CPU's fused
attention kernel is not counted), the same work for every variant.

A torch.profiler trace of the baseline step then splits its time by op category (self CPU time
of each op; the optimizer's and EMA's ops count as ``optimizer+EMA`` whatever they are; Python
and autograd-engine overhead is ``other``), and gives the convolutions' and matmuls' own fraction
of the peak. ``--quick``: 2 rounds, 1 profiled step, no compile (which takes minutes cold).
Benchmarks report; they never assert speeds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from bench import common
from bench import models as M
from unclip.training.loop import LoopConfig, make_optimizer

NAME = "decoder_profile"

VARIANTS = {
    "baseline": "the training stage's step",
    "no_sdpa": "attention without SDPA (diffusers' bmm + softmax processor)",
    "channels_last": "channels_last model and inputs",
    "fused_optim": "fused AdamW + foreach grad clip + foreach EMA",
    "compile": "torch.compile(model)",
    "all": "channels_last + fused_optim + compile",
}

# profile categories, in table order
CATEGORIES = ("conv forward", "conv backward", "matmul/linear", "attention (SDPA kernel)",
              "elementwise", "copies", "group norm", "SiLU", "pooling/upsampling", "optimizer+EMA",
              "other")
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot"}
_COPIES = {"copy_", "to", "_to_copy", "contiguous", "clone", "cat", "_copy_from",
           "_copy_from_and_resize", "constant_pad_nd", "pad"}
_ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "pow", "pow_",
    "sqrt", "rsqrt", "exp", "exp_", "log", "log_", "sin", "cos", "tanh", "tanh_", "sigmoid",
    "where", "clamp", "clamp_", "clamp_min", "clamp_max", "abs", "sign", "lerp", "lerp_", "fill_",
    "zero_", "masked_fill", "masked_fill_", "gt", "lt", "ge", "le", "eq", "ne", "logical_not",
    "bitwise_not", "addcmul", "addcmul_", "addcdiv", "addcdiv_", "reciprocal", "square", "erf",
    "expm1", "log1p", "softplus", "gelu", "gelu_backward", "sigmoid_backward", "tanh_backward",
    "pow_backward", "sum", "mean", "cumsum", "argmax", "amax", "max", "min", "linalg_vector_norm",
    "norm", "_softmax", "softmax", "_softmax_backward_data", "_log_softmax", "normal_", "uniform_",
    "random_", "bernoulli_", "nan_to_num", "isfinite", "logical_and", "logical_or", "_local_scalar_dense",
}
# the step's own ranges (record_function): the optimizer's and EMA's ops go to optimizer+EMA
_OPT_RANGES = ("optimizer", "ema")
STEP_RANGE = "decoder_step"


# ---- variants --------------------------------------------------------------------------------


class VariantStep(M.Stepper):
    """bench.models.Stepper's step (forward + loss + backward, clipping, AdamW, EMA) with the
    optimizer part and the EMA update in named profiler ranges; ``foreach`` clips with the
    foreach norm and updates the EMA with one foreach lerp."""

    def __init__(self, *args: Any, foreach: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.foreach = foreach
        self.params = list(self.model.parameters())
        self.ema_params = list(self.ema.model.parameters())
        self.buffers, self.ema_buffers = list(self.model.buffers()), list(self.ema.model.buffers())

    def __call__(self) -> float:
        loss = self.forward_backward()
        with torch.profiler.record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip,
                                           foreach=True if self.foreach else None)
            self.opt.step()
        with torch.profiler.record_function("ema"):
            if self.foreach:
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema.decay)
                    if self.buffers:
                        torch._foreach_copy_(self.ema_buffers, self.buffers)
            else:
                self.ema.update(self.model)
        return float(loss.detach())


def fused_adamw(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    """make_optimizer's AdamW (same groups and hyper-parameters) with the fused kernel, or the
    foreach one where this build has no fused CPU AdamW."""
    base = make_optimizer(model, cfg)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in base.param_groups]
    d = base.defaults
    try:
        return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], foreach=True)


def build(variant: str, s: M.Sizes, batch: int, compiled: bool) -> VariantStep:
    """One variant's step: the same initial weights (seed 0) and batch for every variant."""
    torch.manual_seed(0)
    model = M.make_decoder(s)
    g = torch.Generator().manual_seed(0)
    b = M.decoder_batch(s, batch, g)
    channels_last = variant in ("channels_last", "all")
    fused = variant in ("fused_optim", "all")
    if variant == "no_sdpa":
        from diffusers.models.attention_processor import AttnAddedKVProcessor

        model.unet.set_attn_processor(AttnAddedKVProcessor())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        b = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
             for k, v in b.items()}
    step = VariantStep(model, M.decoder_loss(g), b, foreach=fused,
                       optimizer=fused_adamw if fused else make_optimizer)
    if compiled:
        step.model = torch.compile(step.model)  # optimizer and EMA hold the same parameters
    return step


class _FreshInductorCache:
    """A temporary inductor cache for this run, so the compile time measured is a cold one."""

    def __enter__(self) -> "_FreshInductorCache":
        self.old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        self.dir = tempfile.mkdtemp(prefix="decoder_profile_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.dir
        _clear_inductor_caches()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.old
        shutil.rmtree(self.dir, ignore_errors=True)


def _clear_inductor_caches() -> None:
    try:
        from torch._inductor.utils import clear_caches

        clear_caches()
    except Exception:  # noqa: BLE001 - a private helper; a warm in-memory cache only shortens compile
        pass


def _dynamo_stat(key: str) -> int:
    """A counter of torch._dynamo (graphs compiled so far); 0 where it is not there."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"][key])
    except Exception:  # noqa: BLE001 - informational only
        return 0


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---- timing ----------------------------------------------------------------------------------


def time_interleaved(steps: dict[str, VariantStep], rounds: int, threads: int) -> dict[str, dict[str, Any]]:
    """``rounds`` rounds, each running every step once (order rotated by one each round); per
    variant its CPU seconds (per thread) and wall seconds of each round. A variant that raises
    is dropped with its reason."""
    names = list(steps)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    failed: dict[str, str] = {}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if n in failed:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                steps[n]()
            except Exception as exc:  # noqa: BLE001 - report the variant, keep the others
                failed[n] = _one_line(exc)
                continue
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append((time.process_time() - c0) / threads)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {cpu[n][-1]:.3f}" for n in names
                                                         if n not in failed and len(cpu[n]) > r)
              + " (CPU s)", flush=True)
    return {n: ({"failed": failed[n]} if n in failed else {"cpu": cpu[n], "wall": wall[n]})
            for n in names}


# ---- profile ---------------------------------------------------------------------------------


def categorize(op: str) -> str:
    """The profile category of an op by its name (``aten::...``); not under the optimizer."""
    name = op.split("::", 1)[1] if op.startswith("aten::") else None
    if name is None:
        return "other"  # our ranges, autograd-engine wrappers, Python-side overhead
    if "conv" in name:
        return "conv backward" if "backward" in name else "conv forward"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention (SDPA kernel)"
    if name in _MATMUL:
        return "matmul/linear"
    if "group_norm" in name:
        return "group norm"
    if name.startswith("silu"):
        return "SiLU"
    if "pool" in name or "upsample" in name or "interpolate" in name:
        return "pooling/upsampling"
    if name in _COPIES:
        return "copies"
    if name in _ELEMENTWISE or name.startswith("_foreach_"):
        return "elementwise"
    return "other"


def profile_step(step: VariantStep, steps: int, threads: int) -> dict[str, Any]:
    """Self CPU time by category over ``steps`` profiled steps (per step). The profiler clocks
    wall time; ``cpu_ms`` rescales each category to the process's CPU time over the same steps
    (per thread), the clock the rest of the benchmark uses."""
    from torch.profiler import ProfilerActivity, profile, record_function

    c0 = time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                step()
    cpu_s = (time.process_time() - c0) / threads / steps
    us = {c: 0.0 for c in CATEGORIES}
    calls = {c: 0 for c in CATEGORIES}
    copy_calls = copy_calls_model = 0
    total = 0.0
    where: dict[int, tuple[bool, bool]] = {}  # event id -> (in a step, in optimizer/EMA)

    def place(e: Any) -> tuple[bool, bool]:
        if e.id not in where:
            up = place(e.cpu_parent) if e.cpu_parent is not None else (False, False)
            where[e.id] = (up[0] or e.name == STEP_RANGE, up[1] or e.name in _OPT_RANGES)
        return where[e.id]

    for e in prof.events():
        in_step, in_opt = place(e)
        if not in_step:
            continue  # the profiler's own bookkeeping
        cat = "optimizer+EMA" if in_opt else categorize(e.name)
        us[cat] += e.self_cpu_time_total
        calls[cat] += 1
        total += e.self_cpu_time_total
        if e.name == "aten::copy_":
            copy_calls += 1
            copy_calls_model += cat != "optimizer+EMA"
    wall_ms = total / 1000 / steps
    rows = [{"category": c, "wall_ms": us[c] / 1000 / steps,
             "cpu_ms": us[c] / total * cpu_s * 1000 if total else 0.0,
             "share": us[c] / total if total else 0.0, "op_calls": calls[c] // steps}
            for c in CATEGORIES]
    return {"steps": steps, "wall_ms_per_step": wall_ms, "cpu_s_per_step": cpu_s, "rows": rows,
            "copy_calls_per_step": copy_calls // steps,
            "copy_calls_per_step_outside_optimizer": copy_calls_model // steps}


def flops_by_kind(step: VariantStep) -> dict[str, float]:
    """Forward + backward FLOPs per op kind (conv forward, conv backward, matmul, attention): torch's
    counter with the CPU attention kernels it has no formula for added, as bench.common counts."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=common.cpu_attention_flops()) as fc:
        step.forward_backward()
    by_op = {str(k).split(".")[-1]: float(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    out = {"conv forward": 0.0, "conv backward": 0.0, "matmul/linear": 0.0, "attention": 0.0,
           "other": 0.0}
    for op, f in by_op.items():
        if "convolution_backward" in op:
            out["conv backward"] += f
        elif "convolution" in op:
            out["conv forward"] += f
        elif op in _MATMUL:
            out["matmul/linear"] += f
        elif "attention" in op:
            out["attention"] += f
        else:
            out["other"] += f
    out["total"] = float(fc.get_total_flops())
    out["by_op"] = by_op  # type: ignore[assignment]
    return out


def compute_fractions(prof: dict[str, Any], flops: dict[str, float], peak: float) -> list[dict[str, Any]]:
    """FLOPs / CPU time / peak of the convolutions and matmuls (their own, from the profile)."""
    cpu = {r["category"]: r["cpu_ms"] / 1000 for r in prof["rows"]}
    share = {r["category"]: r["share"] for r in prof["rows"]}
    for d in (cpu, share):  # the profile's category name for the FLOP counter's "attention"
        d["attention"] = d.get("attention (SDPA kernel)", 0.0)
    kinds = [("conv forward", ["conv forward"]), ("conv backward", ["conv backward"]),
             ("matmul/linear", ["matmul/linear"]), ("attention (SDPA)", ["attention"]),
             ("conv + matmul + attention", ["conv forward", "conv backward", "matmul/linear", "attention"])]
    out = []
    for name, cats in kinds:
        f = sum(flops[c] for c in cats)
        t = sum(cpu[c] for c in cats)
        out.append({"kind": name, "gflop": f / 1e9, "cpu_ms": t * 1000,
                    "share": sum(share[c] for c in cats),
                    "achieved_gflops": f / t / 1e9 if t else float("nan"),
                    "fraction_of_peak": f / t / 1e9 / peak if t else float("nan")})
    return out


# ---- run -------------------------------------------------------------------------------------


def run(quick: bool = False, threads: int = 1, out: str | None = None, skip_compile: bool = False,
        sizes: M.Sizes | None = None, peak_n: int = 2048) -> dict[str, Any]:
    """Measure every variant and profile the baseline; write and return the JSON. ``sizes``: the
    model and batch (default the tiny preset's; the tests pass a smaller decoder), ``peak_n``: the
    side of the matmul the peak is measured on."""
    common.set_threads(threads)
    s = sizes or M.tiny_sizes()
    batch = s.decoder_batch
    rounds, prof_steps = (2, 1) if quick else (5, 3)
    info = common.machine(threads)
    t_start = time.perf_counter()
    peak = common.matmul_peak_gflops(threads, "cpu", n=peak_n)
    print(f"matmul peak {peak:.1f} GFLOP/s (torch {threads} thread(s)); load average "
          f"{info['load_average_1min']}", flush=True)

    compile_skip = ("--quick (a cold compile takes minutes)" if quick else
                    "--skip-compile" if skip_compile else None)
    steps: dict[str, VariantStep] = {}
    notes: dict[str, dict[str, Any]] = {}
    cache = _FreshInductorCache() if compile_skip is None else None
    if cache:
        cache.__enter__()
    try:
        for v in VARIANTS:
            compiled = v in ("compile", "all") and compile_skip is None
            if v == "compile" and compile_skip is not None:
                notes[v] = {"skipped": compile_skip}
                continue
            note: dict[str, Any] = {"compiled": compiled}
            if v == "all" and not compiled:
                note["compile_skipped"] = compile_skip
            try:
                step = build(v, s, batch, compiled)
                if v in ("fused_optim", "all"):
                    note["optimizer"] = "fused" if step.opt.defaults.get("fused") else "foreach"
                graphs0 = _dynamo_stat("unique_graphs")
                t0, c0 = time.perf_counter(), time.process_time()
                step()  # warm-up; with compile the cold compile of forward and backward
                first_wall, first_cpu = time.perf_counter() - t0, time.process_time() - c0
                if compiled:
                    note.update(compile_s=first_wall, compile_cpu_s=first_cpu,
                                graphs=_dynamo_stat("unique_graphs") - graphs0)
                    print(f"  {v}: first (compiling) step {first_wall:.1f} s wall", flush=True)
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported
                if v == "all" and compiled:
                    # all without compile still says what the other two give together
                    print(f"  all: compile failed ({_one_line(exc)}); measured without it", flush=True)
                    step = build(v, s, batch, False)
                    step()
                    note = {"compiled": False, "compile_failed": _one_line(exc),
                            "optimizer": "fused" if step.opt.defaults.get("fused") else "foreach"}
                else:
                    notes[v] = {"skipped": _one_line(exc)}
                    print(f"  {v}: skipped ({notes[v]['skipped']})", flush=True)
                    if v == "compile":  # 'all' would fail the same way, minutes later
                        compile_skip = f"compile failed: {notes[v]['skipped']}"
                    continue
            steps[v] = step
            notes[v] = note
        print(f"timing {len(steps)} variants interleaved, {rounds} rounds", flush=True)
        times = time_interleaved(steps, rounds, threads)
    finally:
        if cache:
            cache.__exit__(None, None, None)

    flops = flops_by_kind(steps["baseline"])
    total_flops = flops["total"]
    base = times["baseline"]
    rows = []
    for v, what in VARIANTS.items():
        row: dict[str, Any] = {"variant": v, "what": what}
        if v == "all" and not notes.get(v, {}).get("compiled", False):
            row["what"] = "channels_last + fused_optim (compile skipped)"
        row.update({k: x for k, x in notes.get(v, {}).items()})
        t = times.get(v)
        if t is None or "failed" in t:
            if t is not None:
                row["skipped"] = t["failed"]
            rows.append(row)
            continue
        sec = statistics.median(t["cpu"])
        ratios = [b / x for b, x in zip(base["cpu"], t["cpu"])]  # same round
        row.update({"step_s": sec, "wall_step_s": statistics.median(t["wall"]),
                    "min_s": min(t["cpu"]), "max_s": max(t["cpu"]),
                    "speedup": statistics.median(ratios), "speedup_min": min(ratios),
                    "speedup_max": max(ratios), "achieved_gflops": total_flops / sec / 1e9,
                    "fraction_of_peak": total_flops / sec / 1e9 / peak, "round_cpu_s": t["cpu"]})
        rows.append(row)

    print(f"profiling the baseline step ({prof_steps} step(s))", flush=True)
    prof = profile_step(steps["baseline"], prof_steps, threads)

    result = {
        "name": NAME, "quick": quick, "machine": info, "device": "cpu",
        "load_average_1min_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "seconds": time.perf_counter() - t_start, "matmul_peak_gflops": peak, "peak_n": peak_n,
        "model": {"decoder": s.decoder, "batch": batch, "params": M.params(steps["baseline"].model),
                  "diffusion": s.decoder_diffusion},
        "gflop_per_step": total_flops / 1e9,
        "flops_by_kind_gflop": {k: v / 1e9 for k, v in flops.items() if k != "by_op"},
        "flops_by_op": flops["by_op"], "rounds": rounds, "rows": rows, "profile": prof,
        "conv_matmul": {"rows": compute_fractions(prof, flops, peak)},
    }
    _print(result)
    path = common.write_result(NAME, result, out)
    print(f"wrote {path}")
    return result


def _print(r: dict[str, Any]) -> None:
    m = r["model"]
    common.print_table(
        r["rows"], ["variant", "step_s", "wall_step_s", "speedup", "speedup_min", "speedup_max",
                    "achieved_gflops", "fraction_of_peak", "compile_s", "skipped"],
        f"decoder training step, tiny sizes (batch {m['batch']}, {m['params']:,} params; "
        f"{r['gflop_per_step']:.2f} GFLOP/step; matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s; "
        f"torch {r['machine']['torch_threads']} thread(s); CPU s per step, {r['rounds']} interleaved "
        f"rounds; speed-up = baseline s / variant s, median of rounds)")
    p = r["profile"]
    common.print_table(
        p["rows"], ["category", "cpu_ms", "wall_ms", "share", "op_calls"],
        f"baseline step by op category (torch.profiler self time, {p['steps']} step(s); "
        f"{p['cpu_s_per_step']:.3f} CPU s/step; {p['copy_calls_per_step']} copy_ calls/step, "
        f"{p['copy_calls_per_step_outside_optimizer']} outside optimizer+EMA)")
    common.print_table(r["conv_matmul"]["rows"], ["kind", "gflop", "cpu_ms", "share", "achieved_gflops",
                                          "fraction_of_peak"],
                       "convolutions and matmuls: their FLOPs / their CPU time / matmul peak")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="variants (timed interleaved, CPU s per step, speed-up vs baseline):\n"
               + "".join(f"  {k:14s} {v}\n" for k, v in VARIANTS.items())
               + "\nfull mode: 5 rounds, 3 profiled steps, two cold torch.compile runs (several\n"
                 "minutes each on 2 cores; --skip-compile leaves them out)\n"
                 "--quick: 2 rounds, 1 profiled step, no compile (about a minute)\n"
                 "writes bench/results/decoder_profile.json (--out for another path)")
    common.add_common_args(p)
    p.add_argument("--skip-compile", action="store_true",
                   help="leave torch.compile out (compile is reported skipped; 'all' = "
                        "channels_last + fused_optim); --quick always skips it")
    a = p.parse_args(argv)
    run(a.quick, a.threads, a.out, a.skip_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
