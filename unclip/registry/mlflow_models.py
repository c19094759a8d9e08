"""Register checkpoint folders as MLflow model versions and resolve ``models:/NAME@ALIAS`` back.

A model version's artifacts are the checkpoint folder itself (``model.safetensors`` +
``config.json``) logged through a pyfunc "model from code", so nothing is ever pickled. The alias
``champion`` moves to a new version only when its validation metric beats the current champion's;
otherwise the new version is the ``candidate``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

from unclip import checkpoint, storage

METRIC_TAG = "unclip.metric"
CHAMPION, CANDIDATE = "champion", "candidate"


def _local_copy(folder: str, into: str) -> str:
    """MLflow logs local files: stage a remote checkpoint folder on local disk first."""
    if not storage.is_remote(folder):
        return folder
    dst = os.path.join(into, "checkpoint")
    os.makedirs(dst)
    for name in (checkpoint.WEIGHTS, checkpoint.CONFIG):
        with open(os.path.join(dst, name), "wb") as f:
            f.write(storage.read_bytes(storage.join(folder, name)))
    return dst


def register_checkpoint(folder: str, name: str, metric: float | None = None,
                        higher_is_better: bool = True) -> tuple[str, str]:
    """Log ``folder`` as a model version of ``name`` in the active run; returns (version, alias)."""
    import mlflow
    from mlflow import MlflowClient

    checkpoint.read_config(folder)  # refuse to register something that is not a checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_copy(folder, tmp)
        with warnings.catch_warnings():  # "add type hints to predict": there is no data to validate
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"checkpoint": local},
                registered_model_name=name,
                pip_requirements=[],
            )
    version = str(info.registered_model_version)
    client = MlflowClient()
    if metric is not None:
        client.set_model_version_tag(name, version, METRIC_TAG, str(metric))
    alias = CHAMPION
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
        best = champ.tags.get(METRIC_TAG)
        if metric is not None and best is not None:
            better = metric > float(best) if higher_is_better else metric < float(best)
            alias = CHAMPION if better else CANDIDATE
        else:
            alias = CANDIDATE
    except mlflow.exceptions.MlflowException:
        pass  # no champion yet
    client.set_registered_model_alias(name, alias, version)
    return version, alias


def resolve_checkpoint(uri: str, cache_dir: str | None = None) -> str:
    """A checkpoint folder for ``uri``: ``models:/NAME@ALIAS`` (or ``/VERSION``) is downloaded and
    cached; anything else is returned as it is (a folder URI)."""
    if not uri.startswith("models:/"):
        return uri
    import mlflow

    cache = cache_dir or os.path.join(tempfile.gettempdir(), "unclip-models")
    os.makedirs(cache, exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(dir=cache))
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"model {uri} not found in {mlflow.get_tracking_uri()}: "
                          f"{str(exc).splitlines()[0]}") from None
    # MLflow keeps the logged folder's own name under artifacts/
    found = sorted(Path(path, "artifacts").glob(f"*/{checkpoint.CONFIG}"))
    if not found:
        shutil.rmtree(path, ignore_errors=True)
        raise LookupError(f"model {uri} holds no unclip checkpoint")
    return str(found[0].parent)
