"""Mixed precision through the real models: one training step of each (CLIP, both priors, the
decoder, both upsamplers) through the shared loop under bf16 autocast on CPU, against float32 from
the same weights, batch and noise seed. fp16 with a gradient scaler is CUDA-only (skipped here)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch

from unclip.training.loop import LoopConfig, autocast_for, make_optimizer, train
from unclip.training.state import EMA

DIM, WIDTH, CTX, B = 16, 16, 12, 8
CLIP_CFG = {"embed_dim": DIM, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
                                             "layers": 1, "head_width": 8},
            "text_cfg": {"context_length": CTX, "width": WIDTH, "heads": 2, "layers": 1}}


class Session:
    """Single-process stand-in for the Ray Train session."""

    rank, world_size, is_main = 0, 1, True

    def log(self, metrics, step):
        pass

    def progress(self, step, total, metrics):
        pass

    def report(self, metrics, model, optimizer, ema, meta, checkpoint=True):
        pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _captions() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    mask = torch.arange(6)[None, :] < torch.randint(2, 7, (B,), generator=g)[:, None]
    return torch.randn(B, 6, WIDTH, generator=g), mask


def _unit(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)


def _clip() -> tuple[torch.nn.Module, Any, Callable]:
    from open_clip.loss import ClipLoss

    from unclip.models.clip import create_custom

    model = create_custom(CLIP_CFG)
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(B, 3, 16, 16, generator=g), torch.randint(1, 400, (B, CTX), generator=g))
    loss = ClipLoss()

    def step_loss(m, b, gen):
        out = m(*b)
        img, txt, scale = out if isinstance(out, tuple) else \
            (out["image_features"], out["text_features"], out["logit_scale"])
        return {"loss": loss(img, txt, scale)}

    return model, batch, step_loss


def _diffusion_prior():
    from unclip.models.prior import DiffusionPrior, resolve_embed_scale

    model = DiffusionPrior({"dim": DIM, "text_width": WIDTH, "max_text_len": CTX, "width": 32,
                            "layers": 2, "heads": 2, "embed_scale": resolve_embed_scale("sqrt_dim", DIM),
                            "diffusion": {"num_train_timesteps": 100,
                                          "beta_schedule": "squaredcos_cap_v2"}})
    tokens, mask = _captions()
    batch = (_unit(B, DIM, 1), tokens, mask, _unit(B, DIM, 2))
    return model, batch, lambda m, b, gen: m.losses(*b, gen)


def _ar_prior():
    from unclip.embeddings.pca import fit as fit_pca
    from unclip.models.ar_prior import ARPrior, similarity_edges

    zi, zt = _unit(512, DIM, 1).numpy(), _unit(512, DIM, 2).numpy()
    pca = fit_pca(zi, n_components=8, num_buckets=16)
    model = ARPrior.from_pca({"dim": DIM, "text_width": WIDTH, "max_text_len": CTX, "n_components": 8,
                              "num_buckets": 16, "sim_buckets": 4, "width": 32, "layers": 2,
                              "heads": 2}, pca, similarity_edges(np.sum(zi * zt, 1), 4))
    tokens, mask = _captions()
    batch = (torch.from_numpy(zi[:B]), tokens, mask, torch.from_numpy(zt[:B]))
    return model, batch, lambda m, b, gen: m.losses(*b, gen)


def _decoder(learn_variance: bool = True):
    from unclip.diffusion import DiffusionConfig, GaussianDiffusion
    from unclip.models.decoder import Decoder, DecoderConfig, dropout_masks

    cfg = DecoderConfig(resolution=8, clip_dim=DIM, text_width=WIDTH, base_channels=16,
                        channel_mult=(1, 2), attention_resolutions=(4,), head_channels=16,
                        context_dim=32, norm_groups=8, learn_variance=learn_variance)
    model = Decoder(cfg, DiffusionConfig(num_train_timesteps=100, learn_variance=learn_variance))
    gd = GaussianDiffusion(model.diffusion)
    tokens, mask = _captions()
    x0 = torch.rand(B, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    batch = (x0, _unit(B, DIM, 1), tokens, mask)

    def step_loss(m, b, gen):
        x0, z, states, mask = b
        drop_clip, drop_caption = dropout_masks(B, 0.1, 0.5, gen)
        losses = gd.training_losses(lambda x, t: m(x, t, z, states, mask, drop_clip, drop_caption),
                                    x0, generator=gen)
        return {k: v.mean() for k, v in losses.items()}

    return model, batch, step_loss


def _upsampler(kind: str):
    from unclip.data.degradations import config_for, degrade
    from unclip.diffusion import GaussianDiffusion
    from unclip.models.upsampler import Upsampler
    from unclip.training.upsampler import make_step_loss

    if kind == "blur":   # upsample1 at the smoke preset's sizes: 8 -> 32
        model = Upsampler({"channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                           "residual": True, "diffusion": {"prediction_type": "sample"}})
    else:                # upsample2: 32 -> 128 (here 16 -> 64)
        model = Upsampler({"channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                           "residual": True, "diffusion": {"prediction_type": "sample"}})
    side = 32 if kind == "blur" else 64
    rng = np.random.default_rng(0)
    hr = torch.from_numpy(rng.random((4, 3, side, side), dtype=np.float32))
    low = degrade(kind, hr, 4, rng, config_for(kind, {}))
    batch = (hr * 2 - 1, low * 2 - 1)
    diffusion = GaussianDiffusion(model.diffusion_config)

    def step_loss(m, b, gen):
        return make_step_loss(diffusion, 100, gen)(m, b)

    return model, batch, step_loss


MODELS = {"clip": _clip, "diffusion_prior": _diffusion_prior, "ar_prior": _ar_prior,
          "decoder": _decoder, "upsampler_blur": lambda: _upsampler("blur"),
          "upsampler_bsr": lambda: _upsampler("bsr")}


def _one_step(name: str, amp: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(loss, weights before, weights after) of one step of the shared loop."""
    torch.manual_seed(0)
    model, batch, step_loss = MODELS[name]()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = LoopConfig(total_steps=1, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=10,
                     grad_clip=1e9, amp=amp)
    gen = torch.Generator().manual_seed(11)
    out = train(Session(), model, make_optimizer(model, cfg), EMA(model, 0.9), lambda e: iter([batch]),
                lambda m, b: step_loss(m, b, gen), cfg, generator=gen)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return out["train_loss"], before, after


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_step_matches_float32(name):
    loss32, w0, w32 = _one_step(name, "off")
    loss16, w0b, w16 = _one_step(name, "bf16")
    assert torch.equal(w0, w0b)  # the same initial weights (and batch, and noise seed)
    assert np.isfinite(loss16) and np.isfinite(loss32)
    assert loss16 == pytest.approx(loss32, rel=0.01), (loss16, loss32)
    assert torch.isfinite(w16).all()
    # Adam's first step moves each weight by about lr * sign(grad): bf16 gradients point the same way
    d32, d16 = w32 - w0, w16 - w0
    cos = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    assert cos > 0.8, cos


