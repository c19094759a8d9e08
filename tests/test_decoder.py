"""The decoder: conditioning paths and dropouts, samplers and guidance, determinism, checkpoints, a
tiny run that learns, and the stage (outputs in the smoke run; resume after a killed worker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unclip.checkpoint import CheckpointError
from unclip.diffusion import DiffusionConfig, GaussianDiffusion
from unclip.models.decoder import Decoder, DecoderConfig, dropout_masks, load_decoder
from unclip.models.decoder_sampling import (TextCondition, decode, from_uint8, image_grid, invert,
                                            make_denoiser, to_pil, to_uint8)

CLIP_DIM, TEXT_W = 16, 12


def _cfg(**kw) -> DecoderConfig:
    base = dict(resolution=8, clip_dim=CLIP_DIM, text_width=TEXT_W, base_channels=16,
                channel_mult=(1, 2), attention_resolutions=(4,), head_channels=16, context_dim=32,
                norm_groups=8)
    return DecoderConfig(**{**base, **kw})


def _model(seed: int = 0, steps: int = 100, prediction: str = "epsilon", **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = _cfg(**kw)
    return Decoder(cfg, DiffusionConfig(num_train_timesteps=steps, learn_variance=cfg.learn_variance,
                                        prediction_type=prediction))


def _inputs(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, CLIP_DIM, generator=g), dim=-1)
    states = torch.randn(b, 5, TEXT_W, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([2, 5, 1][:b] + [3] * max(0, b - 3))[:, None]
    x = torch.randn(b, 3, 8, 8, generator=g)
    t = torch.randint(0, 100, (b,), generator=g)
    return x, t, z, TextCondition(states, mask)


# ---- the model ------------------------------------------------------------------------------------


def test_output_channels_follow_the_variance_setting():
    x, t, z, text = _inputs()
    assert _model(learn_variance=True)(x, t, z, text.states, text.mask).shape == (3, 6, 8, 8)
    assert _model(learn_variance=False)(x, t, z, text.states, text.mask).shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="learn_variance"):
        Decoder(_cfg(learn_variance=True), DiffusionConfig(learn_variance=False))
    # a 32 px decoder with a 2x2 space-to-depth front still maps 32 px to 32 px
    big = _model(resolution=32, channel_mult=(1, 2), attention_resolutions=(8,), patch_size=2)
    assert big(torch.randn(2, 3, 32, 32), t[:2], z[:2], text.states[:2], text.mask[:2]).shape == (2, 6, 32, 32)


@torch.no_grad()
def test_conditioning_paths_and_null_embeddings():
    m = _model().eval()
    x, t, z, text = _inputs()
    base = m(x, t, z, text.states, text.mask)
    other_z = torch.roll(z, 1, 0)
    other_text = torch.randn_like(text.states)
    assert not torch.allclose(base, m(x, t, other_z, text.states, text.mask), atol=1e-5)
    assert not torch.allclose(base, m(x, t, z, other_text, text.mask), atol=1e-5)
    # masked-out token positions carry nothing
    padded = text.states.clone()
    padded[~text.mask] = 100.0
    torch.testing.assert_close(m(x, t, z, padded, text.mask), base, atol=1e-4, rtol=1e-4)
    # a dropped CLIP embedding / caption is replaced by its null embedding: the input no longer matters
    yes = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(m(x, t, z, text.states, text.mask, drop_clip=yes),
                               m(x, t, other_z, text.states, text.mask, drop_clip=yes))
    torch.testing.assert_close(m(x, t, z, text.states, text.mask, drop_caption=yes),
                               m(x, t, z, other_text, text.mask, drop_caption=yes))
    # no caption at all reads as a dropped caption
    torch.testing.assert_close(m(x, t, z, None, None), m(x, t, z, other_text, text.mask, drop_caption=yes))
    # per-sample drops: only the dropped sample changes
    some = torch.tensor([False, True, False])
    mixed = m(x, t, z, text.states, text.mask, drop_clip=some)
    torch.testing.assert_close(mixed[[0, 2]], base[[0, 2]])
    assert not torch.allclose(mixed[1], base[1], atol=1e-5)
    # caption conditioning off: no text projection at all, and text inputs are ignored
    off = _model(use_caption=False).eval()
    assert not hasattr(off, "text_proj")
    torch.testing.assert_close(off(x, t, z, text.states, text.mask), off(x, t, z, other_text, text.mask))
    assert not torch.allclose(off(x, t, z), off(x, t, other_z), atol=1e-5)


@torch.no_grad()
def test_a_context_as_long_as_an_attention_level_decodes_as_a_longer_one():
    """12 caption tokens + 4 CLIP tokens = the 4x4 level's 16 image tokens, a length diffusers'
    mask padding skips: the decoder must neither crash nor change what a masked token means."""
    m = _model().eval()
    x, t, z, _ = _inputs()
    g = torch.Generator().manual_seed(3)
    states = torch.randn(3, 13, TEXT_W, generator=g)
    mask = torch.arange(13)[None, :] < torch.tensor([12, 7, 12])[:, None]
    out = m(x, t, z, states[:, :12], mask[:, :12])  # context 16 = the level's 16 tokens
    assert torch.isfinite(out).all()
    # the same captions with a 13th, masked-out token (context 17: diffusers pads as usual)
    torch.testing.assert_close(out, m(x, t, z, states, mask), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_final_caption_token_joins_the_timestep_embedding():
    """GLIDE's global caption path: the last unmasked token (the null token when dropped), and the
    class-embedding MLP reads it beside z_i; without it only z_i."""
    m = _model().eval()
    x, t, z, text = _inputs()
    _, ctx, mask = m.context(z, text.states, text.mask, None, None)
    last = m.final_caption_token(ctx, mask)
    torch.testing.assert_close(last, ctx[torch.arange(3), torch.tensor([1, 4, 0])])
    yes = torch.ones(3, dtype=torch.bool)
    _, ctx, mask = m.context(z, text.states, text.mask, None, yes)
    torch.testing.assert_close(m.final_caption_token(ctx, mask), ctx[:, 0])
    assert m.unet.class_embedding.linear_1.in_features == CLIP_DIM + 32
    assert _model(caption_in_time=False).unet.class_embedding.linear_1.in_features == CLIP_DIM
    assert _model(use_caption=False).unet.class_embedding.linear_1.in_features == CLIP_DIM
    # what the class-embedding MLP receives in a forward pass: [z_i, the final caption token]
    seen = []
    hook = m.unet.class_embedding.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    m(x, t, z, text.states, text.mask)
    hook.remove()
    _, ctx, mask = m.context(z, text.states, text.mask, None, None)
    torch.testing.assert_close(seen[0], torch.cat([z, m.final_caption_token(ctx, mask)], 1))


def test_dropout_rates_and_every_parameter_trains():
    drop_clip, drop_caption = dropout_masks(20000, 0.1, 0.5, torch.Generator().manual_seed(0))
    assert abs(drop_clip.float().mean() - 0.1) < 0.01 and abs(drop_caption.float().mean() - 0.5) < 0.02
    # independent: both dropped ~5% of the time
    assert abs((drop_clip & drop_caption).float().mean() - 0.05) < 0.01
    with pytest.raises(ValueError, match="p_drop_clip"):
        dropout_masks(4, 1.5, 0.5)
    # every parameter gets a gradient even in a batch where nothing is dropped: DDP needs no
    # find_unused_parameters (a source of multi-GPU hangs in other implementations)
    m = _model()
    x, t, z, text = _inputs()
    none = torch.zeros(3, dtype=torch.bool)
    m(x, t, z, text.states, text.mask, none, none).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


def test_bad_inputs_name_the_problem():
    m = _model()
    x, t, z, text = _inputs()
    with pytest.raises(ValueError, match="image_embed"):
        m(x, t, z[:, :5], text.states, text.mask)
    with pytest.raises(ValueError, match="text_states"):
        m(x, t, z, text.states[:, :, :4], text.mask)
    with pytest.raises(ValueError, match="x_t"):
        m(torch.randn(3, 3, 16, 16), t, z)
    with pytest.raises(ValueError, match="power of two"):
        _model(resolution=12)
    with pytest.raises(ValueError, match="unknown decoder model option"):
        DecoderConfig.from_dict({"resolution": 8, "widht": 3})
    with pytest.raises(ValueError, match="sampler"):
        decode(m, z, text, 1.0, "euler", 4)


# ---- sampling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_samplers_and_guidance_give_images(sampler):
    m = _model()
    _, _, z, text = _inputs()
    calls = []
    m.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    for scale in (1.0, 3.0):
        calls.clear()
        out = decode(m, z, text, scale, sampler, 4, torch.Generator().manual_seed(0))
        assert out.shape == (3, 3, 8, 8) and out.min() >= -1 and out.max() <= 1
        assert torch.isfinite(out).all()
        # guidance: conditional and unconditional halves in one batched forward per step
        assert calls == [3 if scale == 1.0 else 6] * 4
    assert all(im.size == (8, 8) for im in to_pil(out))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
@torch.no_grad()
def test_decoding_returns_the_image_the_model_predicts(sampler):
    """A range check alone is met by any clamped output. Here the network's last layer predicts
    one known image whatever its input (x0-prediction; weights zeroed, the bias sets interior
    values per channel, and a variance value beside them): every sampler, guided or not, must
    decode exactly that image. Noise left in, a step off the schedule or the variance channels
    read as the mean all fail it, clamp or not."""
    m = _model(prediction="sample")
    m.unet.conv_out.weight.zero_()
    m.unet.conv_out.bias.copy_(torch.tensor([0.3, -0.55, 0.8, 0.4, -0.2, 0.9]))
    target = torch.tensor([0.3, -0.55, 0.8]).view(1, 3, 1, 1).expand(3, 3, 8, 8)
    _, _, z, text = _inputs()
    for scale in (1.0, 3.0):
        out = decode(m, z, text, scale, sampler, 6, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


@torch.no_grad()
def test_guidance_extrapolates_from_the_unconditional_output():
    m = _model().eval()
    x, t, z, text = _inputs()
    yes = torch.ones(3, dtype=torch.bool)
    cond = m(x, t, z, text.states, text.mask)
    uncond = m(x, t, z, text.states, text.mask, yes, yes)
    guided = make_denoiser(m, z, text, 4.0)(x, t)
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-4)  # variance: cond


def test_decoding_is_deterministic_for_a_seed():
    m = _model()
    _, _, z, text = _inputs()
    for sampler in ("ddpm", "dpm"):
        a = decode(m, z, text, 2.0, sampler, 5, torch.Generator().manual_seed(7))
        b = decode(m, z, text, 2.0, sampler, 5, torch.Generator().manual_seed(7))
        c = decode(m, z, text, 2.0, sampler, 5, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.allclose(a, c)
    # a fixed x_T with eta 0 DDIM does not depend on the generator at all
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    a = decode(m, z, text, 2.0, "ddim", 5, torch.Generator().manual_seed(1), x_T=x_T)
    b = decode(m, z, text, 2.0, "ddim", 5, torch.Generator().manual_seed(2), x_T=x_T)
    assert torch.equal(a, b)
    assert invert(m, a, z, text, 5).shape == a.shape


def test_conditioning_effects_show_which_condition_the_decoder_uses():
    """Dropping a condition the model reads moves its x0 predictions; one it ignores moves nothing."""
    from unclip.eval.decoding import conditioning_effects

    x, _, z, text = _inputs(4)
    images = to_uint8(x.clamp(-1, 1))
    m = _model().train()
    out = conditioning_effects(m, images, z.numpy(), text)
    assert m.training  # left as it was
    assert out["clip_effect"] > 1e-4 and out["caption_effect"] > 1e-4 and out["x0_mse"] > 0
    with torch.no_grad():  # make z_i invisible: its tokens and its part of the class embedding
        m.clip_tokens.weight.zero_()
        m.unet.class_embedding.linear_1.weight[:, :CLIP_DIM] = 0
    again = conditioning_effects(m, images, z.numpy(), text)
    assert again["clip_effect"] == 0.0 and again["caption_effect"] > 1e-4
    # no caption conditioning: no caption effect to report
    alone = conditioning_effects(_model(use_caption=False), images, z.numpy(), None)
    assert np.isnan(alone["caption_effect"]) and alone["clip_effect"] > 1e-4


def test_nearest_by_embedding_streams_the_pool_and_keeps_the_best_match():
    """Each query gets the pool image of highest cosine, across batch boundaries, scale-free."""
    from unclip.eval.decoding import nearest_by_embedding

    rng = np.random.default_rng(0)
    pool_emb = rng.normal(size=(50, 8)).astype(np.float32)
    pool_img = rng.integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    want = [3, 17, 49, 17]
    queries = pool_emb[want] * np.array([[2.0], [0.5], [7.0], [1.0]], np.float32)  # cosine, not dot
    queries += rng.normal(scale=0.01, size=queries.shape).astype(np.float32)
    batches = [(pool_emb[i:i + 7], pool_img[i:i + 7]) for i in range(0, 50, 7)]
    got = nearest_by_embedding(queries, iter(batches))
    assert np.array_equal(got, pool_img[want])
    with pytest.raises(ValueError, match="empty"):
        nearest_by_embedding(queries, iter([]))
    with pytest.raises(ValueError, match="width 8"):
        nearest_by_embedding(queries, iter([(pool_emb[:, :5], pool_img)]))


def test_checkpoint_round_trip(tmp_path):
    m = _model(learn_variance=False).eval()
    x, t, z, text = _inputs()
    m.save(str(tmp_path / "dec"), extra={"note": "test"})
    back = Decoder.from_checkpoint(str(tmp_path / "dec"))
    assert back.cfg == m.cfg and back.diffusion == m.diffusion
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, z, text.states, text.mask), m(x, t, z, text.states, text.mask))
    from unclip import checkpoint

    checkpoint.save(str(tmp_path / "other"), m.state_dict(), "prior", {})
    with pytest.raises(CheckpointError, match="expected a 'decoder'"):
        load_decoder(str(tmp_path / "other"))
    # weights that do not fit the configured model are refused, not half-loaded
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("clip_tokens")}
    checkpoint.save(str(tmp_path / "bad"), state, "decoder",
                    {"model": m.cfg.to_dict(), "diffusion": m.diffusion.to_dict()})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_decoder(str(tmp_path / "bad"))


def test_uint8_conversions_and_grid():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(from_uint8(imgs)), imgs)
    grid = image_grid(list(imgs), cols=4, scale=2)
    assert grid.size == (4 * 8 * 2, 2 * 8 * 2)


# ---- a tiny run that learns ------------------------------------------------------------------------


def test_worker_threads_share_the_cores_among_local_workers(monkeypatch):
    """Ray pins OMP_NUM_THREADS to the one CPU a worker reserves; the decoder asks for its share."""
    import os
    import types

    import ray.train

    from stages.training import worker_threads

    cores = len(os.sched_getaffinity(0))
    assert worker_threads(3) == 3
    for local in (1, 2, cores + 1):
        ctx = types.SimpleNamespace(get_local_world_size=lambda n=local: n)
        monkeypatch.setattr(ray.train, "get_context", lambda c=ctx: c)
        assert worker_threads(None) == max(1, cores // local)


def _centred_clip(images: list) -> tuple:
    """A fixed random CLIP at 16 px and an ``embed`` that centres its features on ``images``' mean.

    A random CLIP maps every image (noise included) near one common direction (raw cosines ~0.97),
    so its features are centred on the mean of the training images and re-normalized: decoders are
    conditioned on, and judged in, that centred CLIP space."""
    from unclip.models.clip import ClipEncoder, create_custom

    torch.manual_seed(0)
    clip_cfg = {"embed_dim": CLIP_DIM, "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32,
                                                      "layers": 1, "head_width": 16},
                "text_cfg": {"context_length": 16, "width": TEXT_W * 2, "heads": 2, "layers": 1}}
    clip = ClipEncoder(create_custom(clip_cfg), {"arch": "custom"}, clip_cfg)
    mu = clip.encode_images(images).mean(0)

    def embed(imgs) -> np.ndarray:
        e = clip.encode_images(imgs) - mu
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    return embed


def _one_object_scenes(n: int, side: int = 16) -> list:
    from unclip.data.shapes import render, sample_scene

    rng = np.random.default_rng(0)
    return [render(sample_scene(rng, two_object_prob=0.0), side) for _ in range(n)]


def test_tiny_training_run_learns():
    """8 rendered shape scenes at 16 px, embedded by a (fixed, random) CLIP: a few hundred steps
    make the loss fall and the decodes of their embeddings move toward the true images in pixels and
    in CLIP space."""
    images = _one_object_scenes(8)
    x0 = from_uint8(np.stack([np.asarray(im) for im in images]))
    embed = _centred_clip(images)
    z = torch.from_numpy(embed(images))

    def cosine(decoded: torch.Tensor) -> float:
        return float((embed(to_pil(decoded)) * z.numpy()).sum(1).mean())

    # v-prediction, as the tiny preset trains it: after a few hundred steps an epsilon model's
    # samples are still mostly residual noise (the epsilon test below trains on more scenes, longer)
    m = _model(resolution=16, channel_mult=(1, 2), attention_resolutions=(8,), use_caption=False,
               steps=1000, prediction="v_prediction")
    gd = GaussianDiffusion(m.diffusion)
    x_T = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    before = decode(m, z, None, 1.0, "ddim", 10, x_T=x_T)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        drop_clip, _ = dropout_masks(8, 0.1, 0.0, gen)
        out = gd.training_losses(lambda x, t: m(x, t, z, drop_clip=drop_clip), x0, generator=gen)
        loss = out["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(out["mse"].detach().mean()))
    after = decode(m, z, None, 1.0, "ddim", 10, x_T=x_T)
    guided = decode(m, z, None, 3.0, "ddim", 10, x_T=x_T)
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:30])
    err_before, err_after = float((before - x0).square().mean()), float((after - x0).square().mean())
    assert err_after < 0.5 * err_before, (err_before, err_after)
    print("centred CLIP cosine before, after, guided:", cosine(before), cosine(after), cosine(guided))
    assert cosine(after) > cosine(before) + 0.1, (cosine(before), cosine(after))
    assert cosine(guided) > cosine(before) + 0.1, (cosine(before), cosine(guided))


def test_epsilon_learned_variance_decoder_learns_held_out():
    """The paper's parameterization (epsilon prediction, learned variance, hybrid loss) at tiny size:
    trained on 96 one-object scenes, it decodes the embeddings of 64 scenes it never saw (DDPM with
    its learned variance, 25 respaced steps, EMA weights) toward their own CLIP embeddings: the
    held-out cosine rises from its untrained value and beats the cosine of the same decodes against
    the other held-out scenes' embeddings (what a decoder that ignores z_i would get)."""
    from unclip.training.state import EMA

    n_train, n_held = 96, 64
    images = _one_object_scenes(n_train + n_held)
    x0 = from_uint8(np.stack([np.asarray(im) for im in images]))
    embed = _centred_clip(images[:n_train])
    z = torch.from_numpy(embed(images))
    x_train, z_train, z_held = x0[:n_train], z[:n_train], z[n_train:]

    torch.manual_seed(0)
    cfg = _cfg(resolution=16, attention_resolutions=(8,), use_caption=False, learn_variance=True)
    m = Decoder(cfg, DiffusionConfig(num_train_timesteps=1000, learn_variance=True,
                                     prediction_type="epsilon"))
    assert m.diffusion.learn_variance and m.out_channels == 6
    gd = GaussianDiffusion(m.diffusion)
    ema = EMA(m, 0.99)
    x_T = torch.randn(n_held, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def cosines(model: Decoder, guidance: float) -> tuple[float, float]:
        """Mean cosine of each decode with its own z_i, and with the next held-out scene's."""
        with torch.no_grad():
            out = decode(model, z_held, None, guidance, "ddpm", 25, x_T=x_T,
                         generator=torch.Generator().manual_seed(7))
        e = embed(to_pil(out))
        return float((e * z_held.numpy()).sum(1).mean()), float((e * z_held.roll(1, 0).numpy()).sum(1).mean())

    before, _ = cosines(m, 3.0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(600):
        idx = torch.randint(0, n_train, (16,), generator=gen)
        drop_clip, _ = dropout_masks(16, 0.1, 0.0, gen)
        out = gd.training_losses(lambda x, t: m(x, t, z_train[idx], drop_clip=drop_clip),
                                 x_train[idx], generator=gen)
        opt.zero_grad()
        out["loss"].mean().backward()
        opt.step()
        ema.update(m)
        losses.append(float(out["loss"].detach().mean()))
    after, _ = cosines(ema.model, 1.0)
    guided, guided_other = cosines(ema.model, 3.0)
    print(f"hybrid loss {np.mean(losses[:50]):.3f} -> {np.mean(losses[-50:]):.3f}; held-out cosine "
          f"before {before:.3f}, after {after:.3f}, guided {guided:.3f} (vs other scenes {guided_other:.3f})")
    assert np.mean(losses[-50:]) < 0.3 * np.mean(losses[:50])
    assert after > before + 0.1, (before, after)
    assert guided > before + 0.2, (before, guided)
    assert guided > guided_other + 0.15, (guided, guided_other)


def test_evaluator_decodes_in_seeded_chunks_scores_and_publishes_grids():
    """The library's held-out evaluator: chunked decodes equal one decode per chunk from its own
    seed (memory bounded by the chunk), and each grid reaches ``publish`` as a PNG."""
    from unclip.eval.decoder_eval import DecoderEvaluator

    images = _one_object_scenes(6, side=8)
    embed = _centred_clip(images)
    holdout = {"images": np.stack([np.asarray(im) for im in images]), "embeddings": embed(images),
               "captions": ["a shape"] * 6, "metas": [None] * 6}
    m = _model(use_caption=False)
    published: dict[str, bytes] = {}
    sampling = {"sampler": "ddim", "steps": 3, "guidance_scale": 2.0}
    ev = DecoderEvaluator(holdout, None, sampling, {"seed": 11, "batch_size": 4, "grid_images": 4,
                                                    "detector_size": 32},
                          use_caption=False, publish=lambda name, png: published.update({name: png}))
    chunked = ev.decode(m, 6)
    g = torch.Generator().manual_seed(15)  # chunk 2 (rows 4-5) starts from seed + 4
    alone = to_uint8(decode(m, torch.from_numpy(holdout["embeddings"][4:]), None, 2.0, "ddim", 3, g))
    assert chunked.shape == (6, 8, 8, 3) and np.array_equal(chunked[4:], alone)
    ev.grid(chunked[:4], step=7)
    assert list(published) == ["step_000007.png"] and published["step_000007.png"][:4] == b"\x89PNG"


# ---- the stage ---------------------------------------------------------------------------------------


def test_decoder_stage_outputs(smoke_run):
    from mlflow import MlflowClient

    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.manifest import read_manifest
    from unclip.registry import resolve_checkpoint

    m = read_manifest(str(smoke_run), "decoder")
    assert m is not None
    for k in ("val_clip_cosine", "val_clip_cosine_mismatched", "val_color", "chance_color",
              "val_shape", "val_binding", "train_loss", "train_mse", "train_steps_per_s",
              "registered_version", "registered_alias", "n_train", "n_holdout",
              "val_clip_effect", "val_caption_effect", "val_x0_mse", "nn_color", "nn_shape",
              "nn_position", "chance_shape"):
        assert k in m.metrics, k
    # smoke's 8 px images are too small to score meaningfully; the nearest-image search itself is
    # tested above, here only that its detector scores reach the manifest
    assert all(0.0 <= m.metrics[f"nn_{k}"] <= 1.0 for k in ("color", "shape", "position"))
    assert np.isfinite(m.metrics["val_clip_cosine"]) and m.metrics["step"] == 30
    assert m.metrics["registered_alias"] in ("champion", "candidate")
    cfg = load_config(["preset=smoke", f"run_dir={smoke_run}"])
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    try:
        folder = resolve_checkpoint(f"models:/unclip-decoder/{int(m.metrics['registered_version'])}")
    finally:
        mlflow.set_tracking_uri(None)
    model = load_decoder(folder)
    assert model.cfg.resolution == 8 and model.cfg.learn_variance
    out = decode(model, torch.randn(2, model.cfg.clip_dim), None, 2.0, "ddim", 3)
    assert out.shape == (2, 3, 8, 8)
    # grids at steps 15 and 30, logged to MLflow
    arts = MlflowClient(tracking.tracking_uri(cfg)).list_artifacts(m.mlflow_run_id, "grids")
    names = sorted(a.path.split("/")[-1] for a in arts)
    assert names == ["step_000015.png", "step_000030.png"], names


# A killed worker's restart and resume from the last checkpoint: test_data_parallel.py (the decoder,
# plain and sharded, kills a worker after its first checkpoint and checks the step it resumes from).
