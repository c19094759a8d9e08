"""Sharded data parallelism (FSDP2) and activation checkpointing for the big models; no Ray here.

DDP keeps the whole model, its gradients, both AdamW moments and the EMA on every rank (5 copies
of the parameters). ``fully_shard`` (torch's FSDP2) splits each of them into 1/world_size per rank
and all-gathers one block's parameters only while that block runs: the UNets' down, mid and up
blocks, the transformers' layers, then the root (the embeddings, projections and the rest). The
maths is the same as DDP's (gradients are averaged over ranks), which is why the strategy is an
operational key, outside the stage's hash.

Training state leaves a sharded run as *full* tensors in the unsharded layout (``model_state``,
``optimizer_state``: gathered parameter by parameter, kept on rank 0's host), so a checkpoint
written by FSDP is the checkpoint DDP writes: registration, generation and a resume under either
strategy load it unchanged. Loading goes the other way: every rank reads the full tensors and
keeps its own shard (``load_model_state``, ``load_optimizer_state``).

The EMA of a sharded model is sharded too (:class:`ShardedEMA`): a second FSDP module laid out like
the model, updated shard-locally (a lerp on each rank's local shards, no communication), so it costs
1/world_size of the parameters per rank instead of a full copy. Rank 0's evaluation needs the whole
EMA model: :meth:`ShardedEMA.gathered` all-gathers it into a plain module on rank 0 for the
evaluation only and frees it after.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from unclip.options import option, validate
from unclip.training.state import EMA, unwrap

STRATEGIES = ("ddp", "fsdp")


@dataclass
class ShardingConfig:
    """How a training stage spreads its model over its workers; neither changes the result."""

    # ddp: a full replica per worker; fsdp: parameters, gradients, optimizer state and EMA sharded
    parallel: str = option("ddp", choices=STRATEGIES)
    # recompute each block's activations in the backward pass instead of keeping them (less memory,
    # about a third more compute); the decoder, the upsamplers and both priors
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        validate(self)


# The unsharded layout of every model ``shard`` has sharded (parameters on the meta device, no
# storage): what a gathered state dict is loaded into (ShardedEMA), without keeping a full copy.
_SKELETONS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or the module inside a DDP wrapper) holds FSDP-sharded parameters."""
    return any(is_dtensor(p) for p in unwrap(model).parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor all-gathered (a collective: every rank calls it), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one (all-gathered only while they run): every diffusers UNet's
    down, mid and up blocks and every :class:`~unclip.models.transformer.CausalTransformer` layer."""
    from unclip.models.transformer import CausalTransformer

    units: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, CausalTransformer):
            units.extend(m.blocks)
        elif isinstance(getattr(m, "down_blocks", None), nn.ModuleList) \
                and isinstance(getattr(m, "up_blocks", None), nn.ModuleList):
            units.extend(m.down_blocks)
            if getattr(m, "mid_block", None) is not None:
                units.append(m.mid_block)
            units.extend(m.up_blocks)
    return units


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Recompute activations in the backward pass: per resnet / attention block in diffusers UNets
    (their ``enable_gradient_checkpointing``, non-reentrant), per layer in our transformers. Returns
    how many models or layers were switched; a model with none is refused (a silent no-op would
    keep the memory the option was set to save)."""
    from unclip.models.transformer import CausalTransformer

    switched = 0
    for m in unwrap(model).modules():
        if isinstance(m, CausalTransformer):
            m.checkpointing = bool(enabled)
            switched += len(m.blocks)
        elif getattr(m, "_supports_gradient_checkpointing", False) \
                and hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing() if enabled else m.disable_gradient_checkpointing()
            switched += 1
    if not switched:
        raise ValueError(f"activation checkpointing: {type(unwrap(model)).__name__} has no UNet or "
                         "transformer blocks to checkpoint")
    return switched


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (shapes and dtypes, no storage)
    and whose buffers are real copies (small; some are not in the state dict, so a state dict
    loaded with ``assign=True`` would leave them on meta)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"),
                                                requires_grad=p.requires_grad)
                            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, strategy: str = "fsdp", mesh: Any = None) -> nn.Module:
    """``model`` ready for data-parallel training across the default process group.

    ``fsdp``: FSDP2 ``fully_shard`` on each of :func:`shard_units`, then on the root; the model
    stays the same object (its class becomes an FSDP subclass, its state dict keys unchanged) and
    its parameters become DTensors. Move it to its device first. ``ddp``: wrapped in
    DistributedDataParallel when more than one rank trains, else returned as it is."""
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel strategy must be one of {STRATEGIES}, got {strategy!r}")
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if strategy == "ddp":
        if not distributed or dist.get_world_size() == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if not distributed:
        raise RuntimeError("parallel=fsdp needs a torch.distributed process group")
    if is_sharded(model):
        raise ValueError("the model is sharded already")
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    skeleton = meta_copy(model)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _SKELETONS[model] = skeleton
    return model


