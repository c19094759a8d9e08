"""Key and type checks of a composed config against the defaults in ``configs/``.

A preset or a ``+key=value`` override may add any key, and most stages read only the keys they know,
so a typo (``decoder.train.totl_steps``) would be silently ignored and a string where a number
belongs (``filter.min_side=abc``) would fail hours later inside a Ray worker. Here every key must
exist in the defaults (composed without a preset) and hold a value of the default's type.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from pipelines.config import ConfigError, load_config, to_container

# Subtrees whose keys the model's own ``from_dict`` validates: it knows options the defaults leave
# out, and its error names the unknown key. Keys the defaults do have are still type-checked.
OPEN = ("clip.model", "prior.*.model", "prior.diffusion.process", "decoder.model", "decoder.diffusion",
        "upsample?.model", "upsample?.diffusion")
# Keys a stage reads beyond its defaults (documented in its config comments), with their type.
EXTRA: dict[str, Any] = {}
# String options with a fixed set of values (the consumers check them only at run time).
CHOICES: dict[str, tuple[str, ...]] = {
    "*.train.lr_schedule": ("constant", "cosine"),
    "*.train.amp": ("auto", "bf16", "fp16", "off"),
    "*.sampling.sampler": ("ddpm", "ddim", "dpm"),
    "evaluate.decoder_sampler": ("ddpm", "ddim", "dpm"),
    "prior.kind": ("diffusion", "autoregressive"),
    "*.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),  # diffusers DDPM
    "upsample?.kind": ("blur", "bsr"),
}


def defaults() -> dict[str, Any]:
    """``configs/`` composed without a preset: the schema every preset and override must fit."""
    return to_container(load_config(["~preset"]))


def check(cfg: Any, schema: dict[str, Any] | None = None) -> None:
    """Raise one :class:`ConfigError` line naming every unknown key and badly typed value."""
    problems = _walk(to_container(cfg), defaults() if schema is None else schema, "")
    if problems:
        raise ConfigError("; ".join(problems))


def _walk(value: Any, default: Any, path: str) -> list[str]:
    if isinstance(default, dict) and isinstance(value, dict):
        out = []
        for key, v in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in default:
                out += _walk(v, default[key], sub)
            elif sub in EXTRA:
                out += _walk(v, EXTRA[sub], sub)
            elif not any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*")
                         for p in OPEN):
                out.append(f"{sub}: unknown option (no such key in configs/)")
        return out
    problem = _type_problem(value, default)
    if problem:
        return [f"{path}: {problem}"]
    for pattern, choices in CHOICES.items():
        if fnmatch.fnmatchcase(path, pattern) and value is not None and value not in choices:
            return [f"{path}: {value!r} is not one of {', '.join(choices)}"]
    return []


def _type_problem(value: Any, default: Any) -> str | None:
    """Why ``value`` cannot stand where the defaults have ``default``; None when it can."""
    if default is None or value is None:  # no type to hold it to; null switches an option off
        return None
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):  # a name or a rule (embed_scale: sqrt_dim | 17.2): any scalar
        ok, want = not isinstance(value, (list, dict)), "a single value"
    elif isinstance(default, list):
        if not isinstance(value, list):
            return f"expected a list like the default {default}, got {value!r}"
        if default and all(type(d) is type(default[0]) for d in default):
            bad = [v for v in value if _type_problem(v, default[0])]
            if bad:
                return f"expected a list of {type(default[0]).__name__} like {default}, got {value}"
        return None
    elif isinstance(default, dict):
        ok, want = isinstance(value, dict), "a mapping"
    else:
        return None
    return None if ok else f"expected {want} (default {default!r}), got {value!r}"
