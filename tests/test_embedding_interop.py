"""clip-retrieval (LAION) layout interop: round trips keep keys, captions, vectors; bad input fails."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.embeddings import io as eio
from unclip.embeddings.interop import export_clip_retrieval, import_clip_retrieval, load_npy, main

DIM = 8
IDENTITY = {"arch": "tiny", "source": "test", "dim": DIM}


def _unit(rng, n, dim=DIM):
    a = rng.normal(size=(n, dim)).astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _ours(folder, rng, sizes=(5, 3)):
    """Our embedding folder: one file per shard, with some null captions."""
    want = {}
    for s, n in enumerate(sizes):
        keys = [f"{s:05d}{i:04d}" for i in range(n)]
        caps = [f"caption {s}-{i}" if i else None for i in range(n)]
        img, txt = _unit(rng, n), _unit(rng, n)
        eio.write_table(str(folder / f"{s:05d}.parquet"), eio.to_table(keys, caps, img, txt, IDENTITY))
        want.update({k: (c, img[i], txt[i]) for i, (k, c) in enumerate(zip(keys, caps))})
    return want


def _read(folder):
    t = eio.read_all(str(folder))
    img, txt = eio.matrix(t, "image_embedding"), eio.matrix(t, "text_embedding")
    return {k: (c, img[i], txt[i]) for i, (k, c) in enumerate(zip(t.column("key").to_pylist(),
                                                                  t.column("caption").to_pylist()))}


@pytest.mark.parametrize("dtype,atol", [("float16", 2e-3), ("float32", 0.0)])
def test_round_trip(tmp_path, dtype, atol):
    want = _ours(tmp_path / "ours", np.random.default_rng(0))
    cr, back = tmp_path / "cr", tmp_path / "back"
    assert export_clip_retrieval(str(tmp_path / "ours"), str(cr), dtype) == {"parts": 2, "rows": 8}
    assert sorted(p.name for p in (cr / "img_emb").iterdir()) == ["img_emb_00000.npy", "img_emb_00001.npy"]
    assert load_npy(str(cr / "text_emb" / "text_emb_00001.npy")).dtype == np.dtype(dtype)
    meta = pq.read_table(cr / "metadata" / "metadata_00000.parquet")
    assert meta.column_names == ["image_path", "caption", "key"]

    counts = import_clip_retrieval(str(cr), str(back))
    assert counts == dict(parts=2, rows_in=8, rows=8, missing_key=0, invalid_vector=0, renormalized=0)
    assert [p.name for p in sorted(back.iterdir())] == ["00000.parquet", "00001.parquet"]
    assert eio.read_identity(str(back / "00000.parquet")) == IDENTITY  # carried through the metadata
    got = _read(back)
    assert got.keys() == want.keys()
    for k, (cap, img, txt) in want.items():
        assert got[k][0] == cap
        if atol:
            np.testing.assert_allclose(got[k][1], img, atol=atol)
            np.testing.assert_allclose(got[k][2], txt, atol=atol)
        else:  # float32 vectors already unit to float32 precision come back bit for bit
            np.testing.assert_array_equal(got[k][1], img)
            np.testing.assert_array_equal(got[k][2], txt)
        assert abs(np.linalg.norm(got[k][1]) - 1) < 1e-5


def _npy(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, a)
    path.write_bytes(buf.getvalue())


def _cr_part(root, pid, img, txt, meta: dict):
    """A part as clip-retrieval writes it (float16 npy, pandas-style metadata parquet)."""
    _npy(root / "img_emb" / f"img_emb_{pid}.npy", img)
    _npy(root / "text_emb" / f"text_emb_{pid}.npy", txt)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(meta), root / "metadata" / f"metadata_{pid}.parquet")


def test_import_hand_made(tmp_path):
    rng = np.random.default_rng(1)
    cr = tmp_path / "cr"
    img, txt = _unit(rng, 4), _unit(rng, 4)
    img[2] *= 3.0  # not unit norm: re-normalized and counted
    _cr_part(cr, "0", img.astype(np.float16), txt.astype(np.float16),
             {"image_path": ["a", None, "c", ""], "caption": ["ca", "cb", "cc", "cd"],
              "url": ["u"] * 4, "exif": ["{}"] * 4})  # no `key` column: falls back to image_path
    txt2 = _unit(rng, 2)
    txt2[0] = 0.0  # cannot be normalized: dropped
    _cr_part(cr, "1", _unit(rng, 2), txt2,
             {"image_path": ["/x/1.jpg", "/x/2.jpg"], "caption": ["d", "e"], "key": ["k1", "k2"]})
    out = tmp_path / "ours"
    counts = import_clip_retrieval(str(cr), str(out), identity={"arch": "ViT-B-32"})
    assert counts == dict(parts=2, rows_in=6, rows=3, missing_key=2, invalid_vector=1, renormalized=1)
    t = eio.read_all(str(out))
    assert t.column("key").to_pylist() == ["a", "c", "k2"]
    assert t.column("caption").to_pylist() == ["ca", "cc", "e"]
    assert eio.matrix(t, "image_embedding").dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(eio.matrix(t, "image_embedding"), axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(eio.matrix(t, "image_embedding")[1], img[2] / np.linalg.norm(img[2]),
                               atol=2e-3)
    assert eio.read_identity(str(out / "00000.parquet")) == {"arch": "ViT-B-32", "dim": DIM}
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00001.parquet"]


def test_import_row_count_mismatch(tmp_path):
    rng = np.random.default_rng(2)
    _cr_part(tmp_path, "07", _unit(rng, 3), _unit(rng, 3), {"key": ["a", "b"], "caption": ["x", "y"]})
    with pytest.raises(ValueError, match=r"part 07: row counts disagree: img_emb 3, text_emb 3, metadata 2"):
        import_clip_retrieval(str(tmp_path), str(tmp_path / "out"))


def test_import_dim_mismatch(tmp_path):
    rng = np.random.default_rng(3)
    _cr_part(tmp_path, "0", _unit(rng, 2), _unit(rng, 2, dim=DIM + 1),
             {"key": ["a", "b"], "caption": ["x", "y"]})
    with pytest.raises(ValueError, match=r"part 0: image dim 8 != text dim 9"):
        import_clip_retrieval(str(tmp_path), str(tmp_path / "out"))


def test_import_missing_file_and_pickle(tmp_path):
    rng = np.random.default_rng(4)
    _cr_part(tmp_path, "0", _unit(rng, 2), _unit(rng, 2), {"key": ["a", "b"], "caption": ["x", "y"]})
    (tmp_path / "text_emb" / "text_emb_0.npy").unlink()
    with pytest.raises(FileNotFoundError, match="part 0: missing"):
        import_clip_retrieval(str(tmp_path), str(tmp_path / "out"))
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "text_emb" / "text_emb_0.npy").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):
        import_clip_retrieval(str(tmp_path), str(tmp_path / "out"))


def test_cli(tmp_path, capsys):
    help_ = subprocess.run([sys.executable, "-m", "unclip.embeddings.interop", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert "import" in help_ and "export" in help_
    _ours(tmp_path / "ours", np.random.default_rng(5), sizes=(2,))
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "cr"), "--dtype", "float32"]) == 0
    assert main(["import", str(tmp_path / "cr"), str(tmp_path / "back"), "--identity", '{"arch": "x"}']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0]) == {"parts": 1, "rows": 2} and json.loads(lines[1])["rows"] == 2
    assert eio.read_identity(str(tmp_path / "back" / "00000.parquet")) == {"arch": "x", "dim": DIM}


def test_export_non_numeric_names_are_numbered(tmp_path):
    rng = np.random.default_rng(6)
    for name in ("b", "a"):
        eio.write_table(str(tmp_path / "ours" / f"{name}.parquet"),
                        eio.to_table([name], [None], _unit(rng, 1), _unit(rng, 1), IDENTITY))
    export_clip_retrieval(str(tmp_path / "ours"), str(tmp_path / "cr"))
    assert sorted(p.name for p in (tmp_path / "cr" / "metadata").iterdir()) == ["metadata_0.parquet",
                                                                                 "metadata_1.parquet"]
    meta = pq.read_table(tmp_path / "cr" / "metadata" / "metadata_1.parquet")
    assert meta.column("key").to_pylist() == ["b"]


def test_raw_embeddings_come_back_from_the_stored_norms(tmp_path):
    """A model reading raw CLIP projections (an imported Karlo decoder) gets unit row x stored
    norm; embeddings written without norms (older runs, imported ones) are refused by name."""
    from unclip.data.paired import NoNormsError, shard_embeddings

    rng = np.random.default_rng(0)
    raw = rng.normal(size=(4, DIM)).astype(np.float32) * np.array([[1.0], [3.0], [7.0], [0.5]], np.float32)
    unit, norms = eio.unit_rows(raw)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    keys = [f"k{i}" for i in range(4)]
    with_norms, without = tmp_path / "with", tmp_path / "without"
    eio.write_table(str(with_norms / "00000.parquet"),
                    eio.to_table(keys, ["c"] * 4, unit, unit, IDENTITY, norms))
    eio.write_table(str(without / "00000.parquet"), eio.to_table(keys, ["c"] * 4, unit, unit, IDENTITY))
    shard = str(tmp_path / "00000.tar")
    back = shard_embeddings(shard, str(with_norms), raw=True)
    np.testing.assert_allclose(np.stack([back[k] for k in keys]), raw, rtol=1e-5)
    np.testing.assert_allclose(np.stack([shard_embeddings(shard, str(with_norms))[k] for k in keys]), unit)
    with pytest.raises(NoNormsError, match="without.*00000.parquet.*image_embedding_norm.*embed"):
        shard_embeddings(shard, str(without), raw=True)
