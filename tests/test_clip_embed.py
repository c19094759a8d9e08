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
    assert table.column_names == ["key", "caption", "image_embedding", "text_embedding", eio.NORM]
    img, txt = eio.matrix(table, "image_embedding"), eio.matrix(table, "text_embedding")
    assert img.dtype == np.float32 and img.shape == txt.shape == (table.num_rows, 32)
    norms = table.column(eio.NORM).to_numpy()
    assert norms.dtype == np.float32 and (norms > 0).all() and norms.std() > 0  # the raw projections' norms
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
                 "holdout_fraction=0.25"]) == 2  # needs its inputs first
    assert main(["run", "--until", "clip", "preset=smoke", f"run_dir={run_dir}", "data.num_samples=480",
                 "clip.train.epochs=8", "clip.train.batch_size=32",
                 "holdout_fraction=0.25"]) == 0
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
    remote.save_reference(str(tmp_path / "record"))  # what the clip stage writes for this source
    again = load_clip(str(tmp_path / "record"))
    assert again.identity["source"] == "s3://clip-weights/w.safetensors"
    np.testing.assert_allclose(again.encode_text(captions), ref.encode_text(captions), atol=1e-5)


# ---- CLIP identity: one record, every source, any device ----------------------------------------

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
                                             "layers": 1, "head_width": 8},
             "text_cfg": {"context_length": 12, "width": 16, "heads": 2, "layers": 1}}


def _stand_in_tag(tmp_path, arch: str, tag: str):
    """A locally saved open_clip model standing in for a hub tag: ``arch`` registered from its JSON
    config, ``tag`` in open_clip's pretrained table pointing at a weights file (no hub here)."""
    import open_clip
    from open_clip import pretrained as op
    from safetensors.torch import save_file

    (tmp_path / f"{arch}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(tmp_path / f"{arch}.json"))
    model = create_custom(TINY_CLIP)
    weights = tmp_path / f"{arch}-{tag}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    op._PRETRAINED.setdefault(arch, {})[tag] = {"file": str(weights)}
    return model, weights


def _images(n=3):
    return [Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), np.uint8))
            for i in range(n)]


def test_clip_encoder_feeds_the_models_device():
    """Every encode path moves its CPU-built inputs to the model's device: on the meta device a
    CPU tensor reaching any submodule is caught by a hook (the encoder used to feed CPU tensors
    to the model wherever it sat, which crashed embed and the cascade on GPUs)."""
    import torch

    from unclip.models.clip import ClipEncoder

    with torch.device("meta"):
        model = create_custom(TINY_CLIP)
    enc = ClipEncoder(model, {"arch": "custom"}, TINY_CLIP)
    seen = set()

    def hook(_module, args, kwargs):
        seen.update(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))

    for m in model.modules():
        m.register_forward_pre_hook(hook, with_kwargs=True)
    assert enc.encode_images(_images(2)).shape == (2, 16)
    assert enc.encode_text(["a red circle"]).shape == (1, 16)
    pooled, states, mask = enc.encode_text_tokens(["a red circle", "a blue star"])
    assert states.shape == (2, 12, 16) and mask.shape == (2, 12)
    from unclip.models.decoder_sampling import caption_condition  # the decoder's caption input

    assert caption_condition(enc, ["a red circle"]).states.device.type == "meta"
    assert seen == {"meta"}, seen


