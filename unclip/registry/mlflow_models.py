"""Register checkpoint folders as MLflow model versions and resolve ``models:/NAME@ALIAS`` back.

A model version's artifacts are the checkpoint folder itself (``model.safetensors`` +
``config.json``) logged through a pyfunc "model from code", so nothing is ever pickled. The alias
``champion`` moves to a new version only when its validation metric beats the current champion's;
otherwise the new version is the ``candidate``.
"""

from __future__ import annotations

import hashlib
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
        if name == checkpoint.WEIGHTS and not storage.exists(storage.join(folder, name)):
            continue  # a reference folder (a CLIP named by source and digest) has no weights
        with open(os.path.join(dst, name), "wb") as f:
            f.write(storage.read_bytes(storage.join(folder, name)))
    return dst


def register_checkpoint(folder: str, name: str, metric: float | None = None,
                        higher_is_better: bool = True, alias: str | None = None,
                        tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Log ``folder`` as a model version of ``name`` in the active run; returns (version, alias).

    ``alias`` given: the new version takes it whatever the metrics (imported models, which have
    none, go where they are asked to); otherwise champion or candidate as described above.
    ``tags`` are set on the new version."""
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
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
        return version, alias
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


def default_cache_dir() -> str:
    return os.environ.get("UNCLIP_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "unclip",
                                                          "models"))


def _version_of(uri: str) -> tuple[str, str]:
    """(name, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow import MlflowClient

    ref = uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
    name, _, version = ref.partition("/")
    if not version.isdigit():
        raise LookupError(f"model URI {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, version


def pinned_uri(uri: str) -> str:
    """``models:/NAME/VERSION`` for ``models:/NAME@ALIAS`` (an alias moves; a version does not)."""
    import mlflow

    try:
        name, version = _version_of(uri)
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"model {uri} not found in {mlflow.get_tracking_uri()}: "
                          f"{str(exc).splitlines()[0]}") from None
    return f"models:/{name}/{version}"


def resolve_checkpoint(uri: str, cache_dir: str | None = None) -> str:
    """A checkpoint folder for ``uri``: ``models:/NAME@ALIAS`` (or ``/VERSION``) is resolved to its
    version, downloaded once and cached under ``cache_dir/NAME/VERSION`` (an alias that moves to a
    new version downloads that one); anything else is returned as it is (a folder URI)."""
    if not uri.startswith("models:/"):
        return uri
    import mlflow

    try:
        name, version = _version_of(uri)
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"model {uri} not found in {mlflow.get_tracking_uri()}: "
                          f"{str(exc).splitlines()[0]}") from None
    # the store is part of the key: two stores may both hold a version 1 of the same name
    store = hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:8]
    target = os.path.join(cache_dir or default_cache_dir(), store, name, version)
    found = sorted(Path(target).glob(f"artifacts/*/{checkpoint.CONFIG}"))
    if found:
        return str(found[0].parent)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{version}-")
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
        if not sorted(Path(tmp).glob(f"artifacts/*/{checkpoint.CONFIG}")):
            raise LookupError(f"model {uri} holds no unclip checkpoint")
        try:
            os.replace(tmp, target)  # atomic: a concurrent reader sees all of it or nothing
        except OSError:
            pass  # another process cached it first
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"model {uri} could not be downloaded from {mlflow.get_tracking_uri()}: "
                          f"{str(exc).splitlines()[0]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # MLflow keeps the logged folder's own name under artifacts/
    return str(sorted(Path(target).glob(f"artifacts/*/{checkpoint.CONFIG}"))[0].parent)
