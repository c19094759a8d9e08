"""The upsamplers: seeded degradations that keep shapes and ranges, a conv-only UNet trained on crops
and sampled at full size, a tiny run that beats bicubic, checkpoints, and the two stages' outputs in
the smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unclip.checkpoint import CheckpointError
from unclip.data.degradations import (augment_low_res, blur_degrade, bsr_degrade, config_for,
                                      degrade, downscale, gaussian_kernel, sample_aug_levels)
from unclip.diffusion import GaussianDiffusion
from unclip.eval.image_quality import psnr, ssim
from unclip.eval.upsampling import bicubic_upsample, validate
from unclip.models.upsampler import Upsampler, build_config, has_attention, load_upsampler
from unclip.training.upsampler import CropBatches, make_step_loss, random_crops


def _images(n: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    from unclip.data.shapes import render, sample_scene

    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(render(sample_scene(rng), size)) for _ in range(n)])


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def _model(**kw) -> Upsampler:
    torch.manual_seed(0)
    return Upsampler({"channels": [16, 32], "norm_num_groups": 8, "steps": 4, **kw})


# ---- degradations ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["blur", "bsr"])
def test_degradations_are_seeded_and_keep_shape_and_range(kind):
    hr = _unit(_images(3, 32))
    a = degrade(kind, hr, 4, np.random.default_rng(7))
    b = degrade(kind, hr, 4, np.random.default_rng(7))
    c = degrade(kind, hr, 4, np.random.default_rng(8))
    assert a.shape == (3, 3, 8, 8) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)                 # same seed, same corruption
    assert not torch.equal(a, c)             # another seed, another one
    one = degrade(kind, hr[0], 4, np.random.default_rng(7))
    assert one.shape == (3, 8, 8)


def test_bsr_is_a_stronger_corruption_than_a_plain_downscale():
    """BSR adds noise and JPEG on top of resizing: far from the clean bicubic downscale."""
    hr = _unit(_images(4, 64))
    clean = torch.nn.functional.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True)
    bsr = degrade("bsr", hr, 4, np.random.default_rng(0))
    blur = degrade("blur", hr, 4, np.random.default_rng(0), {"sigma": [0.0001, 0.0002]})
    assert float((blur - clean).abs().mean()) < 0.02          # a near-zero blur is the downscale
    assert float((bsr - clean).abs().mean()) > float((blur - clean).abs().mean())


def test_blur_leaves_a_clean_prob_share_of_images_unblurred():
    """The cascade feeds the first upsampler sharp decoder outputs: ``clean_prob`` trains on some."""
    hr = _unit(_images(16, 32))
    down = downscale(hr, 4)
    assert torch.allclose(degrade("blur", hr, 4, np.random.default_rng(0), {"clean_prob": 1.0}), down)
    mixed = degrade("blur", hr, 4, np.random.default_rng(0), {"clean_prob": 0.5})
    unblurred = sum(bool(torch.allclose(m, d)) for m, d in zip(mixed, down))
    assert 0 < unblurred < len(hr)
    # the default (the paper: always blur) draws the same corruptions as before the option existed
    assert torch.equal(degrade("blur", hr, 4, np.random.default_rng(0)),
                       degrade("blur", hr, 4, np.random.default_rng(0), {"clean_prob": 0.0}))
    assert not any(torch.allclose(m, d) for m, d in zip(degrade("blur", hr, 4, np.random.default_rng(0)), down))
    with pytest.raises(ValueError, match="clean_prob"):
        config_for("blur", {"clean_prob": 1.5})


def test_bsr_leaves_a_clean_prob_share_of_images_undegraded():
    """The second upsampler gets the first one's sharp output in the cascade, not a degraded photo."""
    hr = _unit(_images(16, 32))
    down = downscale(hr, 4)
    assert torch.equal(degrade("bsr", hr, 4, np.random.default_rng(0), {"clean_prob": 1.0}), down)
    mixed = degrade("bsr", hr, 4, np.random.default_rng(0), {"clean_prob": 0.5})
    assert 0 < sum(bool(torch.equal(m, d)) for m, d in zip(mixed, down)) < len(hr)
    assert torch.equal(degrade("bsr", hr, 4, np.random.default_rng(0)),
                       degrade("bsr", hr, 4, np.random.default_rng(0), {"clean_prob": 0.0}))


