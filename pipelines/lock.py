"""One run at a time on a run directory: a lock held for as long as ``pipelines run`` / ``stage`` lives.

Two runs on one directory would train the same stages side by side and restore each other's
checkpoints. The lock is ``run_dir/.lock``:

* on local disk an OS file lock (``flock``): the kernel releases it when the process ends, however
  it ends, so a killed run never leaves a stale lock behind;
* on ``s3://`` an object created with a conditional put (``If-None-Match: *``) naming host, pid and
  start time, refreshed every ``refresh_s`` by a conditional overwrite (``If-Match`` its ETag).
  A second run is refused while the lock is fresh; one not refreshed for ``stale_after_s`` (or
  held by a process of this host that no longer exists) is taken over, again conditionally, so
  two runs taking over at once cannot both win.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Iterator

from pipelines.executor import StageError
from unclip import storage

log = logging.getLogger("unclip")
LOCK_NAME = ".lock"


class RunLocked(StageError):
    """The run directory is held by another run; the message names it (the CLI prints it as one
    line, like any stage error)."""


def _holder() -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "refreshed": now}


def describe(holder: dict[str, Any], uri: str) -> str:
    age = time.time() - float(holder.get("refreshed", time.time()))
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"(lock {uri}, refreshed {age:.0f} s ago)")


def _dead_here(holder: dict[str, Any]) -> bool:
    """A holder on this host whose process is gone."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OSError):
        return False
    return False


class LocalLock:
    def __init__(self, run_dir: str):
        self.uri = os.path.join(run_dir, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.uri) or ".", exist_ok=True)
        fd = os.open(self.uri, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder: dict[str, Any] = {}
            with contextlib.suppress(Exception):
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            os.close(fd)
            raise RunLocked(f"run directory {os.path.dirname(self.uri)} is in use by "
                            f"{describe(holder, self.uri)}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self.fd = fd

    def check(self) -> None:
        """Nothing to check: the kernel holds a local lock until this process ends."""

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # the file stays (unlinking it would race a new holder)
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class S3Lock:
    def __init__(self, run_dir: str, stale_after_s: float, refresh_s: float):
        self.uri = storage.join(run_dir, LOCK_NAME)
        self.fs, path = storage.get_fs(self.uri)
        self.bucket, _, self.key = path.partition("/")
        self.stale_after_s, self.refresh_s = float(stale_after_s), float(refresh_s)
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, body: dict[str, Any], **condition: str) -> str:
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key,
                              Body=json.dumps(body).encode(), **condition)
        return out["ETag"]

    def _read(self) -> tuple[dict[str, Any], str] | None:
        try:
            out = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        data = _read_body(self.fs, out["Body"])
        try:
            return json.loads(data.decode() or "{}"), out["ETag"]
        except ValueError:
            return {}, out["ETag"]

    def acquire(self) -> None:
        self.holder = _holder()
        try:
            self.etag = self._put(self.holder, IfNoneMatch="*")
        except (FileExistsError, OSError) as exc:
            if not isinstance(exc, FileExistsError) and getattr(exc, "errno", None) != errno.EINVAL:
                raise
            current = self._read()
            if current is None:  # released between our put and our read: try once more
                self.etag = self._put(self.holder, IfNoneMatch="*")
            else:
                self._take_over(*current)
        self._thread = threading.Thread(target=self._refresh_loop, name="unclip-run-lock", daemon=True)
        self._thread.start()

    def _take_over(self, holder: dict[str, Any], etag: str) -> None:
        age = time.time() - float(holder.get("refreshed", 0))
        if age < self.stale_after_s and not _dead_here(holder):
            raise RunLocked(f"run directory {self.uri.rsplit('/', 1)[0]} is in use by "
                            f"{describe(holder, self.uri)}; a lock not refreshed for "
                            f"{self.stale_after_s:.0f} s is taken over")
        try:
            self.etag = self._put(self.holder, IfMatch=etag)
        except OSError:
            raise RunLocked(f"run directory {self.uri.rsplit('/', 1)[0]}: another run took over the "
                            f"stale lock of {describe(holder, self.uri)} first") from None
        log.warning("took over the stale run lock of %s", describe(holder, self.uri))

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.etag = self._put({**self.holder, "refreshed": time.time()}, IfMatch=self.etag)
            except OSError as exc:
                current = self._read()
                if current is None or current[1] != self.etag:
                    self.lost = (describe(current[0], self.uri) if current else "nobody (deleted)")
                    log.error("the run lock %s was taken over by %s", self.uri, self.lost)
                    return
                log.warning("could not refresh the run lock %s (%s); retrying", self.uri, exc)

    def check(self) -> None:
        """Between stages: stop when another run has taken the lock over."""
        if self.lost:
            raise RunLocked(f"the run lock {self.uri} was taken over by {self.lost}; stopping")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.etag and not self.lost:
            with contextlib.suppress(Exception):
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        self.etag = None


def _read_body(fs, body) -> bytes:
    """The bytes of an aiobotocore streaming body, read on s3fs's own event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


@contextlib.contextmanager
def run_lock(run_dir: str, stale_after_s: float = 120.0, refresh_s: float = 30.0) -> Iterator[Any]:
    """Hold ``run_dir``'s lock for the block; :class:`RunLocked` at once if another run holds it."""
    lock = S3Lock(run_dir, stale_after_s, refresh_s) if storage.is_remote(run_dir) else LocalLock(
        storage.absolute(run_dir))
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
