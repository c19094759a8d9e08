"""Activation memory and FLOPs of one training step of every stage's model, measured without compute.

Each stage's step (its loss on a batch of the stage's real shapes, then ``backward``) runs on fake
tensors: torch's ``FakeTensorMode`` over the meta device, so a 2B-parameter decoder costs no memory
and no arithmetic, but every op runs its real shape logic. Fake tensors are *CPU* tensors as far as
the dispatcher is concerned (plain meta tensors are not), which matters twice: CPU autocast applies,
so the bf16 step is the real one (conv / linear / matmul / attention outputs in bf16, norms and the
loss in fp32, the weights' bf16 copies saved for backward), and scaled-dot-product attention takes
the fused flash kernel (saving its output and log-sum-exp, as CUDA's flash and memory-efficient
kernels do) instead of the meta device's math path, which would save every (S x S) score matrix.

Memory is counted by :class:`LiveStorages`: every storage an op allocates inside it, until it is
freed. "held" is what is alive when the forward pass and loss are done (what autograd keeps for
backward: activations, the weights' autocast copies, the inputs it saved); "peak" is the largest
total at any op boundary through forward and backward (held plus the gradients of activations in
flight). Storages are identified by their ``StorageImpl`` (``untyped_storage()._cdata``: views of
one storage count once; meta storages have no data pointer to compare) and freed through a weak
reference on the storage object, which torch keeps alive exactly as long as its ``StorageImpl``.
Not counted: memory inside an op (cuDNN / attention workspaces), the CUDA caching allocator's
rounding and fragmentation. Those are what the plan's headroom is for.

The same code runs on real CPU tensors (``fake=False``), which is how the tests check the fake
measurement against a real one at tiny size.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
Inputs = dict[str, Any]


class LiveStorages(TorchDispatchMode):
    """Bytes of the storages allocated by ops run inside it that are still alive, and their peak.

    An op's output is a new allocation when its storage is none of the op's inputs' (a view or an
    in-place op returns one of those) and was not seen before; tensors made outside (weights,
    their gradients) are thus never counted, only what the step itself allocates. Casts of a
    storage in ``params`` (autocast's bf16 copies of the weights) are also summed apart, in
    ``copies``, since sharded training does not keep them (see :mod:`pipelines.plan.memory`)."""

    def __init__(self, params: set[int] | None = None) -> None:
        super().__init__()
        self.params = params or set()
        self.sizes: dict[int, tuple[int, bool, weakref.ref]] = {}
        self.live = self.copies = 0
        self.peak = self.peak_copies = 0

    def _free(self, key: int) -> None:
        entry = self.sizes.pop(key, None)
        if entry is not None:
            self.live -= entry[0]
            self.copies -= entry[0] if entry[1] else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        is_copy = func is aten._to_copy.default and not inputs.isdisjoint(self.params)
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.sizes:
                continue
            n = storage.nbytes()
            # the callback runs when the storage's StorageImpl goes (torch keeps one Python object
            # per StorageImpl alive as long as it is); its key is never reused before then
            self.sizes[key] = (n, is_copy, weakref.ref(storage, lambda _, k=key: self._free(k)))
            self.live += n
            self.copies += n if is_copy else 0
        if self.live > self.peak:
            self.peak, self.peak_copies = self.live, self.copies
        return out


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or results (nested tuples, lists and dicts); a few times
    faster than pytree's flattening, which matters at thousands of ops per step."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


# FlopCounterMode has formulas for CUDA's fused attention kernels but not for the CPU flash kernel
# fake tensors dispatch to; it has the same arguments up front, so the same formulas count it.
def _flop_mapping() -> dict[Any, Callable]:
    from torch.utils import flop_counter as fc

    # (the registered formulas are wrapped to take shapes; FlopCounterMode wraps a mapping again)
    return {aten._scaled_dot_product_flash_attention_for_cpu: fc.sdpa_flop.__wrapped__,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: fc.sdpa_backward_flop.__wrapped__}


@dataclass(frozen=True)
class Step:
    """One measured training step at one batch size (bytes the step allocates)."""

    batch: int
    held: int          # alive after forward + loss: what autograd keeps for backward
    peak: int          # at the step's highest point, forward or backward
    held_copies: int   # of ``held``: the weights' autocast copies
    peak_copies: int   # of ``peak``: the same, at the peak


@dataclass
class Probe:
    """How a stage trains its model: the model, a batch of the stage's shapes, the step's loss.

    ``inputs(b)`` makes a batch of ``b`` samples (fake or real tensors: called under the mode the
    step runs in); ``loss(model, frozen, inputs)`` is the stage's loss, ``frozen`` the CLIP model
    whose text tower recomputes the caption states without gradients (or None);
    ``checkpointed(model)`` a context in which activation checkpointing is on."""

    name: str
    model: torch.nn.Module
    inputs: Callable[[int], Inputs]
    loss: Callable[[torch.nn.Module, torch.nn.Module | None, Inputs], torch.Tensor]
    checkpointed: Callable[[torch.nn.Module], contextlib.AbstractContextManager]
    checkpoint_rule: str
    frozen: torch.nn.Module | None = None


def _step(probe: Probe, model: torch.nn.Module, frozen: torch.nn.Module | None, batch: int,
          amp: bool, checkpoint: bool, mode: TorchDispatchMode) -> tuple[int, int]:
    """Forward, loss and backward under ``mode``; what ``mode`` (a LiveStorages) held after the
    forward pass, and of that the weights' copies ((0, 0) for another mode)."""
    if frozen is not None:  # as the stages freeze it: autocast then caches no casts of its weights
        frozen.requires_grad_(False)
    ckpt = probe.checkpointed(model) if checkpoint else contextlib.nullcontext()
    with ckpt, mode:
        inputs = probe.inputs(batch)  # the batch counts: it is on the GPU through the step
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = probe.loss(model, frozen, inputs)
        held = getattr(mode, "live", 0), getattr(mode, "copies", 0)
        loss.backward()
        del loss, inputs
    return held


def run_step(probe: Probe, model: torch.nn.Module, frozen: torch.nn.Module | None, batch: int,
             amp: bool, checkpoint: bool) -> Step:
    """The memory of one step of ``model`` (the probe's, or its fake copy) on a batch of ``batch``.

    Parameter gradients exist (zeros) before the step, as in the static memory table: what the
    step adds on top of weights and gradients is measured, including the transient gradient
    autograd makes before accumulating it into ``.grad``. The garbage collector is off during the
    step, so frees come from reference counts alone and the count does not depend on when a
    collection happens to run."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    live = LiveStorages({p.untyped_storage()._cdata for p in model.parameters()})
    gc.disable()
    try:
        held, copies = _step(probe, model, frozen, batch, amp, checkpoint, live)
    finally:
        gc.enable()
    return Step(batch, held, live.peak, copies, live.peak_copies)


def count_flops(probe: Probe, model: torch.nn.Module, frozen: torch.nn.Module | None,
                checkpoint: bool) -> float:
    """Matmul / convolution / attention FLOPs of one step at batch 1 (forward + backward, and the
    recomputed forward with checkpointing), as torch's FlopCounterMode counts them.

    Counted in a pass of its own: FlopCounterMode's module hooks keep checkpointing's recomputed
    activations alive, which would spoil the memory count."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_flop_mapping())
    _step(probe, model, frozen, 1, False, checkpoint, counter)
    return float(counter.get_total_flops())


@contextlib.contextmanager
def fake_copy(probe: Probe) -> Iterator[tuple[torch.nn.Module, torch.nn.Module | None]]:
    """Fake-tensor copies of the probe's (meta) model and frozen CLIP, inside FakeTensorMode.

    Real CPU tensors that the step meets (a diffusion schedule, say) are turned into fakes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = copy.deepcopy(probe.model)
    frozen = copy.deepcopy(probe.frozen)
    # an op that fails on fake tensors is logged with its traceback before it raises; the raised
    # error is the one to report (pipelines.plan.memory does)
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield model.to_empty(device="cpu"), None if frozen is None else frozen.to_empty(device="cpu")
    finally:
        log.setLevel(level)


# what is measured: (bf16 autocast, activation checkpointing)
KINDS: dict[str, tuple[bool, bool]] = {"fp32": (False, False), "bf16": (True, False),
                                       "bf16+ckpt": (True, True)}


# Activation memory is linear in the batch; batch 1 is left out because some ops take another
# path there (the paper decoder's peak grows 5% more from 1 to 2 samples than from 2 to 4 or 4 to 8).
BATCHES = (2, 4)


@dataclass(frozen=True)
class Measured:
    """A stage's steps at :data:`BATCHES` for every kind in :data:`KINDS`, and its FLOPs."""

    name: str
    steps: dict[str, tuple[Step, Step]]   # kind -> (smaller batch, larger batch)
    flops: float                          # per sample, forward + backward
    flops_ckpt: float                     # the same with checkpointing's recompute
    checkpoint_rule: str

    def _bytes(self, step: Step, what: str, copies: bool) -> float:
        return float(getattr(step, what) - (0 if copies else getattr(step, f"{what}_copies")))

    def per_sample(self, kind: str, what: str = "peak", copies: bool = True) -> float:
        """Bytes per sample: the slope between the two batches. ``what``: "peak" or "held";
        ``copies`` False leaves out the weights' autocast copies."""
        one, two = self.steps[kind]
        return (self._bytes(two, what, copies) - self._bytes(one, what, copies)) / (two.batch - one.batch)

    def fixed(self, kind: str, what: str = "peak", copies: bool = True) -> float:
        """The batch-independent part (weights' bf16 copies, one transient gradient, ...)."""
        one = self.steps[kind][0]
        return self._bytes(one, what, copies) - one.batch * self.per_sample(kind, what, copies)

    def at(self, kind: str, batch: int, what: str = "peak", copies: bool = True) -> float:
        """Bytes of a step at ``batch``, extrapolated linearly."""
        return self.fixed(kind, what, copies) + batch * self.per_sample(kind, what, copies)


def measure(probe: Probe, fake: bool = True) -> Measured:
    """Run the probe's step at :data:`BATCHES` for every kind in :data:`KINDS`; count its FLOPs.

    ``fake``: on fake tensors (any size, no memory); otherwise on the probe's own model, which must
    then be real (tiny sizes only)."""
    steps: dict[str, tuple[Step, Step]] = {}
    real = contextlib.nullcontext((probe.model, probe.frozen))
    with fake_copy(probe) if fake else real as (model, frozen):
        for kind, (amp, ckpt) in KINDS.items():
            small, large = (run_step(probe, model, frozen, b, amp, ckpt) for b in BATCHES)
            steps[kind] = (small, large)
        flops = count_flops(probe, model, frozen, False), count_flops(probe, model, frozen, True)
    return Measured(probe.name, steps, *flops, probe.checkpoint_rule)


def fsdp_units(model: torch.nn.Module) -> list[int]:
    """Parameters of each FSDP unit when every UNet down / mid / up block (or transformer Block) is
    wrapped on its own, the rest of the model being the root unit."""
    unet, blocks = getattr(model, "unet", None), getattr(getattr(model, "transformer", None), "blocks", None)
    if unet is not None:
        units = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    else:
        units = list(blocks or [])
    sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    return sizes + [sum(p.numel() for p in model.parameters()) - sum(sizes)]


# ---- activation checkpointing --------------------------------------------------------------------


def _checkpoint(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def unet_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """diffusers' own ``enable_gradient_checkpointing`` on the model's UNet (what a stage would call)."""
    model.unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint)
    try:
        yield
    finally:
        model.unet.disable_gradient_checkpointing()


@contextlib.contextmanager
def block_checkpointing(model: torch.nn.Module) -> Iterator[None]:
    """Each transformer Block of the prior recomputed in backward: only block inputs are kept."""
    blocks = list(model.transformer.blocks)
    for blk in blocks:
        blk.forward = (lambda f: lambda *a, **k: _checkpoint(f, *a, **k))(blk.forward)
    try:
        yield
    finally:
        for blk in blocks:
            del blk.forward  # the instance attribute: back to the class's forward


UNET_RULE = ("diffusers' enable_gradient_checkpointing: every UNet resnet recomputed in backward "
             "(its cross-attention layers are not)")
BLOCK_RULE = "every transformer Block recomputed in backward (only block inputs kept)"


# ---- the stages' steps ---------------------------------------------------------------------------


def _unit(b: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(b, dim), dim=-1)


def _caption_states(clip: torch.nn.Module | None, b: int, context: int, width: int,
                    fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption token states as the stage makes them: the frozen CLIP text tower on ``context``
    tokens (every caption the full context: the batch pads to its longest caption), no gradients;
    without a CLIP (the tests), random states of the same shape."""
    from unclip.models.clip import text_tokens

    if clip is None:
        return torch.randn(b, context, width), torch.ones(b, context, dtype=torch.bool)
    tokens = torch.randint(1, 1000, (b, context))
    tokens[:, -1] = clip.token_embedding.num_embeddings - 1  # end of text: the largest id, last
    with torch.no_grad(), torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
        _, states, mask = text_tokens(clip, tokens)
    return states, mask


def decoder_probe(model: torch.nn.Module, clip: torch.nn.Module | None, context: int,
                  p_drop_clip: float = 0.1, p_drop_caption: float = 0.5) -> Probe:
    """stages/decoder.py's step: caption states (frozen CLIP, under the training autocast), the
    hybrid loss of ``GaussianDiffusion.training_losses`` with the guidance dropouts."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.models.decoder import dropout_masks

    cfg = model.cfg
    gd = GaussianDiffusion(model.diffusion)

    def inputs(b: int) -> Inputs:
        side = cfg.resolution
        return {"x0": torch.rand(b, 3, side, side) * 2 - 1, "z": _unit(b, cfg.clip_dim), "b": b}

    def loss(m: torch.nn.Module, clip: torch.nn.Module | None, x: Inputs) -> torch.Tensor:
        states, mask = _caption_states(clip, x["b"], context, cfg.text_width, fp32=False) \
            if cfg.use_caption else (None, None)
        dc, dt = dropout_masks(x["b"], p_drop_clip, p_drop_caption)
        out = gd.training_losses(lambda xt, t: m(xt, t, x["z"], states, mask, dc, dt), x["x0"])
        return out["loss"].mean()

    return Probe("decoder", model, inputs, loss, unet_checkpointing, UNET_RULE, clip)


def prior_probe(model: torch.nn.Module, clip: torch.nn.Module | None, kind: str) -> Probe:
    """stages/prior.py's step: caption states from the frozen CLIP in fp32 (its CaptionEncoder
    turns autocast off), then the prior's own ``losses``. The AR prior's quantizer (numpy PCA, no
    gradient) is replaced by random codes of its output shape."""
    cfg = model.cfg
    context = cfg.max_text_len

    def inputs(b: int) -> Inputs:
        return {"z_i": _unit(b, cfg.dim), "z_t": _unit(b, cfg.dim), "b": b}

    def loss(m: torch.nn.Module, clip: torch.nn.Module | None, x: Inputs) -> torch.Tensor:
        states, mask = _caption_states(clip, x["b"], context, cfg.text_width, fp32=True)
        if kind != "autoregressive":
            return m.losses(x["z_i"], states, mask, x["z_t"])["loss"]
        m.encode = lambda z: torch.randint(0, cfg.num_buckets, (z.shape[0], cfg.n_components))
        try:
            return m.losses(x["z_i"], states, mask, x["z_t"])["loss"]
        finally:
            del m.encode  # the instance attribute: back to the real quantizer

    return Probe(f"{kind} prior", model, inputs, loss, block_checkpointing, BLOCK_RULE, clip)


def upsampler_probe(model: torch.nn.Module, crop: int) -> Probe:
    """unclip/training/upsampler.py's step on ``crop`` px crops (the low-res input a quarter of it;
    the degradation runs in the data path, on numpy)."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.training.upsampler import make_step_loss

    step = make_step_loss(GaussianDiffusion(model.diffusion_config), int(model.config["aug_max_level"]))
    low = crop // model.scale

    def inputs(b: int) -> Inputs:
        return {"hr": torch.rand(b, 3, crop, crop) * 2 - 1, "low": torch.rand(b, 3, low, low) * 2 - 1}

    return Probe(f"upsampler {crop} px crops", model, inputs,
                 lambda m, _, x: step(m, (x["hr"], x["low"]))["loss"], unet_checkpointing, UNET_RULE)


def probe_for(stage: str, name: str, model: torch.nn.Module, cfg: DictConfig,
              clip: torch.nn.Module | None) -> Probe:
    """The probe of a plan row (its stage, its model name) with the stage's config."""
    if stage == "decoder":
        c = cfg.decoder
        return decoder_probe(model, clip, int(clip.context_length) if clip is not None else 77,
                             float(c.p_drop_clip), float(c.p_drop_caption))
    if stage == "prior":
        return prior_probe(model, clip, "diffusion" if name.startswith("diffusion") else "autoregressive")
    from stages.upsample import sizes

    return upsampler_probe(model, sizes(cfg[stage])[2])
