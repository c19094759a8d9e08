"""The embedding files every downstream stage reads: Parquet, one file per input shard.

Columns: ``key`` (string), ``caption`` (string), ``image_embedding`` and ``text_embedding``
(fixed-size lists of float32, L2-normalized), and where the embed stage wrote them
``image_embedding_norm`` (float32: the CLIP projection's norm before normalizing, which models that
read raw embeddings, such as an imported Karlo decoder, need back). The CLIP that produced them is recorded in the file
metadata under ``unclip.clip`` (architecture, weights source and digest, dimension), so embeddings
from two different CLIPs are never mixed silently.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unclip import storage

META_KEY = b"unclip.clip"
SUFFIX = ".parquet"


NORM = "image_embedding_norm"


def schema(dim: int, identity: dict[str, Any] | None = None, norms: bool = False) -> pa.Schema:
    vec = pa.list_(pa.float32(), dim)
    s = pa.schema([("key", pa.string()), ("caption", pa.string()),
                   ("image_embedding", vec), ("text_embedding", vec)]
                  + ([(NORM, pa.float32())] if norms else []))
    if identity is not None:
        s = s.with_metadata({META_KEY: json.dumps(identity, sort_keys=True).encode()})
    return s


def _vectors(a: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"expected an array of shape (n, {dim}), got {a.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), dim)


def to_table(keys: list[str], captions: list[str | None], image: np.ndarray, text: np.ndarray,
             identity: dict[str, Any] | None = None, image_norms: np.ndarray | None = None) -> pa.Table:
    dim = int(image.shape[1]) if image.ndim == 2 else int(identity["dim"])  # type: ignore[index]
    columns = [pa.array(keys, pa.string()), pa.array(captions, pa.string()), _vectors(image, dim),
               _vectors(text, dim)]
    if image_norms is not None:
        columns.append(pa.array(np.asarray(image_norms, np.float32).reshape(-1), pa.float32()))
    return pa.Table.from_arrays(columns, schema=schema(dim, identity, image_norms is not None))


def unit_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalized rows, their norms) of raw CLIP projections."""
    raw = np.asarray(raw, np.float32)
    norms = np.linalg.norm(raw, axis=-1).astype(np.float32)
    return raw / np.maximum(norms, 1e-12)[..., None], norms


def write_table(uri: str, table: pa.Table) -> None:
    """One whole Parquet object: a re-run with the same name replaces it, never appends."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def part_name(shard_name: str) -> str:
    """Embedding file for a shard ``00012.tar`` -> ``00012.parquet`` (deterministic, 1:1)."""
    stem = shard_name[: -len(".tar")] if shard_name.endswith(".tar") else shard_name
    return stem + SUFFIX


def list_files(folder: str) -> list[str]:
    return storage.list_files(folder, SUFFIX)


def read_file(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def iter_tables(folder: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    for uri in list_files(folder):
        yield read_file(uri, columns)


def read_all(folder: str, columns: list[str] | None = None) -> pa.Table:
    tables = list(iter_tables(folder, columns))
    if not tables:
        raise FileNotFoundError(f"no embedding files (*.parquet) in {folder}")
    return pa.concat_tables(tables)


def matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size-list column as an (n, dim) float32 array, without a Python loop."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


class NoNormsError(ValueError):
    """Raw embeddings asked of an embedding file written without their norms."""


def image_matrix(table: pa.Table, where: str, raw: bool = False) -> np.ndarray:
    """The image embeddings (n, dim): unit rows, or with ``raw`` the CLIP projections as they were
    (unit row x ``NORM``), for models conditioned on raw projections (imported Karlo ones)."""
    z = matrix(table, "image_embedding")
    if not raw:
        return z
    if NORM not in table.column_names:
        raise NoNormsError(
            f"{where}: no {NORM} column, so the raw CLIP embeddings this model reads cannot be "
            "rebuilt (embeddings written before norms were stored, or imported): re-run the embed "
            "stage (python -m pipelines stage embed --force ...)")
    return z * table.column(NORM).to_numpy(zero_copy_only=False).astype(np.float32)[:, None]


def read_identity(uri: str) -> dict[str, Any] | None:
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else None
