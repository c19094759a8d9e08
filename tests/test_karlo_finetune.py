"""The clip, prior, decoder and upsample1 stages fine-tune imported (diffusers / Karlo) models: ``clip.source`` is the
CLIP imported with them, the embed stage stores the embeddings' norms so the raw projections Karlo
reads come back, and ``decoder.init_from`` / ``prior.init_from=models:/unclip-*@karlo`` train the
imported modules on the run's data (the smoke data) and register the results in the imported
layout, which then generate together. Tiny diffusers components built here (nothing downloaded),
at the smoke decoder's 8 px."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from test_diffusers_interop import TEXT, VARIATION, _seeded, tiny_components


def _karlo_folders(root, side: int) -> tuple[str, str]:
    """UnCLIPPipeline and UnCLIPImageVariationPipeline folders whose decoder draws ``side`` px."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline

    c = tiny_components(str(root))
    c["decoder"] = _seeded(0, lambda: UNet2DConditionModel(
        sample_size=side, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity").eval())
    # super-resolution at the smoke upsample1's sides (8 -> 32), conv-only as Karlo's
    sr = dict(sample_size=4 * side, layers_per_block=1, in_channels=6, out_channels=3,
              block_out_channels=(32, 64), down_block_types=("ResnetDownsampleBlock2D",) * 2,
              up_block_types=("ResnetUpsampleBlock2D",) * 2)
    c["super_res_first"] = _seeded(0, lambda: UNet2DModel(**sr).eval())
    c["super_res_last"] = _seeded(1, lambda: UNet2DModel(**sr).eval())
    text_dir, var_dir = str(root / "karlo"), str(root / "karlo-variations")
    UnCLIPPipeline(**{k: c[k] for k in TEXT}).save_pretrained(text_dir, safe_serialization=True)
    UnCLIPImageVariationPipeline(**{k: c[k] for k in VARIATION}).save_pretrained(
        var_dir, safe_serialization=True)
    return text_dir, var_dir


def test_stages_fine_tune_imported_models(smoke_run, tmp_path, monkeypatch):
    from mlflow.tracking import fluent

    from pipelines.cli import main
    from pipelines.manifest import read_manifest
    from unclip import checkpoint
    from unclip.cli import main as unclip_main
    from unclip.embeddings import io as eio
    from unclip.interop.karlo_models import DECODER_KIND, PRIOR_KIND, SUPER_RES_KIND, KarloDecoder

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("decoder", "decoder-*"))
    text_dir, var_dir = _karlo_folders(tmp_path, side=8)
    monkeypatch.setenv("UNCLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    assert unclip_main(["import-diffusers", text_dir, "--image-encoder", var_dir,
                        "--run-dir", str(run_dir), "--alias", "karlo"]) == 0
    source = KarloDecoder.from_checkpoint(_registered(run_dir))
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which the stages would follow: they
    # must use the copy's own store (conftest restores the variable after the test)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    common = ["preset=smoke", f"run_dir={run_dir}", "clip.source=models:/unclip-clip@karlo"]
    assert main(["stage", "clip", *common]) == 0
    assert main(["stage", "embed", *common]) == 0
    files = eio.list_files(read_manifest(str(run_dir), "embed").outputs["embeddings"])
    table = eio.read_file(files[0])
    assert eio.NORM in table.column_names
    unit = eio.matrix(table, "image_embedding")
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert float(np.std(table.column(eio.NORM).to_numpy())) > 0  # real norms, not a constant

    assert main(["stage", "decoder", *common, "decoder.init_from=models:/unclip-decoder@karlo",
                 "decoder.train.total_steps=40", "decoder.train.lr=1e-3", "decoder.train.warmup_steps=2",
                 "decoder.eval.num_images=8", "decoder.eval.grid_every=40"]) == 0
    m = read_manifest(str(run_dir), "decoder")
    assert m.metrics["init_from"] == "models:/unclip-decoder@karlo"
    assert m.metrics["init_from_pinned"].startswith("models:/unclip-decoder/")
    print(f"imported decoder fine-tuned in the stage: held-out loss {m.metrics['init_val_loss']:.4f} "
          f"-> {m.metrics['val_loss']:.4f}, CLIP cosine {m.metrics['val_clip_cosine']:.3f} "
          f"(mismatched {m.metrics['val_clip_cosine_mismatched']:.3f})")
    assert m.metrics["val_loss"] < 0.8 * m.metrics["init_val_loss"]  # it learned the run's images
    assert np.isfinite(m.metrics["val_clip_cosine"])
    tuned_meta = checkpoint.read_config(m.outputs["model"])
    assert tuned_meta["kind"] == DECODER_KIND  # still the imported layout: the cascade and export take it
    assert tuned_meta["init_from"]["digest"] == m.metrics["init_from_digest"]
    tuned = KarloDecoder.from_checkpoint(m.outputs["model"])
    a, b = source.state_dict(), tuned.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)

    # the imported prior too: raw image embeddings, captions at the CLIP's full context
    assert main(["stage", "pca", *common]) == 0  # the prior stage reads it (for prior.kind=ar)
    assert main(["stage", "prior", *common, "prior.init_from=models:/unclip-prior@karlo",
                 "prior.train.total_steps=40", "prior.train.warmup_steps=2", "prior.max_holdout=16"]) == 0
    p = read_manifest(str(run_dir), "prior")
    print(f"imported prior fine-tuned in the stage: held-out x0 loss {p.metrics['init_val_loss']:.4f} "
          f"-> {p.metrics['val_loss']:.4f}, cosine {p.metrics['val_cosine']:.3f} (z_t "
          f"{p.metrics['val_baseline_text']:.3f})")
    assert p.metrics["val_loss"] < 0.8 * p.metrics["init_val_loss"]
    assert checkpoint.read_config(p.outputs["prior"])["kind"] == PRIOR_KIND
    assert checkpoint.read_config(p.outputs["prior"])["sampling"]["sampler"] == "unclip"

    # and the super-resolution stage, in upsample1 (8 -> 32): both UNets, no noise augmentation
    assert main(["stage", "upsample1", *common, "upsample1.init_from=models:/unclip-upsampler1@karlo",
                 "upsample1.train.total_steps=30", "upsample1.train.lr=1e-3"]) == 0
    u = read_manifest(str(run_dir), "upsample1")
    print(f"imported super-resolution fine-tuned in the stage: held-out PSNR on sharp inputs "
          f"{u.metrics['init_val_psnr_sharp']:.2f} -> {u.metrics['val_psnr_sharp']:.2f} dB "
          f"(bicubic {u.metrics['val_psnr_sharp_bicubic']:.2f})")
    assert u.metrics["val_psnr_sharp"] > u.metrics["init_val_psnr_sharp"] + 3
    assert checkpoint.read_config(u.outputs["model"])["kind"] == SUPER_RES_KIND

    # the two fine-tuned models generate together (raw embeddings end to end)
    from unclip.generation import ModelRefs, UnCLIP
    from unclip.generation.cascade import Settings

    cascade = UnCLIP(ModelRefs(clip=read_manifest(str(run_dir), "clip").outputs["model"],
                               prior=p.outputs["prior"], decoder=m.outputs["model"],
                               upsampler1=u.outputs["model"]), device="cpu")
    images = cascade.generate("a red circle", 2, seed=0,
                              settings=Settings(prior_steps=3, decoder_steps=3, upsampler_steps=3))
    assert [im.size for im in images[0]] == [(8, 8)] * 2 and [im.size for im in images[-1]] == [(32, 32)] * 2

    # and CLIP: clip.init_from (clip.source unset) trains the imported transformers CLIP's towers
    from unclip.models.clip import load_clip

    source_clip = checkpoint.load(_registered(run_dir, "unclip-clip"))[0]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["stage", "clip", "preset=smoke", f"run_dir={run_dir}",
                 "clip.init_from=models:/unclip-clip@karlo", "clip.train.lr=1e-3"]) == 0
    k = read_manifest(str(run_dir), "clip")
    assert k.metrics["init_from_pinned"].startswith("models:/unclip-clip/")
    assert 0 <= k.metrics["val_recall_at_5"] <= 1
    tuned_clip = load_clip(k.outputs["model"])
    assert tuned_clip.identity["backend"] == "transformers" and tuned_clip.dim == 32
    tuned_state = checkpoint.load(k.outputs["model"])[0]
    assert tuned_state.keys() == source_clip.keys()  # the imported layout, without the temperature
    assert any(not torch.equal(tuned_state[n], source_clip[n]) for n in source_clip)


def _registered(run_dir, name: str = "unclip-decoder") -> str:
    """An imported model's folder, through the run's registry."""
    import mlflow

    from unclip.registry import pinned_uri, resolve_checkpoint

    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    return resolve_checkpoint(pinned_uri(f"models:/{name}@karlo"))
