"""Training state on disk without pickle: model, EMA and optimizer tensors in safetensors, the rest JSON.

Resume needs the optimizer state too (same step, same moments), and ``torch.save`` would make every
checkpoint a pickle. Optimizer state dicts are flattened into named tensors plus a JSON skeleton.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

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


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
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


def save_state(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               ema: EMA | None, meta: dict[str, Any]) -> None:
    """Write a resumable training state into a local folder (Ray Train then persists it)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous()
                        for k, v in ema.model.state_dict().items()})
    opt_meta = None
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
    save_file(tensors, os.path.join(folder, STATE_WEIGHTS))
    with open(os.path.join(folder, STATE_META), "w") as f:
        json.dump({**meta, "optimizer": opt_meta}, f)


def load_state(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               ema: EMA | None) -> dict[str, Any]:
    """Restore what ``save_state`` wrote; returns its JSON meta (step, epoch, metrics...)."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(folder, STATE_WEIGHTS))
    with open(os.path.join(folder, STATE_META)) as f:
        meta = json.load(f)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.model.load_state_dict({k[len("ema."):]: v for k, v in tensors.items()
                                   if k.startswith("ema.")})
    if optimizer is not None and meta.get("optimizer") is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    return meta


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (state dict keys without the ``module.`` prefix)."""
    return model.module if hasattr(model, "module") else model
