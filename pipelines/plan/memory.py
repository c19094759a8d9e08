"""The memory plan: activation memory per sample, the per-GPU batch that fits, GPU-hours.

For every model a stage trains, its step is measured on fake tensors (:mod:`pipelines.plan
.activations`) at two small batches and extrapolated linearly; with the static memory of
:meth:`pipelines.plan.Row.memory` that gives the largest per-GPU batch that fits one GPU of
:data:`GPU_BYTES` with DDP and with FSDP, with and without activation checkpointing, and with the
step's FLOPs the GPU-hours to the configured and to the paper's iteration counts.

The rules, stated once (they are printed with the table):

* usable memory: :data:`GPU_BYTES` less :data:`HEADROOM` (the caching allocator's fragmentation,
  cuDNN / attention workspaces, NCCL buffers: none of which the fake-tensor count sees) and
  :data:`CUDA_CONTEXT`;
* DDP: fp32 weights, gradients, AdamW's two moments and the EMA copy (20 bytes per parameter) plus
  DDP's gradient buckets (4 more: Ray's ``prepare_model`` leaves ``gradient_as_bucket_view`` off),
  the frozen CLIP's fp32 weights, then the step's measured peak under bf16 autocast (which holds a
  bf16 copy of every weight from forward to backward: the measured fixed part);
* FSDP (FULL_SHARD over the stage's workers, ``MixedPrecision(param_dtype=bfloat16)``, one unit
  per UNet down / mid / up block or transformer Block): the 20 bytes per parameter sharded, the
  frozen CLIP whole, two units' gathered bf16 parameters (the one running and the one prefetched)
  and one unit's unsharded fp32 gradient before its reduce-scatter (8 bytes per parameter of the
  largest unit), and the measured peak without autocast's weight copies (FSDP frees each unit's
  gathered parameters after its forward and gathers them again for its backward);
* GPU-hours: the step's counted FLOPs per sample (forward + backward, the frozen CLIP text tower's
  forward included; with checkpointing, its recomputed forward too) x global batch x iterations at
  :data:`MFU` of :data:`PEAK_FLOPS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from pipelines.plan import activations

if TYPE_CHECKING:
    from pipelines.plan import Plan, Row

GPU_BYTES = 80e9              # an 80 GB A100 / H100
HEADROOM = 0.10               # of GPU_BYTES, for what the measurement does not see
CUDA_CONTEXT = 2e9            # CUDA context, cuBLAS / cuDNN handles, NCCL communicators
PEAK_FLOPS = 989e12           # H100 SXM, dense bf16 tensor cores
PEAK_NAME = "H100 SXM dense bf16, 989 TFLOP/s"
MFU = 0.40                    # stated, not measured: no GPU has run these models yet
# Bytes per parameter (fp32 training state; see the module docstring).
STATE = 20                    # weights 4 + grads 4 + AdamW 8 + EMA 4
DDP_BUCKETS = 4
FSDP_UNIT = 8                 # 2 x bf16 gathered (running + prefetched) + fp32 unsharded gradient
# Table 3's iterations (Ramesh et al. 2022), by the plan's PAPER_PARAMS keys.
PAPER_ITERATIONS: dict[str, int] = {"prior/autoregressive": 1_000_000, "prior/diffusion": 600_000,
                                    "decoder": 800_000, "upsample1": 1_000_000,
                                    "upsample2": 1_000_000}
GB = 1e9


@dataclass(frozen=True)
class Fit:
    """The largest per-GPU batch that fits, or why none does."""

    batch: int
    static: float      # bytes before the step's batch-dependent part (state + fixed activations)
    per_sample: float

    def cell(self) -> str:
        if self.batch >= 1:
            return str(self.batch)
        return (f"does not fit ({self.static / GB:.1f} GB + {self.per_sample / GB:.2f} GB/sample "
                f"> {usable() / GB:.1f} GB)")


@dataclass(frozen=True)
class MemoryRow:
    """The memory plan of one trained model."""

    row: "Row"
    measured: activations.Measured | None
    reason: str = ""            # why it is not planned, when measured is None
    units: tuple[int, ...] = ()

    # ---- static memory per GPU ----------------------------------------------------------------

    @property
    def params(self) -> int:
        return self.row.built.params

    def ddp_state(self) -> float:
        return (STATE + DDP_BUCKETS) * self.params + self.row.memory()["frozen"]

    def fsdp_state(self) -> float:
        workers = max(1, self.row.workers)
        return STATE * self.params / workers + self.row.memory()["frozen"] + FSDP_UNIT * max(self.units)

    # ---- what fits ----------------------------------------------------------------------------

    def fit(self, parallel: str, kind: str = "bf16") -> Fit:
        """Largest per-GPU batch for ``parallel`` ("ddp" | "fsdp") with activations of ``kind``."""
        assert self.measured is not None
        copies = parallel == "ddp"  # FSDP's bf16 parameters replace autocast's weight copies
        state = self.ddp_state() if copies else self.fsdp_state()
        static = state + max(0.0, self.measured.fixed(kind, copies=copies))
        per = self.measured.per_sample(kind, copies=copies)
        return Fit(max(0, int((usable() - static) // per)), static, per)

    # ---- compute ------------------------------------------------------------------------------

    def gpu_hours(self, iterations: int, checkpoint: bool = False, mfu: float = MFU) -> float:
        assert self.measured is not None
        flops = self.measured.flops_ckpt if checkpoint else self.measured.flops
        return flops * self.row.batch * self.row.workers * iterations / (mfu * PEAK_FLOPS) / 3600


def usable() -> float:
    """Bytes of one GPU a step may use."""
    return GPU_BYTES * (1 - HEADROOM) - CUDA_CONTEXT


# Measurements by (stage, model name, model, frozen CLIP, stage config): `plan` and the tests size
# the same preset more than once in a process, and a paper-size measurement takes seconds.
_MEASURED: dict[tuple[str, ...], activations.Measured] = {}


def plan_memory(plan: "Plan", cfg: DictConfig, clip: torch.nn.Module | None) -> list[MemoryRow]:
    """The memory plan of every trained row of ``plan`` (models on meta, as make_plan built them).

    ``clip``: the frozen CLIP model (meta) whose text tower the prior and decoder steps run."""
    out = []
    for r in plan.rows:
        b = r.built
        if b.stage == "clip":
            if b.trained:  # the clip stage's contrastive loss has (B x B) logits
                out.append(MemoryRow(r, None, "not planned: the contrastive loss's memory grows "
                                              "with the square of the batch"))
            continue
        key = (b.stage, b.name, repr(b.module), repr(clip), str(cfg[b.stage]), str(cfg.clip))
        if key not in _MEASURED:
            probe = activations.probe_for(b.stage, b.name, b.module, cfg, clip)
            try:
                _MEASURED[key] = activations.measure(probe)
            except (RuntimeError, ValueError) as exc:  # the stage's own step would fail the same way
                msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                out.append(MemoryRow(r, None, f"not planned: its training step fails ({msg})"))
                continue
        out.append(MemoryRow(r, _MEASURED[key], units=tuple(activations.fsdp_units(b.module))))
    return out


# ---- the printed tables -------------------------------------------------------------------------


def format_memory(rows: list[MemoryRow], table: Any) -> str:
    """The "memory plan" section of ``plan``'s output; ``table`` formats a list of row tuples."""
    act = [("stage", "model", "act/sample fp32", "bf16", "bf16+ckpt", "fixed bf16", "of it: weight copies",
            "DDP state", "DDP batch", "+ckpt", "FSDP state", "FSDP batch", "+ckpt", "batch/GPU")]
    compute = [("stage", "model", "GFLOP/sample", "+ckpt", "global batch", "iterations", "GPU-h",
                "+ckpt", "days on its GPUs", "Table 3 iterations", "GPU-h")]
    notes = []
    for m in rows:
        b, r = m.row.built, m.row
        if m.measured is None:
            notes.append(f"{b.stage} {b.name}: {m.reason}")
            continue
        x = m.measured
        ddp, ddp_ck, fsdp, fsdp_ck = (m.fit(p, k) for p in ("ddp", "fsdp") for k in ("bf16", "bf16+ckpt"))
        copies = x.steps["bf16"][0].held_copies
        act.append((b.stage, b.name, _gb(x.per_sample("fp32")), _gb(x.per_sample("bf16")),
                    _gb(x.per_sample("bf16+ckpt")), _gb(x.fixed("bf16")), _gb(copies),
                    _gb(m.ddp_state()), ddp.cell(), ddp_ck.cell(), f"{_gb(m.fsdp_state())} (/{r.workers})",
                    fsdp.cell(), fsdp_ck.cell(), str(r.batch)))
        steps = int(r.iterations.replace(",", "")) if r.iterations.replace(",", "").isdigit() else 0
        paper = PAPER_ITERATIONS.get(b.paper, 0)
        hours = m.gpu_hours(steps)
        compute.append((b.stage, b.name, _num(x.flops / 1e9), f"{x.flops_ckpt / x.flops - 1:+.0%}",
                        f"{r.batch * r.workers:,}", f"{steps:,}", _hours(hours),
                        _hours(m.gpu_hours(steps, True)), f"{hours / r.workers / 24:,.1f}",
                        f"{paper:,}", _hours(m.gpu_hours(paper))))
    rules = sorted({m.measured.checkpoint_rule for m in rows if m.measured})
    lines = [
        f"memory plan: per-GPU batch that fits an {GPU_BYTES / GB:.0f} GB GPU ({usable() / GB:.1f} GB "
        f"usable: {HEADROOM:.0%} headroom and {CUDA_CONTEXT / GB:.0f} GB CUDA context held back). "
        "Activations: each stage's step (loss + backward, the stage's input shapes, captions the full "
        "context) on fake tensors at batches "
        f"{' and '.join(map(str, activations.BATCHES))}, peak bytes per sample extrapolated "
        "linearly; 'fixed' is the batch-independent part. bf16 = the CUDA default autocast.",
        table(act),
        f"DDP state = {STATE + DDP_BUCKETS} B/param (fp32 weights, grads, DDP buckets, AdamW, EMA) + "
        "frozen CLIP; DDP batch adds the bf16 fixed part and activations. FSDP state = "
        f"{STATE} B/param sharded + frozen CLIP + {FSDP_UNIT} B/param of the largest unit (one per "
        "UNet down/mid/up block or transformer Block; bf16 parameters gathered for two units, one "
        "unit's fp32 gradient); FSDP's bf16 parameters replace autocast's weight copies. "
        "ckpt: " + "; ".join(rules) + ".",
        "",
        f"compute: FLOPs per sample counted by FlopCounterMode (forward + backward, the frozen CLIP "
        f"text tower's forward included; +ckpt = checkpointing's recomputed forward); GPU-hours at a "
        f"stated {MFU:.0%} MFU of {PEAK_NAME} (not measured: no GPU has run these models):",
        table(compute),
    ]
    return "\n".join(lines + notes)


def _gb(b: float) -> str:
    return f"{b / GB:.2f} GB" if abs(b) >= 0.1 * GB else f"{b / 1e6:.1f} MB"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.2g}"
