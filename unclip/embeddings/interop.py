"""Convert between our embedding Parquet files and the clip-retrieval (LAION) embedding layout.

clip-retrieval's ``clip_inference`` writes, per output partition ``N`` (zero-padded to
``int(log10(partition_count)) + 1`` digits)::

    img_emb/img_emb_N.npy          (n, d) float16, L2-normalized image embeddings
    text_emb/text_emb_N.npy        (n, d) float16, L2-normalized text embeddings
    metadata/metadata_N.parquet    one row per embedding row, same order: ``image_path``
                                   (the webdataset ``__key__`` or the file path), ``caption``
                                   and, with ``--enable_metadata``, the sample's json fields
                                   flattened (img2dataset: ``key``, ``url``, ...)

LAION's released embeddings use the same layout, so importing lets users skip our ``embed`` stage.
Everything goes through :mod:`unclip.storage`, so both sides may be local paths or ``s3://`` URIs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unclip import storage
from unclip.embeddings import io as eio

IMG, TEXT, META = "img_emb", "text_emb", "metadata"
NORM_TOLERANCE = 1e-2  # float16 storage alone moves norms by ~1e-3; beyond this a row was not unit


def _part_ids(folder: str, prefix: str, suffix: str) -> set[str]:
    names = (storage.basename(u) for u in storage.list_files(folder, suffix))
    return {n[len(prefix):-len(suffix)] for n in names if n.startswith(prefix)}


def _paths(src: str, pid: str) -> tuple[str, str, str]:
    return (storage.join(src, IMG, f"{IMG}_{pid}.npy"), storage.join(src, TEXT, f"{TEXT}_{pid}.npy"),
            storage.join(src, META, f"{META}_{pid}.parquet"))


def load_npy(uri: str) -> np.ndarray:
    """A whole .npy object, never unpickled (the files may come from anywhere)."""
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def save_npy(uri: str, a: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    storage.write_bytes(uri, buf.getvalue())


def _out_name(pid: str) -> str:
    """``img_emb_0003`` -> ``00003.parquet``: our shard-style numbering, sorting numerically."""
    return (f"{int(pid):05d}" if pid.isdigit() else pid) + eio.SUFFIX


def _read_metadata(uri: str) -> tuple[pa.Table, dict[str, Any] | None]:
    """Only the columns we use (LAION metadata also carries exif, url, ...), plus any identity."""
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        raw = (pf.schema_arrow.metadata or {}).get(eio.META_KEY)
        table = pf.read(columns=[c for c in ("key", "image_path", "caption") if c in names])
    return table, (json.loads(raw) if raw else None)


def _unit(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalized float32, rows that were not unit norm, rows that cannot be normalized)."""
    a = a.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.linalg.norm(a, axis=1)
    bad = ~np.isfinite(norm) | (norm <= 1e-6)
    off = ~bad & (np.abs(norm - 1.0) > NORM_TOLERANCE)
    unit = bad | (np.abs(norm - 1.0) <= 1e-6)  # already unit in float32: leave bits (exact round trip)
    return a / np.where(unit, 1.0, norm)[:, None].astype(np.float32), off, bad


