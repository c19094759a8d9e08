"""A folder of images plus a caption table becomes img2dataset-layout shards."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import png_bytes, random_image
from unclip.data.importer import read_caption_table
from unclip.data.shards import iter_shard, list_shards
from pipelines.cli import main


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / ("sub" if i == 4 else "") / f"img{i}.png").write_bytes(png_bytes(random_image(i)))
    (folder / "captions.csv").write_text(
        "file,caption\n"
        "img0.png,a red circle\n"
        'img1.png,"a caption, with a comma"\n'
        "img2.png,\n"
        "missing.png,an image that is not there\n"
        "img3.png,a blue square\n"
        "sub/img4.png,in a sub folder\n")
    return folder


def test_read_caption_table_finds_columns(image_folder, tmp_path):
    rows = read_caption_table(str(image_folder / "captions.csv"))
    assert [r.image for r in rows][:2] == ["img0.png", "img1.png"]
    assert rows[1].caption == "a caption, with a comma"
    assert rows[2].caption is None
    pq.write_table(pa.table({"path": ["a.png"], "text": ["x"]}), tmp_path / "c.parquet")
    assert read_caption_table(str(tmp_path / "c.parquet"))[0].caption == "x"
    pq.write_table(pa.table({"foo": ["a.png"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no image column"):
        read_caption_table(str(tmp_path / "bad.parquet"))


def test_import_then_filter(image_folder, tmp_path, ray_local):
    run_dir = tmp_path / "run"
    rc = main(["run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}", f"data.source={image_folder}",
               f"data.captions={image_folder / 'captions.csv'}", "data.samples_per_shard=4"])
    assert rc == 0
    m = json.loads((run_dir / "data" / "manifest.json").read_text())["metrics"]
    assert m["num_samples"] == 5 and m["skipped_missing_image_file"] == 1
    samples = [s for p in list_shards(str(run_dir / "data" / "shards")) for s in iter_shard(p)]
    assert [s.meta()["source_file"] for s in samples] == \
        ["img0.png", "img1.png", "img2.png", "img3.png", "sub/img4.png"]
    assert samples[0].image_bytes == png_bytes(random_image(0))
    assert "txt" not in samples[2].files  # an empty caption is imported as missing, then filtered
    f = json.loads((run_dir / "filter" / "manifest.json").read_text())["metrics"]
    assert f["kept"] == 4 and f["dropped_missing_caption"] == 1
