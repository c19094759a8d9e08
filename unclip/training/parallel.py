"""Data-parallel checks and waits that every training loop shares, torch.distributed only.

A data-parallel run can be wrong silently: every rank reading the same shard, or drawing the same
noise, or drifting apart in weights still trains and logs a loss. ``DataParallelProbe`` records, at
the first step a worker trains and at its end, how many distinct batches, noise states and weight
checksums the ranks hold; the numbers travel with the metrics into the checkpoint and the manifest,
so a test (or a person) reads them off one run. Costs two small all-gathers per run.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import numpy as np
import torch


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (just ``[obj]`` without a process group)."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def wait_for_main(timeout_s: float, what: str) -> None:
    """Every rank waits here while rank 0 does ``what`` (an evaluation): a barrier bounded by
    ``timeout_s``, so a stuck rank 0 ends the run with a message naming the setting instead of the
    others sitting in their next all-reduce until the process group's default timeout."""
    import torch.distributed as dist

    _, size = world()
    if size == 1:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=float(timeout_s)),
                                   wait_all_ranks=True)
        else:  # NCCL: the barrier is bounded by the process group's timeout (set from the same key)
            dist.barrier()
    except RuntimeError as exc:
        raise TimeoutError(f"ranks waited more than {timeout_s:g} s for rank 0's {what} "
                           f"(ray.collective_timeout_s): {str(exc).splitlines()[0][:200]}") from exc


def fingerprint(obj: Any) -> str:
    """A digest of a batch (dicts, sequences, arrays, tensors, strings), to tell ranks' data apart."""
    h = hashlib.sha1()

    def feed(o: Any) -> None:
        if isinstance(o, dict):
            for k in sorted(o):
                h.update(str(k).encode())
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                feed(v)
        elif torch.is_tensor(o):
            h.update(o.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, np.ndarray):
            h.update(o.tobytes() if o.dtype != object else repr(o.tolist()).encode())
        else:
            h.update(repr(o).encode())

    feed(obj)
    return h.hexdigest()


def noise_state(generator: torch.Generator | None) -> str:
    """Digest of the state the step's noise is drawn from: ``generator``, else torch's defaults."""
    if generator is not None:
        return fingerprint(generator.get_state())
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return fingerprint(states)


@torch.no_grad()
def weights_checksum(model: torch.nn.Module) -> str:
    """Digest of every parameter and buffer, computed where they live (bit-identical weights give
    the same digest; no copy of a large model to the host). An FSDP-sharded parameter is gathered
    first, one at a time (a collective: every rank calls this), so the digest is the whole model's."""
    from unclip.training.sharding import full_tensor

    def parts(t: torch.Tensor) -> torch.Tensor:
        t = full_tensor(t.detach()).double()
        weighted = (t * torch.arange(t.numel(), device=t.device, dtype=torch.float64).view(t.shape)
                    ).sum() if t.numel() else t.new_zeros((), dtype=torch.float64)
        return torch.stack([t.sum(), t.abs().sum(), weighted])

    sums = [parts(t) for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    return fingerprint(torch.stack(sums).cpu() if sums else torch.zeros(0))


class DataParallelProbe:
    """``dp_*`` metrics: ranks, and distinct first batches / noise states / weights among them."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self._pending: tuple[str, str] | None = None

    def before_first_step(self, batch: Any, generator: torch.Generator | None) -> None:
        if self._pending is None and not self.metrics:
            self._pending = (fingerprint(batch), noise_state(generator))

    def after_first_step(self, model: torch.nn.Module) -> None:
        if self._pending is None:
            return
        data, noise = self._pending
        self._pending = None
        rows = gather((data, noise, weights_checksum(model)))
        self.metrics = {"dp_world_size": float(len(rows)),
                        "dp_distinct_batches": float(len({r[0] for r in rows})),
                        "dp_distinct_noise": float(len({r[1] for r in rows})),
                        "dp_distinct_weights": float(len({r[2] for r in rows}))}

    def at_end(self, model: torch.nn.Module, ema_model: torch.nn.Module | None) -> dict[str, float]:
        rows = gather((weights_checksum(model),
                       weights_checksum(ema_model) if ema_model is not None else ""))
        return {**self.metrics, "dp_distinct_weights_final": float(len({r[0] for r in rows})),
                "dp_distinct_ema_final": float(len({r[1] for r in rows}))}
