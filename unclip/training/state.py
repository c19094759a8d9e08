"""Training state on disk without pickle: model, EMA and optimizer tensors in safetensors, the rest JSON.

Resume needs the optimizer state too (same step, same moments), and ``torch.save`` would make every
checkpoint a pickle. Optimizer state dicts are flattened into named tensors plus a JSON skeleton.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Any, Iterator

import torch

STATE_WEIGHTS = "state.safetensors"
STATE_META = "state.json"


class EMA:
    """Exponential moving average of parameters (and buffers copied), as in the paper's Table 3."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module | None]:
        """The EMA model to evaluate, on every rank that asks (a sharded EMA gathers it on rank 0
        only: :class:`unclip.training.sharding.ShardedEMA`)."""
        yield self.model


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        skeleton[str(idx)] = {}
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{idx}.{name}"] = val.detach().cpu().contiguous()
                skeleton[str(idx)][name] = "tensor"
            else:
                skeleton[str(idx)][name] = val
    return tensors, {"state": skeleton, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {name: (tensors[f"opt.{idx}.{name}"] if val == "tensor" else val)
                           for name, val in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                  ema: EMA | None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(named full tensors, the optimizer's JSON skeleton) of a training state, in the layout of an
    unsharded model whatever the strategy. For an FSDP model this gathers the shards: a collective
    every rank must enter, whose result is complete on rank 0 only."""
    from unclip.training import sharding

    tensors = {f"model.{k}": v for k, v in sharding.model_state(model).items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in sharding.model_state(ema.model).items()})
    opt_meta = None
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(sharding.optimizer_state(model, optimizer)
                                                   or {"state": {}, "param_groups": []})
        tensors.update(opt_tensors)
    return tensors, opt_meta


def write_state(folder: str, tensors: dict[str, torch.Tensor], opt_meta: dict[str, Any] | None,
                meta: dict[str, Any]) -> None:
    """Write what :func:`state_tensors` returned into a local folder (Ray Train then persists it)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, STATE_WEIGHTS))
    with open(os.path.join(folder, STATE_META), "w") as f:
        json.dump({**meta, "optimizer": opt_meta}, f)


def save_state(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               ema: EMA | None, meta: dict[str, Any]) -> None:
    """Write a resumable training state of an unsharded model into a local folder."""
    write_state(folder, *state_tensors(model, optimizer, ema), meta)


def load_state(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               ema: EMA | None) -> dict[str, Any]:
    """Restore what ``save_state`` wrote; returns its JSON meta (step, epoch, metrics...). An FSDP
    model (and its EMA and optimizer) keeps each rank's shard of the full tensors: every rank
    calls this with the same folder."""
    from safetensors.torch import load_file

    from unclip.training import sharding

    tensors = load_file(os.path.join(folder, STATE_WEIGHTS))
    with open(os.path.join(folder, STATE_META)) as f:
        meta = json.load(f)
    sharding.load_model_state(model, {k[len("model."):]: v for k, v in tensors.items()
                                      if k.startswith("model.")})
    if ema is not None:
        sharding.load_model_state(ema.model, {k[len("ema."):]: v for k, v in tensors.items()
                                              if k.startswith("ema.")})
    if optimizer is not None and meta.get("optimizer") is not None:
        sharding.load_optimizer_state(model, optimizer,
                                      _unflatten_optimizer(tensors, meta["optimizer"]))
    return meta


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (state dict keys without the ``module.`` prefix)."""
    return model.module if hasattr(model, "module") else model
