"""Security defaults: checkpoints are never unpickled, services listen on loopback by default."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml

from unclip import checkpoint
from unclip.training.state import EMA, load_state, save_state

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _crafted(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Payload(str(marker))}))


def test_crafted_pickle_checkpoint_is_rejected(tmp_path):
    folder = tmp_path / "ckpt"
    checkpoint.save(str(folder), {"w": torch.ones(2)}, "decoder", {"a": 1})
    marker = tmp_path / "pwned"
    _crafted(folder / checkpoint.WEIGHTS, marker)
    with pytest.raises(checkpoint.CheckpointError, match="not a safetensors file"):
        checkpoint.load(str(folder), "decoder")
    assert not marker.exists()
    # a torch.save zip archive (pickle inside) is refused just the same
    torch.save({"w": torch.ones(2)}, folder / checkpoint.WEIGHTS)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(str(folder), "decoder")


def test_crafted_pickle_training_state_is_rejected(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_state(str(tmp_path), model, torch.optim.AdamW(model.parameters()), EMA(model, 0.9), {"step": 3})
    marker = tmp_path / "pwned"
    _crafted(tmp_path / "state.safetensors", marker)
    with pytest.raises(Exception) as info:
        load_state(str(tmp_path), model, None, None)
    assert "safetensors" in str(info.value).lower() or "header" in str(info.value).lower()
    assert not marker.exists()


def test_no_code_path_unpickles_models():
    """No torch.load / pickle.load in the project's own code: every weight goes through safetensors."""
    offenders = []
    for path in [*ROOT.glob("unclip/**/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("pipelines/*.py")]:
        text = path.read_text()
        for needle in ("torch.load(", "pickle.load", "pickle.loads", "cloudpickle.load"):
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []


def test_services_bind_loopback_by_default():
    """MLflow and Ray listen on 127.0.0.1 unless the operator deliberately opens them."""
    from pipelines.runtime import ensure_ray  # noqa: F401  (the embedded Ray: see runtime.py)

    runtime = (ROOT / "pipelines" / "runtime.py").read_text()
    assert "include_dashboard=False" in runtime  # no HTTP job API on the embedded Ray
    import re

    compose = yaml.safe_load((ROOT / "infra" / "mlflow" / "docker-compose.yml").read_text())
    published = [str(p) for svc in compose["services"].values() for p in svc.get("ports", [])]
    # "${MLFLOW_BIND_ADDRESS:-127.0.0.1}:5000:5000" -> its default
    defaults = [re.sub(r"^\$\{[A-Z_]+:-([^}]*)\}", r"\1", p) for p in published]
    assert defaults and all(p.startswith("127.0.0.1:") for p in defaults), published
    makefile = (ROOT / "Makefile").read_text()
    ui = [line for line in makefile.splitlines() if "mlflow ui" in line or "mlflow server" in line]
    assert ui and all("--host 127.0.0.1" in line for line in ui)
    # the VM cluster launcher keeps the dashboard (job API) on the head's loopback (ssh tunnel)
    assert "--dashboard-host=127.0.0.1" in (ROOT / "infra" / "ray" / "cluster.yaml").read_text()