@pytest.mark.parametrize("kind,bad,match", [
    ("bsr", {"clean_prob": -0.1}, "clean_prob"), ("bsr", {"poisson_prob": 2}, "poisson_prob"),
    ("bsr", {"sigma": [0.0, 1.0]}, "sigma"), ("bsr", {"gaussian_noise": [0.2, 0.1]}, "gaussian_noise"),
    ("bsr", {"jpeg_quality": [30, 101]}, "jpeg_quality"), ("blur", {"sigma": [1.2, 0.4]}, "sigma"),
])
def test_degradation_options_out_of_range_are_refused(kind, bad, match):
    with pytest.raises(ValueError, match=match):
        config_for(kind, bad)


def test_degradation_inputs_are_checked():
    with pytest.raises(ValueError, match="divisible"):
        degrade("blur", torch.rand(1, 3, 30, 30), 4, np.random.default_rng(0))
    for fn in (blur_degrade, bsr_degrade):  # one image each: their draws are per image
        with pytest.raises(ValueError, match="one RGB image"):
            fn(torch.rand(2, 3, 32, 32), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown"):
        config_for("bsr", {"jpeg_qualty": [10, 20]})
    with pytest.raises(ValueError):
        config_for("sharpen")
    k = gaussian_kernel(1.0)
    assert torch.isclose(k.sum(), torch.tensor(1.0)) and torch.equal(k, k.flip(0).flip(1))


def test_noise_level_augmentation():
    gd = GaussianDiffusion(_model().diffusion_config)
    low = torch.rand(4, 3, 8, 8) * 2 - 1
    levels = sample_aug_levels(1000, 150, torch.Generator().manual_seed(0))
    assert int(levels.min()) == 0 and int(levels.max()) == 150
    g = torch.Generator().manual_seed(0)
    small = augment_low_res(low, torch.zeros(4, dtype=torch.long), gd, g)
    big = augment_low_res(low, torch.full((4,), 900, dtype=torch.long), gd, g)
    assert float((small - low).abs().mean()) < float((big - low).abs().mean())


# ---- model ------------------------------------------------------------------------------------


def test_upsampler_has_no_attention_and_trains_on_crops_and_samples_at_full_size():
    m = _model()
    assert not has_attention(m)
    images = _images(4, 32)
    batches = CropBatches(images, batch_size=4, crop=8, scale=4, kind="blur", seed=0)
    hr, low = next(iter(batches(0)))
    assert hr.shape == (4, 3, 8, 8) and low.shape == (4, 3, 2, 2)      # quarter-size crops
    assert float(hr.min()) >= -1 and float(hr.max()) <= 1
    loss = make_step_loss(GaussianDiffusion(m.diffusion_config), 150)(m, (hr, low))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters() if p.requires_grad)
    # the same model at full size: 8 -> 32
    low_full = degrade("blur", _unit(images), 4, np.random.default_rng(0)) * 2 - 1
    out = m.upsample(low_full, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32) and float(out.abs().max()) <= 1
    again = m.upsample(low_full, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)                                      # deterministic for a seed
    # and on a non-square size
    assert m.upsample(low_full[:1, :, :, :6], steps=2).shape == (1, 3, 32, 24)


