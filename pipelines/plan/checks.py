"""Range checks of a composed config, before any stage runs.

Composition (:func:`pipelines.config.load_config`) already refuses an unknown key and an ill-typed
value. What a type cannot say is checked here: every schema field's bounds (positive steps,
probabilities in [0, 1], choices; declared beside each default with :func:`unclip.options.option`)
and the library's cross-field rules that need no model (widths divisible by heads and norm groups,
residual upsamplers with x0-prediction, degradation ranges). :mod:`pipelines.plan.models` then
builds every model on the meta device for the rules that need the CLIP's dimensions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from pipelines.config import ConfigError, to_container
from unclip.options import bounds_of


def check(cfg: DictConfig) -> None:
    """Raise one :class:`ConfigError` line naming every value out of its range."""
    problems = list(_bounds(cfg, "")) + _holdout_overrides(cfg)
    if not problems:  # the cross-field rules assume each value is in range
        problems = [p for key, rule in _rules(cfg) if (p := _named(key, rule))]
    if problems:
        raise ConfigError("; ".join(problems))


HOLDOUT_KEYS = ("clip.train.holdout_fraction", "prior.holdout_fraction", "decoder.holdout_fraction",
                "upsample1.holdout_fraction", "upsample2.holdout_fraction", "evaluate.holdout_fraction")


def _holdout_overrides(cfg: DictConfig) -> list[str]:
    """Every stage must hold out the same keys: a stage's own holdout_fraction may only follow the
    top-level one (a different value would train one stage on another's held-out samples)."""
    top = OmegaConf.select(cfg, "holdout_fraction")
    return [f"{key}={value} differs from holdout_fraction={top}: set holdout_fraction, the one "
            f"held-out split of every stage" for key in HOLDOUT_KEYS
            if (value := OmegaConf.select(cfg, key)) is not None and value != top]


def _bounds(node: Any, path: str):
    if not isinstance(node, DictConfig):
        return
    kind = OmegaConf.get_type(node)
    bounded = {f.name: bounds_of(f) for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else {}
    for key in node:
        sub = f"{path}.{key}" if path else str(key)
        b = bounded.get(key)
        why = b.problem(to_container(node[key])) if b else None
        if why:
            yield f"{sub}: {why}"
        yield from _bounds(node[key], sub)


def _named(key: str, rule: Callable[[], Any]) -> str | None:
    try:
        rule()
    except (ValueError, TypeError) as exc:
        return f"{key}: {str(exc.args[0] if exc.args else exc).splitlines()[0]}"
    return None


def _rules(cfg: DictConfig) -> list[tuple[str, Callable[[], Any]]]:
    """(key, check) pairs of the library's cross-field rules."""
    from unclip.data.degradations import config_for
    from unclip.models.decoder import DecoderConfig
    from unclip.models.prior import resolve_embed_scale
    from unclip.models.transformer import check_heads
    from unclip.models.upsampler import build_config

    d = cfg.decoder
    decoder = {**to_container(d.model), "resolution": d.resolution, "use_caption": d.use_caption,
               "learn_variance": d.diffusion.learn_variance}
    rules: list[tuple[str, Callable[[], Any]]] = [
        ("decoder.model", lambda: DecoderConfig.from_dict(decoder).validate()),
        ("prior.diffusion", lambda: resolve_embed_scale(cfg.prior.diffusion.embed_scale, 1, 1.0)),
    ]
    for kind in ("diffusion", "autoregressive"):
        m = cfg.prior[kind].model
        rules.append((f"prior.{kind}.model", lambda m=m: check_heads(m.width, m.heads)))
    for name in ("upsample1", "upsample2"):
        c = cfg[name]
        model = {**to_container(c.model), "scale": c.scale, "kind": c.kind,
                 "diffusion": to_container(c.diffusion), **to_container(c.sampling)}
        rules += [(f"{name}.model", lambda model=model: build_config(model)),
                  (f"{name}.degradation", lambda c=c: config_for(c.kind, to_container(c.degradation)))]
    return rules

