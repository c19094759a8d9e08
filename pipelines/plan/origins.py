"""Each stage's effective config, and where each value came from.

The config is composed in layers, each on top of the one before: the schema alone (``default``:
the library's or pipelines/schema's dataclass default), with ``configs/<stage>/default.yaml``
(``default.yaml``), with the preset (``preset``), with the command line (``command line``). A value
comes from the highest layer that changed it; a key named on the command line comes from it.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from pipelines.config import CONFIG_DIR, load_config, to_container

_MISSING = object()
TOP = "run"  # the section of the keys outside any stage


def origins(overrides: Sequence[str] = ()) -> dict[str, list[tuple[str, Any, str]]]:
    """``{section: [(dotted key, value, origin), ...]}``, a section per stage and one for the rest."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipelines.graph import STAGES

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    presets = [o.input_line for o in parsed if o.key_or_group == "preset"]
    named = [o.key_or_group for o in parsed if o.key_or_group != "preset"]
    groups = sorted(d.name for d in CONFIG_DIR.iterdir() if d.is_dir() and d.name != "preset")
    layers = [("default", [*(f"~{g}" for g in groups), "~preset"]),
              ("default.yaml", ["~preset"]), ("preset", presets), ("command line", list(overrides))]
    configs = [(label, to_container(load_config(ov))) for label, ov in layers]
    final = configs[-1][1]
    out: dict[str, list[tuple[str, Any, str]]] = {s.name: [] for s in STAGES}
    out[TOP] = []
    for key, value in _leaves(final):
        origin = configs[0][0]
        for (_, below), (label, above) in zip(configs, configs[1:]):
            if _get(above, key) != _get(below, key):
                origin = label
        if any(key == n or key.startswith(n + ".") for n in named):
            origin = "command line"
        section, _, rest = key.partition(".")
        out[section if section in out and rest else TOP].append((rest if section in out and rest
                                                                 else key, value, origin))
    return out


def format_origins(table: dict[str, list[tuple[str, Any, str]]]) -> str:
    width = max(len(k) for rows in table.values() for k, _, _ in rows)
    values = [_show(v) for rows in table.values() for _, v, _ in rows]
    vwidth = min(28, max(len(v) for v in values))
    lines = ["effective config (origin: default = the schema's, from the library's dataclasses or "
             "pipelines/schema/; default.yaml = configs/<stage>/default.yaml; preset = "
             "configs/preset/<name>.yaml; command line):"]
    for section, rows in table.items():
        lines.append(f"[{section}]")
        lines += [f"  {k.ljust(width)}  {_show(v).ljust(vwidth)}  {o}" for k, v, o in rows]
    return "\n".join(lines)


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _get(d: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)
