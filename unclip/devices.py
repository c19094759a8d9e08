"""Moving data to a model's device and results back: the one rule every path that feeds a model uses.

A model may sit on the CPU, a GPU or the ``meta`` device (shapes only: ``make plan`` and the
device tests build models there). Inputs are built on the CPU (tokenizers, image transforms,
NumPy rows), so each call moves them to :func:`model_device` with :func:`to_device`, and results
come back with :func:`to_host` / :func:`to_numpy` before anything NumPy touches them.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(data: T, device: torch.device | str, dtype: torch.dtype | None = None) -> T:
    """``data`` with every tensor (and NumPy array) moved to ``device``, through dicts, lists and
    tuples; ``dtype`` casts floating-point tensors only (masks and token ids keep theirs)."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if isinstance(data, torch.Tensor):
        cast = dtype if dtype is not None and data.is_floating_point() else None
        return data.to(device=device, dtype=cast)
    if isinstance(data, dict):
        return type(data)((k, to_device(v, device, dtype)) for k, v in data.items())
    if isinstance(data, (list, tuple)) and not isinstance(data, str):
        moved = [to_device(v, device, dtype) for v in data]
        return type(data)(*moved) if hasattr(data, "_fields") else type(data)(moved)
    return data


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy. A ``meta`` tensor has no values: it comes back as zeros of its shape
    and dtype, so shape-only runs go through the same code as real ones."""
    tensor = tensor.detach()
    if tensor.device.type == "meta":
        return torch.zeros(tensor.shape, dtype=tensor.dtype)
    return tensor.cpu()


def to_numpy(tensor: torch.Tensor, dtype: Any = None) -> np.ndarray:
    """:func:`to_host`, then NumPy (bfloat16 has no NumPy type: it goes through float32)."""
    host = to_host(tensor)
    if host.dtype == torch.bfloat16:
        host = host.float()
    out = host.numpy()
    return out if dtype is None else out.astype(dtype, copy=False)
