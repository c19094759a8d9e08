"""Reading and writing webdataset shards in the layout img2dataset writes.

A shard ``00000.tar`` holds ``{key}.{jpg|png|webp}``, ``{key}.txt`` (caption) and ``{key}.json``
(metadata) per sample, next to ``00000.parquet`` (one row per sample) and ``00000_stats.json``.

The reader is deliberately forgiving: real shards are truncated, hold stray files or non-UTF-8
captions. It never raises on content; it yields samples and :class:`ShardProblem` records so the
caller can count every skip by reason.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from unclip import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_SUFFIX = ".tar"


@dataclass
class RawSample:
    """One key's files from a shard, undecoded. ``files`` maps extension -> bytes."""

    key: str
    shard: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_ext(self) -> str | None:
        for ext in IMAGE_EXTS:
            if ext in self.files:
                return ext
        return None

    @property
    def image_bytes(self) -> bytes | None:
        ext = self.image_ext
        return self.files[ext] if ext else None

    def caption(self) -> str | None:
        """The caption text, or None when the sample has no ``.txt``. Raises UnicodeDecodeError."""
        raw = self.files.get("txt")
        return None if raw is None else raw.decode("utf-8").strip()

    def meta(self) -> dict[str, Any]:
        raw = self.files.get("json")
        if raw is None:
            return {}
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return obj if isinstance(obj, dict) else {}


@dataclass
class ShardProblem:
    """Something in a shard that is not a usable sample (counted by the caller under ``reason``)."""

    reason: str
    shard: str
    key: str | None = None
    detail: str = ""


SAMPLE_EXTS = IMAGE_EXTS + ("txt", "json")


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the first dot of the basename.

    A name with no dot is a stray file, and so is a hidden file (``.DS_Store``) unless what follows
    the dot is a sample's extension: ``.jpg`` is a sample with an empty key, which the filter drops
    as an unsafe key instead of passing it off as a stray file.
    """
    dirname, base = posixpath.split(name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    if not stem and ext.lower() not in SAMPLE_EXTS:
        return None
    return posixpath.join(dirname, stem) if dirname else stem, ext.lower()


def unsafe_key_reason(key: str) -> str | None:
    """Why ``key`` is not a plain file name (None when it is one).

    Kept keys become member names of the filtered shards and file names downstream, so a key must
    not be empty, hold a path (``/``, ``\\``, ``..``) or a control, format or undecodable
    character (a non-UTF-8 tar name arrives as surrogates).
    """
    if not key.strip():
        return "empty key"
    for bad in ("/", "\\", ".."):
        if bad in key:
            return f"contains {bad!r}"
    for ch in key:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return f"contains U+{ord(ch):04X} ({unicodedata.category(ch)})"
    return None


def printable(text: str) -> str:
    """``text`` with controls and undecodable characters escaped, safe for logs and Parquet."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def list_shards(uri: str) -> list[str]:
    """All ``*.tar`` shards directly under a folder URI, sorted by name."""
    return storage.list_files(uri, SHARD_SUFFIX)


def shard_name(index: int) -> str:
    return f"{index:05d}"


def sample_key(shard_index: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: shard number then the sample's index within the shard, zero-padded."""
    width = max(4, len(str(max(samples_per_shard - 1, 0))))
    return f"{shard_index:05d}{index:0{width}d}"


def iter_shard(uri: str) -> Iterator[RawSample | ShardProblem]:
    """Stream a shard's samples in order. Truncation or garbage ends the shard with a problem record."""
    shard = storage.basename(uri)
    fs, path = storage.get_fs(uri)
    current: RawSample | None = None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    yield ShardProblem("stray_file", shard, None, member.name)
                    continue
                key, ext = parts
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key=key, shard=shard)
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if current is not None:
            yield ShardProblem("truncated_sample", shard, current.key, str(exc))
            current = None
        yield ShardProblem("unreadable_shard_tail", shard, None, f"{type(exc).__name__}: {exc}")
    if current is not None:
        yield current


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes for a given content
    info.mode = 0o444
    info.uname = info.gname = "unclip"
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes one shard (tar + parquet + stats) to a folder URI; nothing appears until ``close``.

    Use as a context manager. An exception inside the block leaves no shard behind, so a killed or
    failed writer never leaves a half shard for a re-run to append to.
    """

    def __init__(self, folder: str, name: str):
        self.folder = folder
        self.name = name
        self.tar_uri = storage.join(folder, f"{name}.tar")
        self._ctx = storage.open_atomic(self.tar_uri)
        self._rows: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._stream = None

    def __enter__(self) -> "ShardWriter":
        self._stream = self._ctx.__enter__()
        self._tar = tarfile.open(fileobj=self._stream, mode="w|", format=tarfile.USTAR_FORMAT)
        return self

    def write(self, key: str, image: bytes, image_ext: str, caption: str | None,
              meta: dict[str, Any] | None = None) -> None:
        assert self._tar is not None, "use ShardWriter as a context manager"
        meta = dict(meta or {})
        meta.setdefault("key", key)
        if caption is not None:
            meta.setdefault("caption", caption)
        _add_member(self._tar, f"{key}.{image_ext}", image)
        if caption is not None:
            _add_member(self._tar, f"{key}.txt", caption.encode("utf-8"))
        _add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
        self._rows.append({
            "key": key,
            "caption": caption,
            "width": meta.get("width"),
            "height": meta.get("height"),
            "status": "success",
        })

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._tar is not None
        self._tar.close()
        if exc_type is not None:
            self._ctx.__exit__(exc_type, exc, tb)
            return False
        self._ctx.__exit__(None, None, None)
        table = pa.Table.from_pylist(self._rows, schema=SHARD_PARQUET_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(self.folder, f"{self.name}.parquet"), buf.getvalue())
        stats = {"count": len(self._rows), "successes": len(self._rows), "failed_to_download": 0}
        storage.write_json(storage.join(self.folder, f"{self.name}_stats.json"), stats)
        return False

    @property
    def count(self) -> int:
        return len(self._rows)


SHARD_PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("status", pa.string()),
])
