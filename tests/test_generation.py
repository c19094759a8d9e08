"""Every `unclip` command on the models the smoke pipeline registered (a real MLflow store)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from unclip.cli import main


@pytest.fixture(scope="module")
def store(smoke_run, tmp_path_factory):
    """The smoke run's store, and two of its training images as inputs."""
    from unclip.data.loading import iter_decoded
    from unclip.data.shards import list_shards

    rows = list(iter_decoded(list_shards(str(smoke_run / "filter" / "shards"))[0]))[:2]
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for i, row in enumerate(rows):
        paths.append(str(folder / f"in{i}.png"))
        Image.fromarray(row["image"]).save(paths[-1])
    return str(smoke_run), paths


def _run(store, *args):
    run_dir, _ = store
    return main([*args, "--run-dir", run_dir, "--prior-steps", "4", "--decoder-steps", "4",
                 "--upsampler-steps", "2"])


def _pngs(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".png") and "grid" not in p)


def test_generate_writes_final_and_intermediate_resolutions(store, tmp_path, capsys):
    assert _run(store, "generate", "a red circle", "--num-images", "2", "--seed", "3",
                "--out", str(tmp_path), "--all-resolutions") == 0
    names = _pngs(tmp_path)
    sizes = sorted({Image.open(tmp_path / n).size[0] for n in names})
    assert len(names) == 6 and sizes == [8, 32, 128]  # smoke: decoder 8 -> 32 -> 128
    assert (tmp_path / "a_red_circle_grid.png").exists()
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and all(os.path.exists(p) for p in printed)


def test_generate_is_deterministic_for_a_seed(store, tmp_path):
    for sub in ("a", "b"):
        assert _run(store, "generate", "a blue square", "--num-images", "1", "--seed", "5",
                    "--out", str(tmp_path / sub), "--no-upsample") == 0
    a, b = (Image.open(tmp_path / s / _pngs(tmp_path / s)[0]).tobytes() for s in ("a", "b"))
    assert a == b


def test_vary_interpolate_edit_pca(store, tmp_path):
    _, (img_a, img_b) = store
    assert _run(store, "vary", img_a, "--num-images", "3", "--out", str(tmp_path / "v")) == 0
    assert len(_pngs(tmp_path / "v")) == 3
    for noise in ("fixed", "interpolated"):
        out = tmp_path / f"i-{noise}"
        assert _run(store, "interpolate", img_a, img_b, "--frames", "4", "--noise", noise,
                    "--out", str(out), "--no-upsample") == 0
        assert len(_pngs(out)) == 4
    assert _run(store, "edit", img_a, "--from", "a red circle", "--to", "a blue square",
                "--frames", "3", "--out", str(tmp_path / "e"), "--no-upsample") == 0
    assert len(_pngs(tmp_path / "e")) == 3
    assert _run(store, "pca-reconstruct", img_a, "--dims", "1,2,4", "--out", str(tmp_path / "p"),
                "--no-upsample") == 0
    assert len(_pngs(tmp_path / "p")) == 3


def test_batch_writes_a_png_per_prompt_and_seed_and_an_index(store, tmp_path, ray_local):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\na green triangle above a blue square\n")
    out = tmp_path / "batch"
    assert _run(store, "batch", str(prompts), "--seeds", "0,1", "--out", str(out), "--no-upsample") == 0
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [(r["prompt"], r["seed"]) for r in index] == [
        ("a red circle", 0), ("a red circle", 1),
        ("a green triangle above a blue square", 0), ("a green triangle above a blue square", 1)]
    assert all(os.path.exists(r["path"]) and Image.open(r["path"]).size == (8, 8) for r in index)


