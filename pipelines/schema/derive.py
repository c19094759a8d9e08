"""Stage schemas from the library's dataclasses: the fields a stage exposes, with the library's
types, defaults and bounds, so that a model default is written once, in the library."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Iterable

from omegaconf import II, DictConfig, OmegaConf

# Metadata of a field the schema added to a stage subtree that existed before it: left out of the
# stage's config hash while at its default, so a run directory written before still resumes.
ADDED = "pipelines.added"
# unclip.training.sharding.ShardingConfig's keys in every training stage's ``train``: added after
# the schema, and operational (pipelines.graph) as well, since neither changes the result.
SHARDING = ("parallel", "activation_checkpointing")


def derive(cls: type, name: str, *, exclude: Iterable[str] = (), only: Iterable[str] | None = None,
           added: Iterable[str] = ()) -> type:
    """A mutable dataclass named ``name`` with ``cls``'s fields (all, ``only`` these, less
    ``exclude``: the ones the stage sets itself); ``added`` fields are marked :data:`ADDED`."""
    hints = typing.get_type_hints(cls)
    keep = set(only) if only is not None else None
    exclude, added = set(exclude), set(added)
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in exclude or (keep is not None and f.name not in keep):
            continue
        meta = {**f.metadata, ADDED: True} if f.name in added else dict(f.metadata)
        specs.append((f.name, hints[f.name],
                      dataclasses.field(default=f.default, default_factory=f.default_factory,
                                        metadata=meta)))
    unknown = (added | exclude | (keep or set())) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return dataclasses.make_dataclass(name, specs)


def added(f: dataclasses.Field) -> dataclasses.Field:
    """``f`` (e.g. an :func:`unclip.options.option`) marked :data:`ADDED`."""
    return dataclasses.field(default=f.default, default_factory=f.default_factory,
                             metadata={**f.metadata, ADDED: True})


def combine(name: str, *parts: type, doc: str | None = None) -> type:
    """A mutable dataclass named ``name`` with the fields of ``parts``, in this order: a subtree
    keeps the key order its YAML had (the hash of manifests written before hash version 2
    depends on it)."""
    specs = []
    for part in parts:
        hints = typing.get_type_hints(part)
        specs += [(f.name, hints[f.name],
                   dataclasses.field(default=f.default, default_factory=f.default_factory,
                                     metadata=f.metadata)) for f in dataclasses.fields(part)]
    cls = dataclasses.make_dataclass(name, specs)
    cls.__doc__ = doc or cls.__doc__
    return cls


@dataclass
class Seed:
    """A stage's seed: the run's, unless set."""

    seed: int = II("seed")


def without_added_defaults(node: Any) -> Any:
    """``node`` as a container, less the :data:`ADDED` keys that still hold their default: what
    its stage hashed before those keys existed."""
    value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    _strip(node, value)
    return value


def _strip(node: Any, value: Any) -> None:
    if not isinstance(node, DictConfig) or not isinstance(value, dict):
        return
    kind = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(kind):
        for f in dataclasses.fields(kind):
            if f.metadata.get(ADDED) and f.name in value and value[f.name] == _default(f):
                del value[f.name]
    for key, sub in value.items():
        _strip(node[key], sub)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