def test_bf16_autocast_really_runs_the_model_in_bf16():
    """Not a no-op on CPU: under the loop's bf16 autocast the decoder's convolutions and
    attention matmuls produce bfloat16 (so the comparison above compares two precisions)."""
    model, batch, _ = _decoder(False)
    seen = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.add(o.dtype))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    autocast, scaler = autocast_for(torch.device("cpu"), "bf16")
    x0, z, states, mask = batch
    with autocast:
        model(x0, torch.zeros(B, dtype=torch.long), z, states, mask)
    for h in hooks:
        h.remove()
    assert scaler is None and torch.bfloat16 in seen


def test_cached_caption_states_have_one_dtype():
    """The prior's caption cache fills under the training autocast (steps) and is read outside it
    (validation): the frozen text tower runs in float32 either way, so a caption's cached states do
    not depend on where it was first seen, and fresh ones equal them."""
    from unclip.models.captions import CaptionEncoder
    from unclip.models.clip import ClipEncoder, create_custom

    torch.manual_seed(0)
    clip = ClipEncoder(create_custom(CLIP_CFG), {"arch": "custom"}, CLIP_CFG)
    cached, fresh = CaptionEncoder(clip, cache=True), CaptionEncoder(clip, cache=False)
    captions = ["a red circle", "a blue square to the left of a green triangle"]
    autocast, _ = autocast_for(torch.device("cpu"), "bf16")
    with autocast:
        in_step, mask = cached(captions)       # fills the cache under autocast
        fresh_in_step, _ = fresh(captions)
    again, _ = cached(captions)
    reference, ref_mask = fresh(captions)      # float32 throughout
    assert {in_step.dtype, fresh_in_step.dtype, again.dtype} == {torch.float32}
    assert torch.equal(mask, ref_mask)
    for states in (in_step, fresh_in_step, again):
        assert torch.equal(states[mask], reference[mask])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs CUDA")
@pytest.mark.parametrize("name", list(MODELS))
def test_fp16_step_with_scaler_on_cuda(name):
    torch.manual_seed(0)
    model, batch, step_loss = MODELS[name]()
    model = model.cuda()
    batch = tuple(b.cuda() for b in batch)
    cfg = LoopConfig(total_steps=2, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=10, amp="fp16")
    gen = torch.Generator().manual_seed(11)  # as the stages: CPU generator, CUDA tensors
    assert autocast_for(torch.device("cuda"), "fp16")[1] is not None
    out = train(Session(), model, make_optimizer(model, cfg), EMA(model, 0.9), lambda e: iter([batch] * 2),
                lambda m, b: step_loss(m, b, gen), cfg, generator=gen)
    assert np.isfinite(out["train_loss"])