@pytest.mark.parametrize("args, message", [
    (["generate", "   "], "the prompt is empty"),
    (["vary", "/no/such/image.png"], "no such file"),
    (["generate", "a red circle", "--decoder", "models:/no-such-model@champion"], "no-such-model"),
])
def test_errors_are_one_line(store, tmp_path, capsys, args, message):
    assert _run(store, *args, "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]


def test_unreadable_image_is_one_line(store, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    assert _run(store, "vary", str(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: not a readable image")


# ---- the cascade's semantics, through the Python API ---------------------------------------------


@pytest.fixture(scope="module")
def cascade(store):
    import mlflow

    from unclip.generation import ModelRefs, UnCLIP

    run_dir, paths = store
    mlflow.set_tracking_uri(f"sqlite:///{run_dir}/mlflow.db")
    return UnCLIP(ModelRefs.registered("champion")), [Image.open(p).convert("RGB") for p in paths]


def _recording(model, monkeypatch):
    """Every (z_i, x_T) the cascade decodes, in order."""
    calls = []
    decode = type(model).decode

    def spy(self, z_i, prompts, s, generator=None, x_T=None, inverted=False):
        calls.append((z_i.detach().clone(), None if x_T is None else x_T.detach().clone()))
        return decode(self, z_i, prompts, s, generator, x_T, inverted)

    monkeypatch.setattr(type(model), "decode", spy)
    return calls


def test_sampling_defaults_are_as_trained(cascade):
    """Settings() takes what the prior and decoder stages validated with (smoke: prior 16 steps,
    decoder 8), recorded in their checkpoints; a value given wins; inverted noise decodes at 1."""
    from unclip.generation.cascade import Settings

    model, _ = cascade
    assert model.trained["decoder"]["steps"] == 8 and model.trained["prior"]["steps"] == 16
    s = model.resolve(Settings())
    assert (s.prior_steps, s.decoder_steps, s.decoder_sampler) == (16, 8, model.trained["decoder"]["sampler"])
    assert s.prior_guidance == model.trained["prior"]["guidance_scale"]
    assert s.decoder_guidance == model.trained["decoder"]["guidance_scale"] and s.decoder_eta == 0.0
    given = model.resolve(Settings(decoder_steps=3, prior_guidance=2.5, decoder_guidance=1.5))
    assert (given.decoder_steps, given.prior_guidance, given.decoder_guidance) == (3, 2.5, 1.5)
    assert model.resolve(Settings(), inverted=True).decoder_guidance == 1.0


def test_interpolation_endpoints_are_the_inputs_decodes(cascade, monkeypatch):
    import torch
    import torch.nn.functional as F

    model, (a, b) = cascade
    calls = _recording(model, monkeypatch)
    frames = model.interpolate(a, b, frames=4, seed=1)[0]
    z, x_T = calls[-1]
    want = model.encode_images([a, b])
    torch.testing.assert_close(z[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(z[-1], want[1], atol=1e-5, rtol=0)
    # the middle frames lie on the great circle between them, in order
    cos_a = F.cosine_similarity(z, want[:1]).tolist()
    assert cos_a == sorted(cos_a, reverse=True) and cos_a[0] > cos_a[-1]
    # and frame 0 is exactly the decode of z_a from that noise
    again = model.decode(want[:1], None, model.resolve(None), torch.Generator().manual_seed(1), x_T=x_T[:1])
    from unclip.generation.images import to_pil

    assert to_pil(again)[0].tobytes() == frames[0].tobytes()


def test_edit_frames_move_toward_the_target_caption(cascade, monkeypatch):
    import torch.nn.functional as F

    model, (a, _) = cascade
    calls = _recording(model, monkeypatch)
    model.edit(a, "a red circle", "a blue square", frames=4, max_theta=0.5, settings=None)
    z, x_T = calls[-1]
    z_src, z_tgt = model.encode_text(["a red circle"])[0], model.encode_text(["a blue square"])[0]
    z_d = F.normalize(z_tgt - z_src, dim=-1)
    toward = F.cosine_similarity(z, z_d).tolist()
    assert all(later > earlier for earlier, later in zip(toward, toward[1:])), toward
    assert F.cosine_similarity(z[:1], model.encode_images([a])).item() > 0.9999
    assert x_T is not None and (x_T == x_T[:1]).all()  # one inverted x_T for every frame


def test_pca_reconstruction_decodes_the_k_component_projection(cascade, monkeypatch):
    import numpy as np

    from unclip.embeddings.pca import PCA
    from unclip.generation.models import resolve

    model, (a, _) = cascade
    calls = _recording(model, monkeypatch)
    model.pca_reconstruct(a, [1, 3])
    z, _ = calls[-1]
    pca = PCA.load(resolve("models:/unclip-pca@champion"))
    zi = model.encode_images([a]).cpu().numpy().astype(np.float64)
    for row, k in zip(z.cpu().numpy(), (1, 3)):
        proj = pca.inverse_transform(pca.transform(zi, n=k))[0]
        np.testing.assert_allclose(row, proj / np.linalg.norm(proj), atol=1e-5)
        # and it differs from the full embedding: k components drop the rest
        assert np.abs(row - zi[0]).max() > 1e-3


def test_variations_are_centred_on_the_input(cascade):
    """The paper's variations: the input's inverted x_T with its z_i. At eta 0 DDIM gives the
    decoder's reconstruction of the input back for every variation (identical); with eta > 0 they
    differ, more so at a larger eta."""
    import numpy as np

    from unclip.generation.cascade import Settings

    model, (a, _) = cascade

    def spread(eta):
        s = Settings(decoder_eta=eta, upsample=False, decoder_steps=8)
        imgs = np.stack([np.asarray(im, np.float64) for im in model.vary(a, 3, seed=2, settings=s)[0]])
        return float(np.abs(imgs - imgs.mean(0)).mean())

    assert spread(0.0) == 0.0
    low, high = spread(0.3), spread(1.0)
    assert 0.0 < low < high, (low, high)
    from unclip.generation.images import InputError

    with pytest.raises(InputError, match="inverted"):
        model.vary(a, 2, noise="other")