@pytest.mark.slow  # registers into a sqlite MLflow: make test runs it, make test-fast leaves it out
def test_clip_reference_from_tag_file_and_registry(tmp_path, monkeypatch):
    """pretrained:<tag>, a weights file and a registry model each resolve to a reference folder
    that loads the same CLIP with no architecture given; changed weights are refused."""
    import mlflow

    from unclip.checkpoint import CheckpointError
    from unclip.models.clip import ClipEncoder
    from unclip.registry import register_checkpoint

    model, weights = _stand_in_tag(tmp_path, "unclip-ref-test", "standin")
    want = ClipEncoder(model, {"arch": "custom"})
    images, captions = _images(), ["a red circle", "a photo of a dog"]
    want_img, want_txt = want.encode_images(images), want.encode_text(captions)

    tagged = load_clip("pretrained:standin", "unclip-ref-test")
    assert tagged.identity["kind"] == "tag" and tagged.identity["source"] == "pretrained:standin"
    assert tagged.identity["digest"].startswith("sha256:")
    from_file = load_clip(str(weights), "unclip-ref-test")
    assert from_file.identity["digest"] == tagged.identity["digest"]
    for i, enc in enumerate((tagged, from_file)):
        folder = tmp_path / f"ref{i}"
        enc.save_reference(str(folder))
        assert not (folder / "model.safetensors").exists()
        back = load_clip(str(folder))  # no arch: the record says it
        assert back.identity["source"] == enc.identity["source"] and back.dim == 16
        np.testing.assert_allclose(back.encode_images(images), want_img, atol=1e-5)
        np.testing.assert_allclose(back.encode_text(captions), want_txt, atol=1e-5)

    with pytest.raises(ValueError, match="not a known open_clip tag.*standin"):
        load_clip("pretrained:nope", "unclip-ref-test")
    with pytest.raises(ValueError, match="set clip.arch"):
        load_clip(str(weights))
    with pytest.raises(ValueError, match="not pretrained:<tag>"):
        load_clip(str(tmp_path / "missing.pt"), "unclip-ref-test")

    # the registry: an alias is pinned to its version in the record
    monkeypatch.setenv("UNCLIP_CACHE_DIR", str(tmp_path / "cache"))
    from mlflow.tracking import fluent

    # globals: this test neither inherits another store's active experiment nor leaves its own
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    previous = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        mlflow.set_experiment("clip-reference")
        trained = ClipEncoder(create_custom(TINY_CLIP), {"arch": "custom"}, TINY_CLIP)
        trained.save(str(tmp_path / "trained"))
        with mlflow.start_run():
            version, _ = register_checkpoint(str(tmp_path / "trained"), "ref-clip", None)
        reg = load_clip("models:/ref-clip@champion")
        assert reg.identity["source"] == f"models:/ref-clip/{version}"
        reg.save_reference(str(tmp_path / "ref-reg"))
        np.testing.assert_allclose(load_clip(str(tmp_path / "ref-reg")).encode_text(captions),
                                   trained.encode_text(captions), atol=1e-6)
    finally:
        mlflow.set_tracking_uri(previous)

    # weights that change under a recorded CLIP are refused, naming the file
    from_file.save_reference(str(tmp_path / "ref-changed"))
    from safetensors.torch import save_file

    other = create_custom(TINY_CLIP)  # other random weights under the same name
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    with pytest.raises(CheckpointError, match="changed since they were recorded"):
        load_clip(str(tmp_path / "ref-changed"))


@pytest.mark.slow
def test_pipeline_with_a_pretrained_clip(tmp_path, ray_local):
    """clip.source=pretrained:<tag>: the clip stage records it, embed's Ray actors load it from that
    record alone (their processes know neither the architecture nor the tag), no clip.arch after."""
    _stand_in_tag(tmp_path, "unclip-ref-pipe", "standin")
    run_dir = tmp_path / "run"
    assert main(["run", "--until", "embed", "preset=smoke", f"run_dir={run_dir}",
                 "data.num_samples=48", "clip.source=pretrained:standin",
                 "clip.arch=unclip-ref-pipe"]) == 0
    clip_m = _manifest(run_dir, "clip")
    ref = json.loads((run_dir / "clip" / "model" / "config.json").read_text())["reference"]
    assert ref["kind"] == "tag" and ref["arch"] == "unclip-ref-pipe" and ref["digest"].startswith("sha256:")
    assert clip_m["outputs"]["model"].endswith("model") and clip_m["metrics"]["dim"] == 16
    identity = eio.read_identity(eio.list_files(str(run_dir / "embed" / "embeddings"))[0])
    assert identity["source"] == "pretrained:standin" and identity["digest"] == ref["digest"]
