"""The clip and embed stages on the smoke preset: training, registry, every CLIP source, Parquet."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from unclip.embeddings import io as eio
from unclip.models.clip import create_custom, load_clip


def _manifest(run_dir, stage):
    return json.loads((run_dir / stage / "manifest.json").read_text())


def test_clip_trains_and_registers(smoke_run):
    m = _manifest(smoke_run, "clip")["metrics"]
    for k in ("val_recall_at_1", "val_recall_at_5", "val_chance_at_1", "val_chance_at_5"):
        assert 0.0 <= m[k] <= 1.0
    assert m["registered_version"] >= 1 and m["registered_alias"] in ("champion", "candidate")
    assert (smoke_run / "clip" / "model" / "model.safetensors").exists()


def test_embeddings_parquet(smoke_run):
    folder = smoke_run / "embed" / "embeddings"
    files = eio.list_files(str(folder))
    assert [os.path.basename(f) for f in files] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    table = eio.read_all(str(folder))
    assert table.column_names == ["key", "caption", "image_embedding", "text_embedding"]
    img, txt = eio.matrix(table, "image_embedding"), eio.matrix(table, "text_embedding")
    assert img.dtype == np.float32 and img.shape == txt.shape == (table.num_rows, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    identity = eio.read_identity(files[0])
    assert identity["dim"] == 32 and identity["digest"].startswith("sha256:")
    assert _manifest(smoke_run, "filter")["metrics"]["kept"] == table.num_rows


def test_embed_rerun_replaces(smoke_run, tmp_path, capsys):
    import shutil

    # a copy: re-running embed in the shared smoke run would make every stage after it stale
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    folder = run_dir / "embed" / "embeddings"
    before = {f: eio.read_file(f).num_rows for f in eio.list_files(str(folder))}
    assert main(["stage", "embed", "--force", "preset=smoke", f"run_dir={run_dir}"]) == 0
    after = {f: eio.read_file(f).num_rows for f in eio.list_files(str(folder))}
    assert before == after


def test_clip_from_every_source_gives_same_embeddings(smoke_run, tmp_path):
    """Checkpoint folder, MLflow registry, and a plain weights file + open_clip arch name."""
    import mlflow
    import open_clip
    from safetensors.torch import save_file

    from unclip.registry import resolve_checkpoint

    folder = str(smoke_run / "clip" / "model")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), np.uint8))
              for i in range(4)]
    captions = ["a red circle", "a blue square above a green star", "a small star", "x"]
    ref = load_clip(folder)
    want_img, want_txt = ref.encode_images(images), ref.encode_text(captions)

    mlflow.set_tracking_uri(f"sqlite:///{smoke_run}/mlflow.db")
    registered = load_clip(resolve_checkpoint("models:/unclip-clip@champion",
                                              cache_dir=str(tmp_path / "cache")))
    np.testing.assert_allclose(registered.encode_images(images), want_img, atol=1e-6)
    np.testing.assert_allclose(registered.encode_text(captions), want_txt, atol=1e-6)

    cfg_dir = tmp_path / "arch"
    cfg_dir.mkdir()
    (cfg_dir / "unclip-smoke-test.json").write_text(json.dumps(ref.model_cfg))
    open_clip.add_model_config(str(cfg_dir))
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(weights))
    from_file = load_clip(str(weights), arch="unclip-smoke-test")
    np.testing.assert_allclose(from_file.encode_images(images), want_img, atol=1e-5)
    np.testing.assert_allclose(from_file.encode_text(captions), want_txt, atol=1e-5)

    with pytest.raises(LookupError, match="not found"):
        resolve_checkpoint("models:/no-such-model@champion", cache_dir=str(tmp_path / "cache"))


def test_text_tokens_match_pooled_embedding():
    from unclip.models.clip import ClipEncoder

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
                                           "layers": 1, "head_width": 8},
           "text_cfg": {"context_length": 12, "width": 16, "heads": 2, "layers": 1}}
    enc = ClipEncoder(create_custom(cfg), {"arch": "custom"}, cfg)
    pooled, tokens, mask = enc.encode_text_tokens(["a red circle", "a green star left of a blue square"])
    np.testing.assert_allclose(pooled, enc.encode_text(["a red circle",
                                                        "a green star left of a blue square"]), atol=1e-6)
    assert tokens.shape == (2, 12, 16) and mask.sum(1).tolist() == [5, 10]


@pytest.mark.slow
def test_clip_learns(tmp_path, ray_local):
    """A few epochs on 480 shapes images: held-out recall@5 far above its chance level."""
    run_dir = tmp_path / "learn"
    assert main(["stage", "clip", "preset=smoke", f"run_dir={run_dir}", "data.num_samples=480",
                 "clip.train.epochs=8", "clip.train.batch_size=32",
                 "clip.train.holdout_fraction=0.25"]) == 2  # needs its inputs first
    assert main(["run", "--until", "clip", "preset=smoke", f"run_dir={run_dir}", "data.num_samples=480",
                 "clip.train.epochs=8", "clip.train.batch_size=32",
                 "clip.train.holdout_fraction=0.25"]) == 0
    m = _manifest(run_dir, "clip")["metrics"]
    assert m["val_recall_at_5"] >= 3 * m["val_chance_at_5"], m
    assert m["val_recall_at_1"] >= 3 * m["val_chance_at_1"], m


def test_clip_weights_file_on_s3(smoke_run, s3_server, tmp_path, monkeypatch):
    """A weights file at an s3:// URI (moto server) loads like the local checkpoint."""
    import open_clip
    import s3fs
    from safetensors.torch import save

    from conftest import S3_SECRET, make_bucket

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    make_bucket(s3_server, "clip-weights")
    ref = load_clip(str(smoke_run / "clip" / "model"))
    cfg_dir = tmp_path / "arch"
    cfg_dir.mkdir()
    (cfg_dir / "unclip-smoke-s3.json").write_text(json.dumps(ref.model_cfg))
    open_clip.add_model_config(str(cfg_dir))
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing", secret=S3_SECRET)
    fs.pipe("clip-weights/w.safetensors",
            save({k: v.contiguous() for k, v in ref.model.state_dict().items()}))
    remote = load_clip("s3://clip-weights/w.safetensors", arch="unclip-smoke-s3")
    assert remote.identity["source"] == "s3://clip-weights/w.safetensors"
    captions = ["a red circle", "a blue star"]
    np.testing.assert_allclose(remote.encode_text(captions), ref.encode_text(captions), atol=1e-5)
