"""unclip against diffusers' unCLIP pipelines (Karlo's layout) as the oracle.

The components are tiny and randomly initialised, built here as diffusers' own (since removed)
UnCLIP fast tests built theirs, and saved with ``save_pretrained`` (safetensors): nothing is
downloaded. The tokenizer is a CLIP BPE tokenizer over a tiny vocabulary written here (diffusers'
tests fetch ``hf-internal-testing/tiny-random-clip`` from the hub). Unlike those tests, the
prior's ``clip_mean`` / ``clip_std`` are set to random values: left at their zero init, every
prior embedding is exactly zero and a prior comparison could not fail.

Parity is checked stage by stage (prior embedding, decoder image, super-resolution output) with
the same generator, steps and guidance, for ``UnCLIPPipeline`` and ``UnCLIPImageVariationPipeline``;
each comparison is shown to be able to fail (a guidance or a step count off by a little breaks it).
Each stage is run on the reference's own input to it (the generator is drawn in the same order
whatever the values), because Karlo's first step, at t = 999, divides the predicted noise by
sqrt(alpha_bar) = 5e-5: a float difference of 1e-7 upstream (another batch composition, a module
left in train mode) shows downstream as 1e-2 in places. End to end (``generate``, ``vary``, the
CLI), the 8-bit images are compared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ATOL = 1e-4
WIDTH = 32          # CLIP embedding width and text width
STEPS = dict(prior=3, decoder=3, super_res=3)
GUIDANCE = dict(prior=4.0, decoder=8.0)


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character table of GPT-2 / CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(folder: str):
    """A CLIPTokenizer over every byte (word-final and not), a few merges and the two specials."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    merges = ["r e", "re d</w>", "c i", "ci r", "b l", "bl u", "blu e</w>"]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def tiny_components(folder: str) -> dict:
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    tok = tiny_tokenizer(os.path.join(folder, "vocab"))
    text_encoder = _seeded(0, lambda: CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        vocab_size=len(tok), hidden_size=WIDTH, projection_dim=WIDTH, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2)).eval())
    image_encoder = _seeded(0, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=WIDTH, projection_dim=WIDTH, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, intermediate_size=37, patch_size=4)).eval())
    prior = _seeded(0, lambda: PriorTransformer(num_attention_heads=2, attention_head_dim=12,
                                                embedding_dim=WIDTH, num_layers=1))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # zero-init clip_std would make every prior output clip_mean (0)
        prior.clip_mean.copy_(0.1 * torch.randn(prior.clip_mean.shape, generator=g))
        prior.clip_std.copy_(1 + 0.2 * torch.randn(prior.clip_std.shape, generator=g))
    text_proj = _seeded(0, lambda: UnCLIPTextProjModel(clip_embeddings_dim=WIDTH, time_embed_dim=128,
                                                       cross_attention_dim=100))
    decoder = _seeded(0, lambda: UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity"))
    for module in (prior, text_proj, decoder):
        module.eval()  # as from_pretrained leaves them (train mode changes the float sums)
    sr = dict(sample_size=64, layers_per_block=1, in_channels=6, out_channels=3, block_out_channels=(32, 64),
              down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2)
    return dict(
        prior=prior, text_encoder=text_encoder, tokenizer=tok, text_proj=text_proj, decoder=decoder,
        image_encoder=image_encoder, feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        super_res_first=_seeded(0, lambda: UNet2DModel(**sr).eval()),
        super_res_last=_seeded(1, lambda: UNet2DModel(**sr).eval()),  # another UNet than the first
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))


TEXT = ("prior", "decoder", "text_encoder", "tokenizer", "text_proj", "super_res_first", "super_res_last",
        "prior_scheduler", "decoder_scheduler", "super_res_scheduler")
