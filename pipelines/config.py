"""Hydra composition of the run configuration (the compose API: no Hydra-managed output dirs)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from unclip import storage

CONFIG_DIR = Path(os.environ.get("UNCLIP_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


class ConfigError(ValueError):
    """A bad override or value, reported in one line."""


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with the preset and command-line overrides, fully resolved."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from exc
    OmegaConf.resolve(cfg)
    cfg.run_dir = storage.absolute(str(cfg.run_dir))
    if cfg.data.source not in ("shapes", None):
        cfg.data.source = storage.absolute(str(cfg.data.source))
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_container(cfg: DictConfig | Any) -> Any:
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def config_hash(obj: Any) -> str:
    """Stable hash of a (resolved) config subtree: key order and YAML formatting do not matter."""
    blob = json.dumps(to_container(obj), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
