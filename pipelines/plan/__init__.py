"""``python -m pipelines plan``: check a preset and size every model without a GPU or a download.

The composed config (keys and types already checked against the schema when it was composed) is
checked for ranges (:mod:`pipelines.plan.checks`), every model is built on the meta device by the
library functions its stage calls (:mod:`pipelines.plan.models`), and each is printed beside the
paper's size with the training memory per GPU it needs, so a paper-scale run can be sized (and a
typo caught) before a cluster is started. :mod:`pipelines.plan.origins` prints each stage's
effective config and where each value came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from pipelines.config import to_container
from pipelines.plan import checks, memory, models
from pipelines.plan.models import Built

# Parameter counts the paper gives (Ramesh et al. 2022, Table 3; CLIP: the ViT-H/16 encoder of
# Sec. 5, ~1B with its text tower). The decoder's 3.5B is GLIDE's, text transformer included.
PAPER_PARAMS: dict[str, tuple[float, str]] = {
    "clip": (1.0e9, "~1B (ViT-H/16)"),
    "prior/autoregressive": (1.0e9, "1B"),
    "prior/diffusion": (1.0e9, "1B"),
    "decoder": (3.5e9, "3.5B (GLIDE)"),
    "upsample1": (700e6, "700M"),
    "upsample2": (300e6, "300M"),
}
# Bytes per parameter when training in fp32 with AdamW (two moments) and an EMA copy.
WEIGHTS, GRADS, ADAM, EMA = 4, 4, 8, 4
GB = 1e9
# Stages whose workers hold the whole frozen CLIP beside the model they train (caption states).
HOLDS_CLIP = ("prior", "decoder")


@dataclass
class Row:
    built: Built
    workers: int
    batch: int          # per worker
    iterations: str
    frozen: int = 0     # parameters of the frozen CLIP each worker holds

    def memory(self) -> dict[str, float]:
        """Bytes per GPU: weights, grads, AdamW, EMA, frozen CLIP; DDP and FSDP totals."""
        p = self.built.params
        if not self.built.trained and self.built.stage == "clip":
            return {"weights": WEIGHTS * p}
        m = {"weights": WEIGHTS * p, "grads": GRADS * p, "adam": ADAM * p,
             "ema": EMA * p if self.built.ema else 0, "frozen": WEIGHTS * self.frozen}
        sharded = m["weights"] + m["grads"] + m["adam"] + m["ema"]
        m["ddp"] = sharded + m["frozen"]
        m["fsdp"] = sharded / max(1, self.workers) + m["frozen"]
        return m


@dataclass
class Plan:
    preset: str
    clip: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    memory: list[memory.MemoryRow] = field(default_factory=list)  # the memory plan of each trained row
    measured: bool = True  # False: make_plan(measure=False) ran no step, the memory plan is empty

    def params(self, name: str) -> int:
        """Parameters of the row whose model is ``name`` (e.g. "decoder", "diffusion prior")."""
        return next(r.built.params for r in self.rows if r.built.name == name)


def make_plan(cfg: DictConfig, measure: bool = True) -> Plan:
    """Check ``cfg`` (a :class:`pipelines.config.ConfigError` names the first bad key) and size it.

    ``measure``: also run every trained model's step on fake tensors for the activation memory
    plan and FLOPs (about a minute for the paper preset on 2 cores); off, the plan checks and
    sizes only."""
    from unclip.training.loop import LoopConfig

    checks.check(cfg)
    encoder, sized_by, clip_trained = models.clip_encoder(cfg)
    clip = models.Built("clip", "CLIP" + ("" if clip_trained else " (frozen)"), models.count(encoder.model),
                        "clip", clip_trained, False, "" if clip_trained else "pretrained: not trained here")
    plan = Plan(str(cfg.preset_name), {"sized by": sized_by, "embedding dim": encoder.dim,
                                       "text width": encoder.text_width,
                                       "context length": encoder.context_length})
    t = cfg.clip.train
    plan.rows.append(Row(clip, int(t.num_workers), int(t.batch_size),
                         f"{int(t.epochs)} epochs" if clip_trained else "-"))
    built = models.priors(cfg, encoder) + [models.decoder(cfg, encoder),
                                           models.upsampler(cfg, "upsample1"),
                                           models.upsampler(cfg, "upsample2")]
    for b in built:
        train = cfg[b.stage].train
        steps = models.named(f"{b.stage}.train", LoopConfig.from_dict, to_container(train)).total_steps
        plan.rows.append(Row(b, int(train.num_workers), int(train.batch_size), f"{steps:,}",
                             clip.params if b.stage in HOLDS_CLIP else 0))
    plan.measured = measure
    if measure:
        plan.memory = memory.plan_memory(plan, cfg, encoder.model)
    return plan


# ---- the printed tables -------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    clip = ", ".join(f"{k} {v}" for k, v in plan.clip.items())
    models_rows = [("stage", "model", "parameters", "paper", "ratio", "note")]
    memory_rows = [("stage", "model", "weights", "grads", "AdamW", "EMA", "frozen CLIP", "DDP/GPU",
                    "FSDP/GPU", "GPUs", "global batch", "iterations")]
    for r in plan.rows:
        b = r.built
        paper, paper_s = PAPER_PARAMS[b.paper]
        models_rows.append((b.stage, b.name, _count(b.params), paper_s, f"{b.params / paper:.2g}", b.note))
        m = r.memory()
        cells = [_gb(m[k]) if m.get(k) else "-" for k in
                 ("weights", "grads", "adam", "ema", "frozen", "ddp")]
        fsdp = f"{_gb(m['fsdp'])} (/{r.workers})" if "fsdp" in m else "-"
        trained = "ddp" in m
        memory_rows.append((b.stage, b.name, *cells, fsdp, str(r.workers) if trained else "-",
                            f"{r.batch * r.workers:,} ({r.batch} x {r.workers})" if trained else "-",
                            r.iterations if trained else "-"))
    return "\n".join([
        f"preset {plan.preset}: every stage's options check out; models built on the meta device",
        f"CLIP: {clip}", "", _table(models_rows), "",
        "training memory per GPU (fp32: weights 4 + grads 4 + AdamW moments 8 + EMA 4 bytes per "
        "parameter; activations not included; 1 GB = 1e9 bytes):",
        _table(memory_rows),
        "DDP keeps everything on every GPU; FSDP (train.parallel=fsdp) shards weights, grads, "
        "moments and EMA over the stage's num_workers. The frozen CLIP (fp32, not sharded) sits on every GPU of the prior and "
        "decoder stages. A prior row marked 'not trained' shows prior.train's figures for the other kind.",
        "", memory.format_memory(plan.memory, _table) if plan.measured else
        "memory plan: not measured (--no-measure): activations, per-GPU batches and FLOPs need each "
        "model's step on fake tensors",
    ])


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _gb(b: float) -> str:
    return f"{b / GB:.1f} GB" if b >= GB else f"{b / 1e6:.1f} MB"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