def import_clip_retrieval(src_uri: str, dst_folder_uri: str,
                          identity: dict[str, Any] | None = None) -> dict[str, int]:
    """Write one of our Parquet files per clip-retrieval part; return counts.

    Keys come from ``key`` (img2dataset metadata) or else ``image_path``; rows without one are
    skipped, as are rows with a zero or non-finite vector. Vectors are re-normalized to unit L2 in
    float32 (float16 storage is not exactly unit). Without ``identity`` the CLIP identity recorded
    by :func:`export_clip_retrieval` is reused, else a minimal one naming the source.
    """
    ids = (_part_ids(storage.join(src_uri, IMG), f"{IMG}_", ".npy")
           | _part_ids(storage.join(src_uri, TEXT), f"{TEXT}_", ".npy")
           | _part_ids(storage.join(src_uri, META), f"{META}_", ".parquet"))
    if not ids:
        raise FileNotFoundError(f"no clip-retrieval parts (img_emb/img_emb_*.npy) under {src_uri}")
    outs = [_out_name(p) for p in ids]
    if len(set(outs)) != len(outs):
        raise ValueError(f"clip-retrieval part numbers collide after zero-padding in {src_uri}")
    counts = dict(parts=0, rows_in=0, rows=0, missing_key=0, invalid_vector=0, renormalized=0)
    dim: int | None = None
    for pid in sorted(ids, key=lambda p: (int(p) if p.isdigit() else math.inf, p)):
        img_uri, txt_uri, meta_uri = _paths(src_uri, pid)
        for uri in (img_uri, txt_uri, meta_uri):
            if not storage.exists(uri):
                raise FileNotFoundError(f"clip-retrieval part {pid}: missing {uri}")
        image, text = load_npy(img_uri), load_npy(txt_uri)
        meta, recorded = _read_metadata(meta_uri)
        for name, a in (("image", image), ("text", text)):
            if a.ndim != 2 or a.dtype.kind != "f":
                raise ValueError(f"clip-retrieval part {pid}: {name} embeddings must be a 2-D float "
                                 f"array, got {a.dtype} {a.shape}")
        if image.shape[1] != text.shape[1]:
            raise ValueError(f"clip-retrieval part {pid}: image dim {image.shape[1]} != text dim "
                             f"{text.shape[1]}")
        if not len(image) == len(text) == meta.num_rows:
            raise ValueError(f"clip-retrieval part {pid}: row counts disagree: img_emb {len(image)}, "
                             f"text_emb {len(text)}, metadata {meta.num_rows}")
        if dim is None:
            dim = int(image.shape[1])
            identity = dict(identity or recorded or {"source": "clip-retrieval", "imported_from": src_uri})
            if identity.setdefault("dim", dim) != dim:
                raise ValueError(f"identity says dim {identity['dim']} but embeddings have dim {dim}")
        elif image.shape[1] != dim:
            raise ValueError(f"clip-retrieval part {pid}: dim {image.shape[1]} != {dim} of earlier parts")
        key_col = "key" if "key" in meta.column_names else "image_path"
        if key_col not in meta.column_names:
            raise ValueError(f"clip-retrieval part {pid}: metadata has neither 'key' nor 'image_path'")
        keys = pc.cast(meta.column(key_col), pa.string())
        has_key = pc.fill_null(pc.greater(pc.utf8_length(keys), 0), False).to_numpy(zero_copy_only=False)
        image, img_off, img_bad = _unit(image)
        text, txt_off, txt_bad = _unit(text)
        valid = ~(img_bad | txt_bad)
        keep = has_key & valid
        captions = meta.column("caption") if "caption" in meta.column_names else pa.nulls(meta.num_rows)
        mask = pa.array(keep)
        table = eio.to_table(keys.filter(mask).to_pylist(),
                             pc.cast(captions, pa.string()).filter(mask).to_pylist(),
                             image[keep], text[keep], identity)
        eio.write_table(storage.join(dst_folder_uri, _out_name(pid)), table)
        counts["parts"] += 1
        counts["rows_in"] += len(keep)
        counts["rows"] += int(keep.sum())
        counts["missing_key"] += int((~has_key).sum())
        counts["invalid_vector"] += int((has_key & ~valid).sum())
        counts["renormalized"] += int((keep & (img_off | txt_off)).sum())
    return counts


def export_clip_retrieval(src_folder_uri: str, dst_uri: str, dtype: str = "float16") -> dict[str, int]:
    """Write img_emb/, text_emb/ and metadata/ from our files; return counts.

    Numeric file stems (``00012.parquet``) keep their number (``img_emb_00012.npy``) so parts stay
    traceable to shards; otherwise parts are numbered in file order, padded as clip-retrieval does.
    The metadata has ``image_path`` (= key, as clip-retrieval writes for webdataset input),
    ``caption`` and ``key``, and records our CLIP identity so a re-import keeps it.
    """
    if np.dtype(dtype) not in (np.float16, np.float32):
        raise ValueError(f"dtype must be float16 or float32, got {dtype}")
    files = eio.list_files(src_folder_uri)
    if not files:
        raise FileNotFoundError(f"no embedding files (*.parquet) in {src_folder_uri}")
    stems = [storage.basename(u)[: -len(eio.SUFFIX)] for u in files]
    if not (all(s.isdigit() for s in stems) and len({len(s) for s in stems}) == 1):
        stems = [str(i).zfill(int(math.log10(len(files))) + 1) for i in range(len(files))]
    rows = 0
    for uri, pid in zip(files, stems):
        table = eio.read_file(uri)
        img_uri, txt_uri, meta_uri = _paths(dst_uri, pid)
        save_npy(img_uri, eio.matrix(table, "image_embedding").astype(dtype))
        save_npy(txt_uri, eio.matrix(table, "text_embedding").astype(dtype))
        meta = pa.table({"image_path": table.column("key"), "caption": table.column("caption"),
                         "key": table.column("key")})
        raw = (table.schema.metadata or {}).get(eio.META_KEY)
        if raw:
            meta = meta.replace_schema_metadata({eio.META_KEY: raw})
        buf = io.BytesIO()
        pq.write_table(meta, buf)
        storage.write_bytes(meta_uri, buf.getvalue())
        rows += table.num_rows
    return {"parts": len(files), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unclip.embeddings.interop",
                                description="Convert embeddings between clip-retrieval/LAION layout "
                                            "(img_emb/, text_emb/, metadata/) and our Parquet files.")
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="clip-retrieval folder SRC -> our Parquet folder DST")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument("--identity", type=json.loads, default=None,
                     help="CLIP identity as a JSON object (default: the one recorded, if any)")
    exp = sub.add_parser("export", help="our Parquet folder SRC -> clip-retrieval folder DST")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    a = p.parse_args(argv)
    if a.cmd == "import":
        counts = import_clip_retrieval(a.src, a.dst, a.identity)
    else:
        counts = export_clip_retrieval(a.src, a.dst, a.dtype)
    json.dump(counts, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
