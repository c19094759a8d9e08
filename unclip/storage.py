"""fsspec-backed storage: every path in the project is a URI (local path or ``s3://``).

Stages never call ``open``/``os`` on their inputs or outputs directly, so the same code runs against
a local run directory and an object store. Writes are whole-object (S3 semantics): a file is either
absent or complete, which is what resume relies on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import posixpath
import time
import uuid
from typing import Any, Callable, Iterable, TypeVar

import fsspec
from fsspec.core import url_to_fs


log = logging.getLogger("unclip")
T = TypeVar("T")


class StorageError(OSError):
    """A storage operation that kept failing; the message names the URI, the operation and why."""


# Not worth retrying: the object or permission is really missing, or the caller passed garbage.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              FileExistsError, ValueError, TypeError)


def _attempts() -> int:
    return max(1, int(os.environ.get("UNCLIP_STORAGE_ATTEMPTS", "5")))


def retrying(op: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Retry a remote operation with exponential backoff, then fail with one clear error.

    Object stores drop connections, throttle and briefly go away; a long training run must not die
    on the first hiccup, nor hang forever on an endpoint that is down. Local paths are not retried.
    """
    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(uri: str, *args: Any, **kwargs: Any) -> T:
            if not is_remote(uri):
                return fn(uri, *args, **kwargs)
            attempts, delay = _attempts(), float(os.environ.get("UNCLIP_STORAGE_BACKOFF_S", "1.0"))
            for attempt in range(1, attempts + 1):
                try:
                    return fn(uri, *args, **kwargs)
                except _PERMANENT:
                    raise
                except Exception as exc:  # botocore/aiohttp errors are not all OSErrors
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    if attempt == attempts:
                        raise StorageError(f"{op} {uri} failed after {attempts} attempts: {reason}. "
                                           f"Check the endpoint (AWS_ENDPOINT_URL), credentials "
                                           f"and network, then re-run: finished stages are kept."
                                           ) from exc
                    log.warning("%s %s failed (%s); retry %d/%d in %.1f s", op, uri, reason,
                                attempt, attempts - 1, delay)
                    with contextlib.suppress(Exception):
                        get_fs(uri)[0].invalidate_cache()
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
            raise AssertionError("unreachable")
        return inner
    return wrap


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path-within-it). Credentials and endpoints come from the environment."""
    fs, path = url_to_fs(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def absolute(uri: str) -> str:
    """Local paths become absolute so they survive a change of working directory (Ray workers)."""
    if is_remote(uri):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return os.path.abspath(os.path.expanduser(uri))


@retrying("checking")
def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = get_fs(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


@retrying("removing")
def remove(uri: str) -> None:
    """Remove a file or a whole tree; absent is fine."""
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if is_remote(uri):
        fs.invalidate_cache()


@retrying("listing")
def list_files(uri: str, suffix: str | tuple[str, ...] = "") -> list[str]:
    """Files directly under ``uri`` whose name ends with ``suffix``, as full URIs, sorted."""
    fs, path = get_fs(uri)
    if not fs.exists(path):
        return []
    fs.invalidate_cache()
    out = []
    for info in fs.ls(path, detail=True):
        if info.get("type") != "file":
            continue
        name = posixpath.basename(info["name"].rstrip("/"))
        if name.endswith(suffix):
            out.append(join(uri, name))
    return sorted(out)


@retrying("inspecting")
def file_info(uri: str) -> dict[str, Any]:
    fs, path = get_fs(uri)
    info = fs.info(path)
    return {"size": int(info.get("size") or 0), **({"etag": info["ETag"]} if "ETag" in info else {})}


@retrying("reading")
def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


@retrying("writing")
def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; on local disk through a temporary name and an atomic rename."""
    with open_atomic(uri) as f:
        f.write(data)


@contextlib.contextmanager
def open_atomic(uri: str):
    """A writable binary stream whose object appears only once the block exits cleanly.

    Local files go through a temporary name and ``os.replace``; on S3 an object becomes visible only
    when its (multipart) upload completes, so a killed writer leaves nothing behind either way.
    """
    fs, path = get_fs(uri)
    if is_remote(uri):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # abort the multipart upload: nothing becomes visible
            raise
        f.close()
        return
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def fingerprint(uris: Iterable[str]) -> list[dict[str, Any]]:
    """Name and size (and ETag on S3) of each file: cheap identity of inputs we did not write."""
    return [{"name": basename(u), **file_info(u)} for u in uris]
