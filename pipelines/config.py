"""Hydra composition of the run configuration (the compose API: no Hydra-managed output dirs)
onto the schema of :mod:`pipelines.schema`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from unclip import storage

CONFIG_DIR = Path(os.environ.get("UNCLIP_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


class ConfigError(ValueError):
    """A bad override or value, reported in one line."""


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with the preset and command-line overrides onto the schema,
    fully resolved; an unknown key or an ill-typed value raises :class:`ConfigError` naming it."""
    from pipelines import schema

    schema.register()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(config_name="config", overrides=list(overrides))
        # Hydra adds `+key=value` overrides with the schema opened: merging onto it again refuses
        # a key it does not have
        cfg = OmegaConf.merge(schema.node(), OmegaConf.to_container(composed))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from exc
    cfg.run_dir = storage.absolute(str(cfg.run_dir))
    if cfg.data.source not in ("shapes", None):
        cfg.data.source = storage.absolute(str(cfg.data.source))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _one_line(exc: BaseException) -> str:
    """``key: what is wrong (in configs/<file>.yaml)`` from Hydra's or OmegaConf's error."""
    cause, where = exc, re.match(r"In '([^']+)'", str(exc))
    while cause is not None and not getattr(cause, "full_key", None):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return str(exc).splitlines()[0]
    msg = str(cause.msg if hasattr(cause, "msg") else cause).splitlines()[0]
    if isinstance(cause, (ConfigKeyError, AttributeError)) and "not in" in msg:
        msg = "unknown option (not in the schema, pipelines/schema/)"
    return f"{cause.full_key}: {msg}" + (f" (in configs/{where.group(1)}.yaml)" if where else "")


def to_container(cfg: DictConfig | Any) -> Any:
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def config_hash(obj: Any) -> str:
    """Stable hash of a (resolved) config subtree: key order and YAML formatting do not matter."""
    blob = json.dumps(to_container(obj), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
