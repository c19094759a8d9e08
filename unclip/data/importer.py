"""Import a folder of images plus a CSV/Parquet caption table into img2dataset-layout shards.

Bytes are copied as they are; decoding and validation are the filter stage's job, so an import
never loses a sample silently: rows whose image file is missing are counted and reported.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from unclip import storage
from unclip.data.shards import IMAGE_EXTS, ShardWriter, sample_key, shard_name

IMAGE_COLUMNS = ("file", "filename", "filepath", "image", "path", "url")
CAPTION_COLUMNS = ("caption", "text", "title")


@dataclass
class ImportRow:
    index: int
    image: str
    caption: str | None


def read_caption_table(uri: str, image_column: str | None = None,
                       caption_column: str | None = None) -> list[ImportRow]:
    """Rows of the caption table, with the image and caption columns found by name."""
    data = storage.read_bytes(uri)
    if uri.lower().endswith((".parquet", ".pq")):
        table = pq.read_table(io.BytesIO(data))
    elif uri.lower().endswith((".csv", ".tsv")):
        delim = "\t" if uri.lower().endswith(".tsv") else ","
        table = pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter=delim),
                               convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    else:
        raise ValueError(f"caption table {uri}: expected a .csv, .tsv or .parquet file")
    img_col = _pick(table, image_column, IMAGE_COLUMNS, uri, "image")
    cap_col = _pick(table, caption_column, CAPTION_COLUMNS, uri, "caption")
    images = table.column(img_col).cast(pa.string()).to_pylist()
    captions = table.column(cap_col).cast(pa.string()).to_pylist()
    return [ImportRow(i, str(im), cap) for i, (im, cap) in enumerate(zip(images, captions))
            if im is not None]


def _pick(table: pa.Table, wanted: str | None, candidates: tuple[str, ...], uri: str, what: str) -> str:
    names = table.column_names
    if wanted:
        if wanted not in names:
            raise ValueError(f"caption table {uri}: no column {wanted!r} (columns: {names})")
        return wanted
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise ValueError(f"caption table {uri}: no {what} column; name one of {list(candidates)} "
                     f"or set data.{what}_column (columns: {names})")


def write_import_shard(image_root: str, shard_index: int, rows: list[ImportRow], out_folder: str,
                       samples_per_shard: int) -> dict[str, int]:
    """Write one shard from ``rows``; returns counts (written, missing_image_file, not_an_image)."""
    counts = {"written": 0, "missing_image_file": 0, "unknown_image_extension": 0}
    name = shard_name(shard_index)
    with ShardWriter(out_folder, name) as writer:
        for j, row in enumerate(rows):
            ext = row.image.rsplit(".", 1)[-1].lower() if "." in row.image else ""
            if ext not in IMAGE_EXTS:
                counts["unknown_image_extension"] += 1
                continue
            uri = row.image if "://" in row.image else storage.join(image_root, row.image)
            try:
                data = storage.read_bytes(uri)
            except (FileNotFoundError, IsADirectoryError):
                counts["missing_image_file"] += 1
                continue
            key = sample_key(shard_index, j, samples_per_shard)
            writer.write(key, data, "jpg" if ext == "jpeg" else ext, row.caption,
                         {"source_file": row.image, "source_row": row.index})
            counts["written"] += 1
    return counts
