"""Random draws from one generator, or one generator per batch row.

A list of generators (one per row, a generator repeated for every row it owns) makes each row's
draws independent of the rows beside it: a served request batched with others gets the images
it gets alone. diffusers' schedulers take the same list (``randn_tensor`` draws row by row)."""

from __future__ import annotations

from typing import Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def _rows(generator: Sequence[torch.Generator], n: int) -> list[torch.Generator]:
    gens = list(generator)
    if len(gens) != n:
        raise ValueError(f"{len(gens)} generators for a batch of {n} rows")
    return gens


def per_row(generator: Generators) -> bool:
    return generator is not None and not isinstance(generator, torch.Generator)


def randn(shape: Sequence[int], generator: Generators = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.randn(shape)`` on the CPU; with a list, row i from ``generator[i]``."""
    shape = tuple(int(s) for s in shape)
    if not per_row(generator):
        return torch.randn(shape, generator=generator, device="cpu", dtype=dtype)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device="cpu", dtype=dtype)
                      for g in _rows(generator, shape[0])])


def randint(low: int, high: int, n: int, generator: Generators = None) -> torch.Tensor:
    """``n`` integers in [low, high); with a list, integer i from ``generator[i]``."""
    if not per_row(generator):
        return torch.randint(low, high, (n,), generator=generator)
    return torch.cat([torch.randint(low, high, (1,), generator=g) for g in _rows(generator, n)])


def multinomial(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One index per row of ``probs`` (B, K) on the CPU; with a list, row i from ``generator[i]``."""
    probs = probs.cpu()
    if not per_row(generator):
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return torch.cat([torch.multinomial(p[None], 1, generator=g)[:, 0]
                      for p, g in zip(probs, _rows(generator, probs.shape[0]))])


def repeat_rows(generator: Generators, k: int) -> Generators:
    """The generators of a batch whose rows are each repeated ``k`` times (``repeat_interleave``)."""
    if not per_row(generator):
        return generator
    return [g for g in generator for _ in range(k)]
