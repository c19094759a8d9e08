"""Register checkpoint folders as MLflow model versions and resolve ``models:/NAME@ALIAS`` back.

A model version's artifacts are the checkpoint folder itself (``model.safetensors`` +
``config.json``) logged through a pyfunc "model from code", so nothing is ever pickled; models that
read captions (prior, decoder) carry their CLIP's folder beside it, so that their ``predict`` does
their job (:mod:`unclip.registry.predict`). The cascade ``unclip`` (:func:`register_cascade`) holds
only a JSON naming its stage models by version. The alias
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


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _local_copy(folder: str, into: str, name: str = "checkpoint") -> str:
    """MLflow logs local files under their folder's own name: stage ``folder`` as ``into/name``.
    A local folder comes whole (hard links where the file system allows, else copies: an imported
    CLIP holds its tokenizer and image processor beside the weights); a remote one is read file by
    file (weights and config)."""
    dst = os.path.join(into, name)
    if not storage.is_remote(folder):
        shutil.copytree(folder, dst, copy_function=_link_or_copy)
        return dst
    os.makedirs(dst)
    for fname in (checkpoint.WEIGHTS, checkpoint.CONFIG):
        src = storage.join(folder, fname)
        if fname == checkpoint.WEIGHTS and not storage.exists(src):
            continue  # a reference folder (a CLIP named by source and digest) has no weights
        with open(os.path.join(dst, fname), "wb") as f:
            f.write(storage.read_bytes(src))
    return dst


def register_checkpoint(folder: str, name: str, metric: float | None = None,
                        higher_is_better: bool = True, alias: str | None = None,
                        tags: dict[str, str] | None = None,
                        clip: str | None = None) -> tuple[str, str]:
    """Log ``folder`` as a model version of ``name`` in the active run; returns (version, alias).

    ``alias`` given: the new version takes it whatever the metrics (imported models, which have
    none, go where they are asked to); otherwise champion or candidate as described above.
    ``tags`` are set on the new version. ``clip``: the CLIP checkpoint folder a prior or decoder
    reads captions with, logged beside it for its ``predict``."""
    from unclip.registry.predict import STAGE_OF_KIND, signature

    kind = checkpoint.read_config(folder).get("kind")  # refuse what is not a checkpoint
    stage = STAGE_OF_KIND.get(str(kind))
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"checkpoint": _local_copy(folder, tmp, "checkpoint")}
        if clip is not None:
            artifacts["clip"] = _local_copy(clip, tmp, "clip")
        version = _log(name, artifacts, signature(stage) if stage else None)
    return version, _set_alias(name, version, metric, higher_is_better, alias, tags)


def register_cascade(models: dict[str, str | None], name: str = "unclip", metric: float | None = None,
                     higher_is_better: bool = True, alias: str | None = None,
                     tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Register the whole cascade as ``name``: its only artifact is ``cascade.json`` naming each
    stage model (clip, prior, decoder, upsampler1, upsampler2, pca) by ``models:/NAME/VERSION``
    (an alias given is pinned to its version now), so ``models:/unclip@champion`` generates with
    exactly the models it was registered with. Returns (version, alias) as
    :func:`register_checkpoint`."""
    import json

    import mlflow

    from unclip import __version__
    from unclip.registry.predict import CASCADE_FILE, CASCADE_KIND, signature

    missing = [k for k in ("clip", "prior", "decoder") if not models.get(k)]
    if missing:
        raise ValueError(f"register_cascade: no {', '.join(missing)} model given")
    pinned = {k: (pinned_uri(v) if v and v.startswith("models:/") else v) for k, v in models.items()}
    spec = {"kind": CASCADE_KIND, "models": pinned, "unclip_version": __version__,
            "tracking_uri": mlflow.get_tracking_uri()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "cascade")
        os.makedirs(folder)
        with open(os.path.join(folder, CASCADE_FILE), "w") as f:
            json.dump(spec, f, indent=1)
        version = _log(name, {"cascade": folder}, signature(CASCADE_KIND))
    tags = {**{f"unclip.model.{k}": v for k, v in pinned.items() if v}, **(tags or {})}
    return version, _set_alias(name, version, metric, higher_is_better, alias, tags)


def _log(name: str, artifacts: dict[str, str], signature) -> str:
    import mlflow

    with warnings.catch_warnings():  # "add type hints to predict": the signature says it
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts=artifacts,
            registered_model_name=name,
            signature=signature,
            pip_requirements=[],
        )
    return str(info.registered_model_version)


def _set_alias(name: str, version: str, metric: float | None, higher_is_better: bool,
               alias: str | None, tags: dict[str, str] | None) -> str:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    if metric is not None:
        client.set_model_version_tag(name, version, METRIC_TAG, str(metric))
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
        return alias
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
    return alias


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
    found = _checkpoint_in(target)
    if found:
        return found
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{version}-")
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
        if not _checkpoint_in(tmp):
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
    return _checkpoint_in(target)


def _checkpoint_in(downloaded: str) -> str | None:
    """The checkpoint folder of a downloaded model version. MLflow keeps each logged folder's
    own name under artifacts/: ``checkpoint`` now (beside ``clip``), whatever the stage's folder
    was called in versions registered before that."""
    own = Path(downloaded, "artifacts", "checkpoint", checkpoint.CONFIG)
    if own.exists():
        return str(own.parent)
    found = sorted(Path(downloaded).glob(f"artifacts/*/{checkpoint.CONFIG}"))
    return str(found[0].parent) if found else None