VARIATION = ("decoder", "text_encoder", "tokenizer", "text_proj", "feature_extractor", "image_encoder",
             "super_res_first", "super_res_last", "decoder_scheduler", "super_res_scheduler")


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    """Both diffusers pipelines on the same tiny components, saved; and our conversion of them."""
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline

    from unclip.interop.diffusers_import import convert

    root = tmp_path_factory.mktemp("karlo")
    c = tiny_components(str(root))
    pipe = UnCLIPPipeline(**{k: c[k] for k in TEXT})
    var = UnCLIPImageVariationPipeline(**{k: c[k] for k in VARIATION})
    for p in (pipe, var):
        p.set_progress_bar_config(disable=True)
    text_dir, var_dir = str(root / "karlo"), str(root / "karlo-variations")
    pipe.save_pretrained(text_dir, safe_serialization=True)
    var.save_pretrained(var_dir, safe_serialization=True)
    folders = convert(text_dir, str(root / "unclip"), image_encoder=var_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    return SimpleNamespace(pipe=pipe, var=var, text_dir=text_dir, var_dir=var_dir, folders=folders,
                           image=image)


@pytest.fixture(scope="module")
def cascade(karlo):
    from unclip.generation import ModelRefs, UnCLIP

    return UnCLIP(ModelRefs(**karlo.folders), device="cpu")


def _settings(**over):
    from unclip.generation.cascade import Settings

    base = dict(prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
                upsampler_steps=STEPS["super_res"], prior_guidance=GUIDANCE["prior"],
                decoder_guidance=GUIDANCE["decoder"])
    return Settings(**{**base, **over})


def _recorded(pipe, **kwargs):
    """The pipeline's output and what it computed between stages: the image embeddings its decoder
    was given (the prior's output, or the image encoder's) and its decoder's image."""
    seen = {}

    def before_text_proj(_module, _args, kw):
        seen["embedding"] = kw["image_embeddings"].detach().clone()

    hook = pipe.text_proj.register_forward_pre_hook(before_text_proj, with_kwargs=True)
    step = pipe.decoder_scheduler.step

    def recording_step(*a, **kw):
        out = step(*a, **kw)
        seen["decoder"] = out.prev_sample.clamp(-1, 1).detach().clone()
        return out

    pipe.decoder_scheduler.step = recording_step
    try:
        seen["final"] = torch.from_numpy(pipe(**kwargs, output_type="np").images).permute(0, 3, 1, 2)
    finally:
        hook.remove()
        del pipe.decoder_scheduler.step
    return seen


def _close(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return float((ours.float().cpu() - ref.float().cpu()).abs().max())


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """Our [-1, 1] images as the pipelines return them, in [0, 1]."""
    return (x.cpu() * 0.5 + 0.5).clamp(0, 1)


def test_text_to_image_matches_unclip_pipeline_stage_by_stage(karlo, cascade):
    n, prompt = 2, "a red circle"
    ref = _recorded(karlo.pipe, prompt=prompt, num_images_per_prompt=n,
                    generator=torch.Generator().manual_seed(0),
                    prior_num_inference_steps=STEPS["prior"], decoder_num_inference_steps=STEPS["decoder"],
                    super_res_num_inference_steps=STEPS["super_res"],
                    prior_guidance_scale=GUIDANCE["prior"], decoder_guidance_scale=GUIDANCE["decoder"])

    def ours(s):  # each stage on the reference's input to it; the generator is drawn alike
        g = torch.Generator().manual_seed(0)
        z = cascade.prior_sample([prompt] * n, s, g)
        x = cascade.decode(ref["embedding"], [prompt] * n, s, g)
        return z, x, cascade.upsample(ref["decoder"], s, g)[-1]

    z, x, up = ours(_settings())
    assert float(ref["embedding"].std()) > 0.05 and float(ref["decoder"].std()) > 0.05  # not trivial
    assert _close(z, ref["embedding"]) < ATOL
    assert _close(x, ref["decoder"]) < ATOL
    assert _close(_to_unit(up), ref["final"]) < ATOL
    assert up.shape[-1] == 64 and len(cascade.upsamplers) == 1

    # each comparison can fail: a guidance or a step count a little off is far outside ATOL
    z2, x2, _ = ours(_settings(prior_guidance=3.5))
    assert _close(z2, ref["embedding"]) > 100 * ATOL
    _, x3, up3 = ours(_settings(decoder_guidance=7.5))
    assert _close(x3, ref["decoder"]) > 100 * ATOL
    _, _, up4 = ours(_settings(upsampler_steps=STEPS["super_res"] + 1))
    assert _close(_to_unit(up4), ref["final"]) > 100 * ATOL


def test_unguided_prior_and_decoder_match_the_pipeline(karlo, cascade):
    """Guidance 1 in both: the pipeline runs no unconditional branch at all, and neither do we."""
    ref = _recorded(karlo.pipe, prompt="a blue cir", generator=torch.Generator().manual_seed(3),
                    prior_num_inference_steps=2, decoder_num_inference_steps=4,
                    super_res_num_inference_steps=2, prior_guidance_scale=1.0, decoder_guidance_scale=1.0)
    s = _settings(prior_steps=2, decoder_steps=4, upsampler_steps=2, prior_guidance=1.0, decoder_guidance=1.0)
    g = torch.Generator().manual_seed(3)
    z = cascade.prior_sample(["a blue cir"], s, g)
    x = cascade.decode(ref["embedding"], ["a blue cir"], s, g)
    up = cascade.upsample(ref["decoder"], s, g)[-1]
    assert _close(z, ref["embedding"]) < ATOL and _close(x, ref["decoder"]) < ATOL
    assert _close(_to_unit(up), ref["final"]) < ATOL


def test_generate_returns_the_pipelines_images(karlo, cascade):
    """`UnCLIP.generate` (what `unclip generate` runs) end to end, as 8-bit images."""
    ref = karlo.pipe(prompt="a red circle", num_images_per_prompt=2, generator=torch.Generator().manual_seed(7),
                     prior_num_inference_steps=3, decoder_num_inference_steps=3,
                     super_res_num_inference_steps=3, prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
                     output_type="pil").images
    stages = cascade.generate("a red circle", num_images=2, seed=7, settings=_settings())
    assert [im.size for im in stages[0]] == [(32, 32)] * 2 and [im.size for im in stages[-1]] == [(64, 64)] * 2
    for ours, theirs in zip(stages[-1], ref):
        diff = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
        assert diff.max() <= 1  # rounding of x*0.5+0.5 against (x+1)*127.5 only


def test_variations_match_unclip_image_variation_pipeline_stage_by_stage(karlo, cascade):
    n = 2
    ref = _recorded(karlo.var, image=karlo.image, num_images_per_prompt=n,
                    generator=torch.Generator().manual_seed(1),
                    decoder_num_inference_steps=STEPS["decoder"],
                    super_res_num_inference_steps=STEPS["super_res"],
                    decoder_guidance_scale=GUIDANCE["decoder"])

    def ours(s):
        g = torch.Generator().manual_seed(1)
        z = cascade.encode_images([karlo.image]).repeat(n, 1)
        x = cascade.decode(ref["embedding"], None, s, g)  # no caption: the empty one, as the pipeline
        return z, x, cascade.upsample(ref["decoder"], s, g)[-1]

    z, x, up = ours(_settings())
    assert _close(z, ref["embedding"]) < ATOL
    assert _close(x, ref["decoder"]) < ATOL
    assert _close(_to_unit(up), ref["final"]) < ATOL
    _, x2, _ = ours(_settings(decoder_steps=STEPS["decoder"] + 1))
    assert _close(x2, ref["decoder"]) > 100 * ATOL

    # `UnCLIP.vary` with fresh noise is this same computation, end to end
    stages = cascade.vary(karlo.image, num_images=n, seed=1, settings=_settings(), noise="fresh")
    want = (ref["final"].permute(0, 2, 3, 1).numpy() * 255).round()
    got = np.stack([np.asarray(im, np.float64) for im in stages[-1]])
    assert np.abs(got - want).max() <= 1


def test_imported_checkpoints_are_pickle_free_and_reload(karlo):
    """Every file the import writes is JSON, text or safetensors; each folder reloads alone."""
    from unclip import checkpoint
    from unclip.generation.models import load_stage
    from unclip.models.clip import load_clip

    for stage, folder in karlo.folders.items():
        for dirpath, _, files in os.walk(folder):
            for name in files:
                assert name.endswith((".json", ".txt", ".safetensors")), os.path.join(dirpath, name)
        meta = checkpoint.read_config(folder)
        assert meta["imported_from"]["source"] == karlo.text_dir
    clip = load_clip(karlo.folders["clip"])
    assert clip.backend == "transformers" and clip.dim == WIDTH and clip.has_images
    assert checkpoint.read_config(karlo.folders["prior"])["sampling"]["sampler"] == "unclip"
    with pytest.raises(checkpoint.CheckpointError, match="not a decoder"):
        load_stage(karlo.folders["prior"], "decoder")


def test_import_refuses_pickled_weights_and_other_folders(karlo, tmp_path, capsys):
    from unclip.cli import main

    bad = tmp_path / "pickled"
    shutil.copytree(karlo.text_dir, bad)
    os.remove(bad / "decoder" / "diffusion_pytorch_model.safetensors")
    (bad / "decoder" / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle")
    assert main(["import-diffusers", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    assert "no .safetensors weights" in capsys.readouterr().err
    assert main(["import-diffusers", str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert not (tmp_path / "run" / "mlflow.db").exists()


def _pngs(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.endswith(".png") and "grid" not in p)


@pytest.mark.slow  # registers into a sqlite MLflow: make test runs it, make test-fast leaves it out
def test_import_diffusers_then_generate_vary_interpolate_edit_through_the_cli(karlo, tmp_path,
                                                                              monkeypatch, capsys):
    """`unclip import-diffusers` into a run's sqlite MLflow, then the generation commands on it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking import fluent

    from unclip.cli import main

    run = str(tmp_path / "run")
    monkeypatch.setenv("UNCLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)  # neither inherit nor leak
    previous = mlflow.get_tracking_uri()
    try:
        assert main(["import-diffusers", karlo.text_dir, "--image-encoder", karlo.var_dir,
                     "--run-dir", run, "--alias", "karlo"]) == 0
        printed = capsys.readouterr().out.split("\n")
        assert sorted(line.split("\t")[0] for line in printed if line) == \
            ["clip", "decoder", "prior", "unclip", "upsampler1"]
        client = MlflowClient()
        version = client.get_model_version_by_alias("unclip-decoder", "karlo")
        assert version.tags["unclip.backend"] == "diffusers"
        exp = mlflow.get_experiment_by_name("unclip")
        assert exp.artifact_location == "file://" + os.path.join(os.path.abspath(run), "mlartifacts")

        image = str(tmp_path / "in.png")
        karlo.image.save(image)
        common = ["--run-dir", run, "--alias", "karlo", "--prior-steps", "3", "--decoder-steps", "3",
                  "--upsampler-steps", "3", "--seed", "7"]
        out = tmp_path / "gen"
        assert main(["generate", "a red circle", "--num-images", "2", "--prior-guidance", "4",
                     "--decoder-guidance", "8", "--out", str(out), "--all-resolutions", *common]) == 0
        names = _pngs(out)
        assert sorted({Image.open(out / n).size[0] for n in names}) == [32, 64] and len(names) == 4
        # the registered models generate what the pipeline generates
        ref = karlo.pipe(prompt="a red circle", num_images_per_prompt=2, generator=torch.Generator().manual_seed(7),
                         prior_num_inference_steps=3, decoder_num_inference_steps=3,
                         super_res_num_inference_steps=3, prior_guidance_scale=4.0,
                         decoder_guidance_scale=8.0, output_type="pil").images
        finals = [n for n in names if "px" not in n]
        for name, theirs in zip(finals, ref):
            diff = np.abs(np.asarray(Image.open(out / name), np.int16) - np.asarray(theirs, np.int16))
            assert diff.max() <= 1

        # inverted-noise variations, interpolations and edits: our DDIM through the imported decoder
        assert main(["vary", image, "--num-images", "2", "--out", str(tmp_path / "v"), *common]) == 0
        assert len(_pngs(tmp_path / "v")) == 2
        assert main(["interpolate", image, image, "--frames", "3", "--noise", "interpolated",
                     "--out", str(tmp_path / "i"), "--no-upsample", *common]) == 0
        assert len(_pngs(tmp_path / "i")) == 3
        assert main(["edit", image, "--from", "a red circle", "--to", "a blue circle", "--frames", "2",
                     "--out", str(tmp_path / "e"), *common]) == 0
        assert [Image.open(tmp_path / "e" / n).size for n in _pngs(tmp_path / "e")] == [(64, 64)] * 2
    finally:
        mlflow.set_tracking_uri(previous)


def test_import_from_s3_stages_no_pickles(karlo, s3_server, tmp_path, monkeypatch):
    """An s3:// prefix is staged with its safetensors, JSON and text files only."""
    import s3fs

    from conftest import make_bucket
    from unclip.interop.diffusers_import import convert, local_pipeline

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    make_bucket(s3_server, "karlo")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing",
                           secret=s3_server["AWS_SECRET_ACCESS_KEY"])
    fs.put(karlo.text_dir + "/", "karlo/pipe/", recursive=True)
    fs.pipe("karlo/pipe/prior/diffusion_pytorch_model.bin", b"a pickle would be here")
    with local_pipeline("s3://karlo/pipe") as folder:
        assert not os.path.exists(os.path.join(folder, "prior", "diffusion_pytorch_model.bin"))
        folders = convert(folder, str(tmp_path / "out"), source="s3://karlo/pipe")
    assert set(folders) == {"clip", "prior", "decoder", "upsampler1"}


@pytest.mark.slow  # a subprocess: make test runs it, make test-fast leaves it out
def test_unclip_imports_without_transformers():
    """The dependency direction: only an imported CLIP or an import needs transformers."""
    code = ("import sys; import unclip, unclip.cli, unclip.generation.cascade, "
            "unclip.interop.karlo_models; "
            "assert 'transformers' not in sys.modules, sorted(m for m in sys.modules if 'transformers' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_our_own_models_still_go_through_the_cascade(tmp_path):
    """The cascade's dispatch (our kinds or imported ones) leaves our own models as they were:
    unit-norm embeddings, our samplers, both upsamplers; the unclip sampler is refused for them."""
    from bench.serving import build_tiny_models
    from unclip.generation import ModelRefs, UnCLIP
    from unclip.generation.cascade import Settings
    from unclip.generation.images import InputError

    folders = build_tiny_models(tmp_path, sampling=False)
    model = UnCLIP(ModelRefs(**folders), device="cpu")
    assert not model.imported and not model.raw and len(model.upsamplers) == 2
    s = Settings(prior_steps=2, decoder_steps=2, upsampler_steps=2)
    stages = model.generate("a red circle", num_images=2, seed=0, settings=s)
    assert [im.size[0] for im in (st[0] for st in stages)] == [8, 32, 128]
    z = model.prior_sample(["a red circle"], s, torch.Generator().manual_seed(0))
    assert abs(float(z.norm()) - 1) < 1e-5
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    no_up = Settings(prior_steps=2, decoder_steps=2, upsample=False)
    assert len(model.vary(image, 2, settings=no_up)[-1]) == 2
    assert len(model.interpolate(image, image, 3, noise="interpolated", settings=no_up)[-1]) == 3
    assert len(model.edit(image, "a red circle", "a blue square", 2, settings=no_up)[-1]) == 2
    with pytest.raises(InputError, match="imported decoders only"):
        model.generate("a red circle", settings=Settings(prior_steps=2, decoder_sampler="unclip"))


@pytest.mark.slow  # ~9 s of training: make test runs it, make test-fast leaves it out
def test_imported_decoder_fine_tunes_with_guidance_dropout(karlo, cascade, tmp_path):
    """KarloDecoder.training_losses: its conditional branch is the sampler's, a row with both
    conditions dropped is guidance's unconditional half (text_proj's learned image embedding and
    the empty caption), and fine-tuning on shapes lowers the loss on held-out images."""
    from unclip.data.shapes import render, sample_scene
    from unclip.interop.karlo_models import KarloDecoder
    from unclip.models.decoder import dropout_masks

    dec = KarloDecoder.from_checkpoint(karlo.folders["decoder"])
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(40)]
    images = [render(s, 32) for s in scenes]
    with torch.no_grad():
        z = cascade.encode_images(images).float()
        text = cascade.encode_text([s.caption for s in scenes])
    x0 = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2)
    x0 = x0 / 127.5 - 1

    def rows(sl):
        return z[sl], tuple(v[sl] for v in text)

    def unet(cond, x, t):
        ctx, temb, mask = cond
        return dec.unet(sample=x, timestep=t, encoder_hidden_states=ctx, class_labels=temb,
                        attention_mask=mask).sample

    x = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 20])
    with torch.no_grad():
        zs, ts = rows(slice(0, 2))
        torch.testing.assert_close(unet(dec.conditioning(zs, ts), x, t), dec.denoiser(zs, ts, 1.0)(x, t))
        both = torch.ones(2, dtype=torch.bool)
        uncond = unet(dec.conditioning(zs, ts, drop_image=both, drop_text=both), x, t)
        # guidance 0 leaves the unconditional half's mean (the variance is the conditional one's)
        torch.testing.assert_close(uncond[:, :3], dec.denoiser(zs, ts, 0.0)(x, t)[:, :3])
        assert not torch.allclose(uncond[:, :3], unet(dec.conditioning(zs, ts), x, t)[:, :3])

    def held_out() -> float:
        dec.eval()
        with torch.no_grad():
            zs, ts = rows(slice(32, 40))
            losses = dec.training_losses(x0[32:], zs, ts, generator=torch.Generator().manual_seed(0))
        return float(losses["loss"].mean())

    before = held_out()
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for step in range(12):
        dec.train()
        idx = torch.randperm(32, generator=g)[:8]
        drop_image, drop_text = dropout_masks(8, 0.1, 0.5, g)
        losses = dec.training_losses(x0[idx], z[idx], tuple(v[idx] for v in text), drop_image,
                                     drop_text, generator=g)
        assert {"mse", "vlb", "loss"} <= set(losses)  # learned_range: the bound trains the variance
        opt.zero_grad()
        losses["loss"].mean().backward()
        opt.step()
    after = held_out()
    print(f"imported decoder, held-out loss: {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    dec.save(str(tmp_path / "tuned"))
    dec = KarloDecoder.from_checkpoint(str(tmp_path / "tuned"))
    assert held_out() == pytest.approx(after, rel=1e-5)


def test_imported_prior_fine_tunes_on_raw_embeddings(karlo, cascade):
    """KarloPrior.losses: x0 MSE on the normalised latent of raw CLIP image embeddings; with every
    caption kept its branch is the sampler's conditional one, and fine-tuning on shapes lowers the
    held-out loss while clip_mean / clip_std stay as imported."""
    from unclip.data.shapes import render, sample_scene
    from unclip.interop.karlo_models import KarloPrior

    prior = KarloPrior.from_checkpoint(karlo.folders["prior"]).freeze_statistics()
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(48)]
    with torch.no_grad():
        z = cascade.encode_images([render(s, 32) for s in scenes]).float()
        emb, states, mask = cascade.encode_text([s.caption for s in scenes])
    assert float(z.norm(dim=-1).std()) > 0  # raw projections, not unit ones
    stats = {k: v.clone() for k, v in prior.state_dict().items() if k.startswith("prior.clip_")}

    x = torch.randn((2, z.shape[1]), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([700, 30])
    with torch.no_grad():
        want = prior.prior(x, timestep=t, proj_embedding=emb[:2], encoder_hidden_states=states[:2],
                           attention_mask=mask[:2]).predicted_image_embedding
        torch.testing.assert_close(prior(x, t, emb[:2], states[:2], mask[:2]), want)
        null = prior(x, t, emb[:2], states[:2], mask[:2], drop=torch.ones(2, dtype=torch.bool))
        torch.testing.assert_close(null, prior(x, t, *(v[:2] for v in (prior.null_text(2)))))

    def held_out() -> float:
        with torch.no_grad():
            return float(prior.losses(z[40:], states[40:], mask[40:], emb[40:],
                                      torch.Generator().manual_seed(0), cond_drop_prob=0.0)["loss"])

    before = held_out()
    opt = torch.optim.AdamW([p for p in prior.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        idx = torch.randperm(40, generator=g)[:16]
        loss = prior.losses(z[idx], states[idx], mask[idx], emb[idx], g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    print(f"imported prior, held-out x0 loss: {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    assert all(torch.equal(prior.state_dict()[k], v) for k, v in stats.items())


def test_imported_super_res_fine_tunes_both_unets(karlo):
    """KarloSuperRes.losses: super_res_first over the whole schedule and super_res_last in the last
    step's interval, each on concat(x_t, bicubic(low)) as the pipelines call them; fine-tuning on
    shapes crops lowers both held-out losses."""
    from unclip.data.shapes import render, sample_scene
    from unclip.interop.karlo_models import KarloSuperRes

    sr = KarloSuperRes.from_checkpoint(karlo.folders["upsampler1"])
    assert sr.last_interval == 999 // (sr.steps - 1)
    rng = np.random.default_rng(2)
    # 16 px crops (the UNets are conv-only: training crops need not be their sample_size)
    hr = torch.from_numpy(np.stack([np.asarray(render(sample_scene(rng), 16), np.float32)
                                    for _ in range(24)])).permute(0, 3, 1, 2) / 127.5 - 1
    low = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area")
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 0])
    with torch.no_grad():
        up = torch.nn.functional.interpolate(low[:2], size=[16, 16], mode="bicubic", align_corners=False,
                                             antialias=True)
        torch.testing.assert_close(sr(x, t, low[:2], last=True),
                                   sr.last(sample=torch.cat([x, up], 1), timestep=t).sample)

    def held_out() -> tuple[float, float]:
        with torch.no_grad():
            out = sr.losses(hr[16:], low[16:], torch.Generator().manual_seed(0))
        return float(out["loss_first"]), float(out["loss_last"])

    before = held_out()
    opt = torch.optim.AdamW(sr.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        idx = torch.randperm(16, generator=g)[:8]
        loss = sr.losses(hr[idx], low[idx], g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    print(f"imported super-resolution, held-out loss first {before[0]:.4f} -> {after[0]:.4f}, "
          f"last {before[1]:.4f} -> {after[1]:.4f}")
    assert after[0] < 0.7 * before[0] and after[1] < 0.7 * before[1]