# ---- state in the unsharded layout -----------------------------------------------------------


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on the host. Sharded: gathered parameter by parameter, a
    collective every rank must enter, and only rank 0 gets the tensors ({} elsewhere: no rank
    but the writer holds a full copy)."""
    model = unwrap(model)
    if not is_sharded(model):
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    return {k: v.detach().contiguous() for k, v in state.items()}


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes the whole of it); a sharded model keeps each
    rank's own shard of every tensor."""
    model = unwrap(model)
    if not is_sharded(model):
        model.load_state_dict(dict(state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order: index i of torch's optimizer state
    dict is the i-th parameter over its param groups."""
    name_of = {id(p): n for n, p in unwrap(model).named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError("the optimizer holds a parameter the model does not")
            names.append(name_of[id(p)])
    return names


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict in torch's layout (parameters by index, the layout an
    unsharded run saves, so either strategy resumes from it). Sharded: gathered, a collective
    every rank must enter; only rank 0 gets it ({} elsewhere)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(unwrap(model), optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if not by_name or not by_name.get("param_groups"):
        return {}
    index = {n: i for i, n in enumerate(_parameter_names(model, optimizer))}
    return {"state": {index[n]: {k: v.detach().contiguous() if torch.is_tensor(v) else v
                                 for k, v in st.items()}
                      for n, st in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in by_name["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: Mapping[str, Any]) -> None:
    """Load what :func:`optimizer_state` returned (from either strategy) on every rank."""
    if not is_sharded(model):
        optimizer.load_state_dict(dict(state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    by_name = {"state": {names[int(i)]: dict(st) for i, st in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in state["param_groups"]]}
    set_optimizer_state_dict(unwrap(model), optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


# ---- EMA ---------------------------------------------------------------------------------------


def make_ema(model: nn.Module, decay: float) -> EMA:
    """The EMA for ``model`` as it trains: a full copy for an unsharded (or DDP) model, a sharded
    one (:class:`ShardedEMA`) for a model :func:`shard` sharded."""
    model = unwrap(model)
    return ShardedEMA(model, decay) if is_sharded(model) else EMA(model, decay)


class ShardedEMA(EMA):
    """The EMA of an FSDP model as an FSDP module of the same layout: each rank keeps and updates
    its own shards (1/world_size of the parameters, no communication per step; a full EMA on rank 0
    would cost a whole copy there plus an all-gather of every parameter each step). ``model`` is
    that sharded module: checkpoints gather it (:func:`model_state`), evaluation uses
    :meth:`gathered`."""

    def __init__(self, model: nn.Module, decay: float):
        if model not in _SKELETONS:
            raise ValueError("ShardedEMA needs a model sharded by unclip.training.sharding.shard")
        from torch.distributed.fsdp import fully_shard

        self.decay = decay
        first = next(p for p in model.parameters() if is_dtensor(p))
        mesh, device = first.device_mesh, first.to_local().device
        self._skeleton = _SKELETONS[model]
        ema = meta_copy(self._skeleton)
        for unit in shard_units(ema):
            fully_shard(unit, mesh=mesh)
        fully_shard(ema, mesh=mesh)
        ema.to_empty(device=device)  # each rank allocates its shards only
        self.model = ema.eval().requires_grad_(False)
        with torch.no_grad():
            for e, p in self._pairs(model):
                e.copy_(p)
            for e, b in zip(self.model.buffers(), model.buffers()):
                e.copy_(b)

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(EMA local shard, model local shard) by name: both modules have the same layout. Taken
        afresh each time (a state dict load may give either module new local tensors)."""
        mine = dict(self.model.named_parameters())
        theirs = dict(unwrap(model).named_parameters())
        if mine.keys() != theirs.keys():
            raise ValueError("the EMA and the model have different parameters")
        out = []
        for name, e in mine.items():
            el = e.to_local() if is_dtensor(e) else e
            p = theirs[name]
            pl = (p.to_local() if is_dtensor(p) else p).detach()
            if el.shape != pl.shape:
                raise ValueError(f"{name}: EMA shard {tuple(el.shape)} vs model shard {tuple(pl.shape)}")
            out.append((el, pl))
        return out

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Lerp each rank's EMA shards towards its model shards (the same layout: no comms)."""
        pairs = self._pairs(model)
        torch._foreach_lerp_([e for e, _ in pairs], [p.to(e.dtype) for e, p in pairs],
                             1.0 - self.decay)
        for e, b in zip(self.model.buffers(), unwrap(model).buffers()):
            e.copy_(b)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module | None]:
        """The whole EMA model as a plain module on rank 0 (None on the others), on the training
        device, for the duration of the block. A collective: every rank enters it."""
        import torch.distributed as dist

        state = model_state(self.model)
        if dist.get_rank() != 0:
            yield None
            return
        first = next(self.model.parameters())
        device = first.to_local().device if is_dtensor(first) else first.device
        full = meta_copy(self._skeleton)
        full.load_state_dict(state, assign=True)
        full = full.to(device).eval().requires_grad_(False)
        del state
        try:
            yield full
        finally:
            del full
