"""Stage manifests: the last file a stage writes, and the only proof that it finished.

A manifest records the hash of the stage's resolved config, the digests of the upstream manifests it
read, the code version it ran, its outputs and its MLflow run. A stage is *done* when its manifest
exists and all of that still matches; otherwise it is *stale* (with reasons) or *missing*.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unclip import storage

MANIFEST_NAME = "manifest.json"
_ROOT = Path(__file__).resolve().parents[1]
_CODE_DIRS = ("unclip", "pipelines", "stages")


@dataclass
class Manifest:
    stage: str
    config_hash: str
    inputs: dict[str, str]                 # upstream stage -> digest of the manifest it read
    code_version: dict[str, Any]
    outputs: dict[str, str]                # name -> URI
    metrics: dict[str, Any] = field(default_factory=dict)
    external_inputs: Any = None            # fingerprint of inputs not produced by a stage
    mlflow_run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    duration_s: float = 0.0
    hash_version: int = 1                  # how config_hash was computed (pipelines.status)

    @property
    def digest(self) -> str:
        """Identity of this stage result; downstream manifests record it."""
        d = asdict(self)
        if d["hash_version"] == 1:  # manifests written before the field: the digest they had
            d.pop("hash_version")
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "digest": self.digest}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Manifest":
        d = {k: v for k, v in d.items() if k != "digest"}
        return cls(**d)


def manifest_uri(run_dir: str, stage: str) -> str:
    return storage.join(run_dir, stage, MANIFEST_NAME)


def read_manifest(run_dir: str, stage: str) -> Manifest | None:
    uri = manifest_uri(run_dir, stage)
    if not storage.exists(uri):
        return None
    try:
        return Manifest.from_json(storage.read_json(uri))
    except (ValueError, TypeError, KeyError):
        return None  # unreadable manifest: treat the stage as not done


def write_manifest(run_dir: str, manifest: Manifest) -> None:
    storage.write_json(manifest_uri(run_dir, manifest.stage), manifest.to_json())


_CODE_VERSION: dict[str, Any] | None = None


def code_version() -> dict[str, Any]:
    """Package version, a hash of the project's Python sources, and the git commit when known."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        from unclip import __version__

        h = hashlib.sha256()
        for d in _CODE_DIRS:
            for p in sorted((_ROOT / d).rglob("*.py")):
                h.update(str(p.relative_to(_ROOT)).encode())
                h.update(p.read_bytes())
        version: dict[str, Any] = {"package": __version__, "source_sha": h.hexdigest()[:16]}
        try:
            sha = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout.strip()
            version["git_commit"] = sha
        except (OSError, subprocess.SubprocessError):
            pass
        _CODE_VERSION = version
    return _CODE_VERSION