def test_crop_batches_are_deterministic_per_epoch():
    images = _images(4, 32)
    a = [b[0] for b in CropBatches(images, 2, 16, 4, "bsr", seed=3)(1)]
    b = [b[0] for b in CropBatches(images, 2, 16, 4, "bsr", seed=3)(1)]
    c = [b[0] for b in CropBatches(images, 2, 16, 4, "bsr", seed=3)(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(ValueError, match="larger"):
        random_crops(images, 1, 64, np.random.default_rng(0))


def test_bad_configs_and_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown upsampler option"):
        build_config({"chanels": [8]})
    with pytest.raises(ValueError, match="residual"):
        build_config({"residual": True})                                 # needs x0-prediction
    with pytest.raises(ValueError, match="fixed variance"):
        build_config({"diffusion": {"learn_variance": True}})
    m = _model()
    deep = Upsampler({"channels": [8, 8, 8, 8], "norm_num_groups": 8})   # sides divisible by 8
    with pytest.raises(ValueError, match="divisible by 8"):
        deep.upsample(torch.zeros(1, 3, 3, 3), steps=1)
    with pytest.raises(ValueError, match="must be"):
        m.upsample(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="float"):
        m.upsample(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(CheckpointError):
        load_upsampler(str(tmp_path / "nothing-here"))


def test_checkpoint_round_trip(tmp_path):
    m = _model(residual=True, diffusion={"prediction_type": "sample"})
    m.save(str(tmp_path / "up"))
    back = load_upsampler(str(tmp_path / "up"))
    assert back.config == m.config
    low = torch.rand(1, 3, 4, 4) * 2 - 1
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(m.upsample(low, generator=g1), back.upsample(low, generator=g2))


def test_quality_metrics_on_known_pairs():
    a = torch.rand(2, 3, 16, 16)
    assert float(psnr(a, a.clamp(0, 1)).min()) > 99 or torch.isinf(psnr(a, a)).all()
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert 15 < float(psnr(noisy, a).mean()) < 25
    assert float(ssim(a, a).mean()) == pytest.approx(1.0, abs=1e-4)
    assert float(ssim(noisy, a).mean()) < 0.95


def test_tiny_upsampler_run_beats_bicubic():
    """A few hundred steps on 16 px crops of shape images (blur conditioning), validated at full
    32 px size on held-out scenes: the model beats bicubic upsampling of the same input in PSNR."""
    torch.manual_seed(0)
    train_imgs, held_out = _images(64, 32, seed=0), _images(8, 32, seed=99)
    m = Upsampler({"channels": [32, 32], "norm_num_groups": 8, "residual": True, "steps": 4,
                   "diffusion": {"prediction_type": "sample"}})
    gd = GaussianDiffusion(m.diffusion_config)
    step_loss = make_step_loss(gd, 150, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    batches = CropBatches(train_imgs, 16, 16, 4, "blur", seed=0, steps_per_epoch=50)
    losses = []
    for epoch in range(4):
        for batch in batches(epoch):
            loss = step_loss(m, batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    metrics, grid = validate(m, held_out, "blur", seed=0, batch_size=8)
    assert grid.shape == (4 * 32, 4 * 32, 3)
    assert metrics["val_psnr"] > metrics["val_psnr_bicubic"] + 0.5, metrics
    low = degrade("blur", _unit(held_out), 4, np.random.default_rng(0))
    assert bicubic_upsample(low, 4).shape == (8, 3, 32, 32)


# ---- the stages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,low,high", [("upsample1", 8, 32), ("upsample2", 32, 128)])
def test_upsampler_stage_outputs(smoke_run, stage, low, high):
    import mlflow

    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.manifest import read_manifest
    from unclip.registry import resolve_checkpoint

    m = read_manifest(str(smoke_run), stage)
    assert m is not None
    for k in ("val_psnr", "val_ssim", "val_psnr_bicubic", "val_ssim_bicubic", "val_psnr_sharp",
              "val_psnr_sharp_bicubic", "val_ssim_sharp", "train_loss",
              "registered_version", "registered_alias", "n_train", "n_holdout"):
        assert k in m.metrics, k
    assert (m.metrics["low_res"], m.metrics["high_res"]) == (low, high)
    assert m.metrics["crop"] == high // 4
    assert np.isfinite(m.metrics["val_psnr"]) and m.metrics["registered_alias"] in ("champion", "candidate")
    cfg = load_config(["preset=smoke", f"run_dir={smoke_run}"])
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    try:
        folder = resolve_checkpoint(f"models:/unclip-{stage.replace('sample', 'sampler')}/"
                                    f"{int(m.metrics['registered_version'])}")
    finally:
        mlflow.set_tracking_uri(None)
    model = load_upsampler(folder)
    assert not has_attention(model) and model.config["kind"] == ("blur" if stage == "upsample1" else "bsr")
    out = model.upsample(torch.zeros(1, 3, low, low), steps=2)
    assert out.shape == (1, 3, high, high)
