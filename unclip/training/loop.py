"""The step loop every training stage trains with (CLIP, the priors, the decoder, the upsamplers):
AMP, grad clipping, optional EMA, non-finite guard, periodic evaluation and checkpoints, and the one
resume rule (:func:`train`). Framework-free: Ray Train enters through ``Session``
(``stages.training.train_worker`` builds everything around it in a worker).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch

from unclip.devices import model_device
from unclip.options import option, validate
from unclip.training.parallel import DataParallelProbe, wait_for_main
from unclip.training.sharding import full_tensor
from unclip.training.state import EMA, unwrap

log = logging.getLogger("unclip")


LR_SCHEDULES = ("constant", "cosine")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class LoopConfig:
    total_steps: int = option(1000, ge=1)
    lr: float = option(1e-4, gt=0)
    warmup_steps: int = option(100, ge=0)
    lr_schedule: str = option("constant", choices=LR_SCHEDULES)  # cosine: decay after warm-up
    weight_decay: float = option(0.0, ge=0)
    grad_clip: float = option(1.0, gt=0)
    ema_decay: float = option(0.999, ge=0, le=1)
    log_every: int = option(20, ge=1)
    checkpoint_every: int = option(200, ge=1)  # steps between resumable checkpoints (every rank reports)
    eval_every: int = option(0, ge=0)          # steps between evaluations on rank 0 (0: only at the end)
    max_nonfinite_steps: int = option(20, ge=1)  # consecutive skipped steps before a clear stop
    # auto (bf16/fp16 on CUDA, off on CPU) | bf16 (CPU too) | fp16 | off
    amp: str = option("auto", choices=AMP_MODES)

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoopConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in known})


class Session(Protocol):
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None: ...
    def report(self, metrics: dict[str, float], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None, ema: EMA | None, meta: dict[str, Any],
               checkpoint: bool = True) -> None: ...


class NonFiniteLossError(RuntimeError):
    pass


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA; no weight decay on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=eps, fused=fused or None)


def lr_at(step: int, cfg: LoopConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX-512 BF16 or AMX); elsewhere it is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(device: torch.device, amp: str):
    """Mixed precision where the device supports it. On CPU only when asked for (``bf16``): CPUs
    with AVX-512 BF16 or AMX run the convolutions faster in it (1.2x on the tiny decoder), others
    emulate it (14x slower on an AVX2 EPYC), so ``auto`` stays in float32 on every CPU."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")
    if device.type == "cpu" and amp == "bf16":
        if not cpu_has_native_bf16():
            log.warning("amp=bf16 on a CPU without native bfloat16 (no AVX-512 BF16 / AMX): it is "
                        "emulated and many times slower than float32; use amp=auto or amp=off")
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    if amp == "off" or device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()) \
        else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def resume_position(meta: Mapping[str, Any] | None) -> tuple[int, int, int]:
    """(step, epoch, batches of that epoch already consumed) to continue from a restored checkpoint's
    meta: the resume rule of every training stage (:func:`train`). ``{}`` or None: a fresh start.
    A checkpoint written before the rule (no ``batch``) continues at the next epoch boundary."""
    meta = meta or {}
    step = int(meta.get("step", 0))
    if "batch" in meta:
        return step, int(meta.get("epoch", 0)), int(meta["batch"])
    return step, int(meta.get("epoch", -1)) + 1 if "epoch" in meta else 0, 0


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a step's random draws on one rank: a function of (seed, rank, step) alone, so a
    resumed run draws what the uninterrupted one drew at that step."""
    import numpy as np

    return int(np.random.SeedSequence([seed & (2**64 - 1), rank, step]).generate_state(1, np.uint64)[0] >> 1)


def train(session: Session, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          ema: EMA | None, batches: Callable[[int], Iterable[Any]],
          step_loss: Callable[[torch.nn.Module, Any], dict], cfg: LoopConfig,
          resume: Mapping[str, Any] | None = None,
          evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
          fault: Mapping[str, Any] | None = None,
          generator: torch.Generator | None = None, seed: int = 0,
          after_step: Callable[[torch.nn.Module], None] | None = None) -> dict[str, float]:
    """Train until ``cfg.total_steps``; returns the final metrics (with the last evaluation).

    ``batches(epoch)`` yields one epoch of batches; ``step_loss(model, batch)`` returns a dict with
    a scalar ``loss`` (and any other scalars to log); ``after_step(model)`` runs after each
    optimizer step (e.g. CLIP's logit-scale clamp). ``ema`` None: no EMA, and evaluation sees the
    trained model itself (unsharded models only).

    Resume rule, one for every stage: a checkpoint records (step, epoch, batches of that epoch
    consumed, skipped ones included); ``resume`` (its meta) continues at that step, in that epoch,
    after those batches. Every step's random draws (torch's default generator and ``generator``)
    are seeded from (``seed``, rank, step) alone (:func:`step_seed`), so where ``batches(epoch)``
    is deterministic per epoch a resumed run trains on the same batches with the same noise as an
    uninterrupted one and ends with the same weights. Ranks resume from rank 0's position: they hold
    equal data shards (Ray Train splits its datasets equally), so they consumed the same batches.

    A non-finite loss or gradient skips the step on every rank alike (gradients are all-reduced,
    or reduce-scattered and the norm all-reduced under FSDP, so all ranks see the same norm); too
    many in a row stop training with a clear error, the last checkpoint kept. Evaluation runs on
    rank 0 under the training autocast while the other ranks wait at a barrier bounded by
    ``session.collective_timeout_s`` (a sharded EMA is first gathered into a plain module on rank
    0, every rank taking part). ``generator`` (the one ``step_loss`` draws noise from) feeds the
    data-parallel probe's ``dp_*`` metrics (:mod:`unclip.training.parallel`).
    """
    from unclip.training.sharding import is_sharded

    if ema is None and evaluate is not None and is_sharded(model):
        raise ValueError("evaluating a sharded model needs an EMA (gathered on rank 0)")
    device = model_device(model)
    autocast, scaler = autocast_for(device, cfg.amp)
    start_step, epoch, skip = resume_position(resume)
    step, bad, consumed = start_step, 0, 0
    rank = int(getattr(session, "rank", 0))
    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    count = 0
    probe = DataParallelProbe()
    timeout_s = float(getattr(session, "collective_timeout_s", 1800.0))

    def evaluated_model():
        return ema.gathered() if ema is not None else nullcontext(unwrap(model))

    def run_evaluation() -> dict[str, float]:
        out: dict[str, float] = {}
        with evaluated_model() as eval_model:  # a sharded EMA: gathered on rank 0
            if session.is_main:
                with autocast:
                    out = evaluate(eval_model, step)
            del eval_model  # a gathered copy is freed before training goes on
        model.train()  # an evaluation of the model itself may have left it in eval mode
        return out

    model.train()
    while step < cfg.total_steps:
        consumed = 0
        for batch in itertools.islice(batches(epoch), skip, None):
            if step >= cfg.total_steps:
                break
            consumed += 1
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, cfg)
            torch.manual_seed(step_seed(seed, rank, step))
            if generator is not None:
                generator.manual_seed(step_seed(seed, rank, step) + 1)
            probe.before_first_step(batch, generator)
            with autocast:
                out = step_loss(model, batch)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if not (torch.isfinite(loss) and torch.isfinite(norm)):
                bad += 1
                optimizer.zero_grad(set_to_none=True)
                if scaler:
                    scaler.update()
                if session.is_main:
                    log.warning("non-finite loss or gradients at step %d: step skipped (%d in a row, "
                                "stopping at %d)", step + 1, bad, cfg.max_nonfinite_steps)
                    session.progress(step, cfg.total_steps, {"skipped_nonfinite": float(bad)})
                if bad >= cfg.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"loss or gradients were non-finite for {bad} consecutive steps at step "
                        f"{step}; stopping. The last checkpoint is kept: lower the learning rate "
                        f"or check the data, then re-run to resume.")
                continue
            bad = 0
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if after_step is not None:
                after_step(unwrap(model))
            if ema is not None:
                ema.update(unwrap(model))
            probe.after_first_step(unwrap(model))
            step += 1
            count += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            if fault and step == int(fault.get("kill_at_step", -1)):
                _kill_once(step, str(fault["marker"]))
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                metrics = {f"train_{k}": v / max(1, count) for k, v in sums.items()}
                metrics["lr"] = optimizer.param_groups[0]["lr"]
                session.log(metrics, step)
                session.progress(step, cfg.total_steps, metrics)
                sums, count = {}, 0
            evaluated = {}
            if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 \
                    and step != cfg.total_steps:
                evaluated = run_evaluation()
                if session.is_main:
                    session.log(evaluated, step)
                wait_for_main(timeout_s, "evaluation")
            if step % cfg.checkpoint_every == 0 and step != cfg.total_steps:
                session.report({**metrics, **evaluated, **probe.metrics, "step": step}, model,
                               optimizer, ema, {"step": step, "epoch": epoch, "batch": skip + consumed})
        if step < cfg.total_steps:
            if skip == 0 and consumed == 0:
                raise ValueError(f"epoch {epoch} gave no batch: too little data for one batch")
            epoch, skip = epoch + 1, 0
    final = {**metrics, "resumed_from_step": float(start_step),
             **probe.at_end(unwrap(model), None if ema is None else ema.model)}
    if evaluate is not None:
        final.update(run_evaluation())
        if session.is_main:
            session.log({k: v for k, v in final.items() if not k.startswith("train_")}, step)
            session.progress(step, cfg.total_steps, final)
        wait_for_main(timeout_s, "final evaluation")
    session.report({**final, "step": step}, model, optimizer, ema,
                   {"step": step, "epoch": epoch, "batch": skip + consumed})
    return final


def _kill_once(step: int, marker: str) -> None:
    """Fault injection for tests: the first worker to reach ``step`` dies like a killed process;
    the marker file makes it fire once, so the restarted worker carries on."""
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(str(step))
    os._exit(137)
