"""The diffusion maths against a data distribution whose exact denoiser is known (a Gaussian)."""

from __future__ import annotations

import math

import pytest
import torch

from unclip.diffusion import (SAMPLERS, DiffusionConfig, GaussianDiffusion, ddim_invert, guide,
                              make_scheduler, sample)

MU, SIGMA = 0.4, 0.3


def oracle(gd: GaussianDiffusion):
    """Exact model output for data ~ N(MU, SIGMA^2 I): E[x0 | x_t] in closed form."""
    def fn(x, t):
        a = gd.sqrt_ac[t].float().view(-1, *([1] * (x.ndim - 1)))
        s = gd.sqrt_1m_ac[t].float().view(-1, *([1] * (x.ndim - 1)))
        x0 = MU + a * SIGMA**2 / (a**2 * SIGMA**2 + s**2) * (x - a * MU)
        eps = (x - a * x0) / s
        p = gd.cfg.prediction_type
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[p]
    return fn


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_reproduce_the_data_distribution(prediction, sampler):
    cfg = DiffusionConfig(prediction_type=prediction, clip_sample=False)
    gd = GaussianDiffusion(cfg)
    # Strided DDPM with the fixed (small) variance under-disperses with few steps: give it more.
    steps = 250 if sampler == "ddpm" else 25
    x = sample(oracle(gd), (4000, 2), cfg, sampler, steps, generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - MU) < 0.03
    assert abs(x.std().item() - SIGMA) < 0.04


def test_sampling_is_deterministic_for_a_seed():
    cfg = DiffusionConfig(clip_sample=False)
    fn = oracle(GaussianDiffusion(cfg))
    a = sample(fn, (3, 4), cfg, "ddpm", 10, generator=torch.Generator().manual_seed(7))
    b = sample(fn, (3, 4), cfg, "ddpm", 10, generator=torch.Generator().manual_seed(7))
    c = sample(fn, (3, 4), cfg, "ddpm", 10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_clipped_ddim_steps_towards_the_clipped_x0(prediction):
    """With clip_sample, DDIM's noise direction is re-derived from the clipped x0 (GLIDE,
    guided-diffusion). Keeping the unclipped model's epsilon beside a clipped x0 is inconsistent
    whenever x0 leaves [-1, 1], as it does early under guidance: on the tiny decoder it drew
    rings on tinted backgrounds (held-out CLIP cosine 0.48 against 0.67 when consistent)."""
    cfg = DiffusionConfig(prediction_type=prediction, clip_sample=True)
    gd = GaussianDiffusion(cfg)
    seen = []

    def out_of_range(x, t):  # predicts x0 = 3 everywhere, in the configured parameterization
        seen.append((x.clone(), int(t[0])))
        a, s = gd.sqrt_ac[t].float().view(-1, 1), gd.sqrt_1m_ac[t].float().view(-1, 1)
        x0 = torch.full_like(x, 3.0)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction]

    sample(out_of_range, (4, 3), cfg, "ddim", 5, generator=torch.Generator().manual_seed(0))
    (x1, t1), (x2, t2) = seen[1], seen[2]  # (at T the signal, hence the clip, is ~0)
    a1, s1 = gd.sqrt_ac[t1].float(), gd.sqrt_1m_ac[t1].float()
    a2, s2 = gd.sqrt_ac[t2].float(), gd.sqrt_1m_ac[t2].float()
    torch.testing.assert_close(x2, a2 * 1.0 + s2 * (x1 - a1 * 1.0) / s1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [15, 50, 64])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_ends_on_the_clean_sample_for_any_step_count(sampler, steps):
    """A model that knows x0 exactly must give x0 back, not x0 plus sqrt(1 - alpha_bar_0) noise
    (diffusers' DDIM stopped at t = 0 for step counts that do not divide 1000)."""
    cfg = DiffusionConfig(beta_schedule="linear", clip_sample=False)
    gd = GaussianDiffusion(cfg)
    x0 = torch.linspace(-0.8, 0.8, 12).view(4, 3)

    def exact(x, t):
        a, s = gd.sqrt_ac[t].float().view(-1, 1), gd.sqrt_1m_ac[t].float().view(-1, 1)
        return (x - a * x0) / s

    out = sample(exact, x0.shape, cfg, sampler, steps, generator=torch.Generator().manual_seed(0))
    assert (out - x0).abs().max().item() < 1e-3


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_ddim_inversion_round_trips(prediction):
    cfg = DiffusionConfig(prediction_type=prediction, clip_sample=False)
    fn = oracle(GaussianDiffusion(cfg))
    x0 = MU + SIGMA * torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    x_T = ddim_invert(fn, x0, cfg, steps=200)
    back = sample(fn, x0.shape, cfg, "ddim", 200, x_T=x_T)
    assert (back - x0).abs().max().item() < 0.03


def test_training_targets_are_zero_loss_for_the_exact_model():
    for p in ("epsilon", "sample", "v_prediction"):
        gd = GaussianDiffusion(DiffusionConfig(prediction_type=p))
        x0 = torch.randn(16, 3, 4, 4)
        noise = torch.randn_like(x0)
        t = gd.sample_timesteps(16, generator=torch.Generator().manual_seed(0))
        target = gd.target(x0, noise, t)
        losses = gd.training_losses(lambda x, tt: target, x0, t=t, noise=noise)
        assert losses["loss"].abs().max() < 1e-8
        x_t = gd.q_sample(x0, t, noise)
        torch.testing.assert_close(gd.predict_x0(target, x_t, t), x0, atol=2e-3, rtol=0)


def test_min_snr_weighting_counts_an_x0_error_min_snr_gamma_times_in_every_parameterization():
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.arange(0, 1000, 1000 // 64)[:64]
    delta = 0.1 * torch.randn_like(x0)
    for p, learned in (("epsilon", False), ("sample", False), ("v_prediction", False),
                       ("v_prediction", True)):
        gd = GaussianDiffusion(DiffusionConfig(prediction_type=p, min_snr_gamma=5.0,
                                               learn_variance=learned, vlb_weight=0.0))
        a, s = gd.sqrt_ac[t].float().view(-1, 1, 1, 1), gd.sqrt_1m_ac[t].float().view(-1, 1, 1, 1)
        x_t = gd.q_sample(x0, t, noise)
        x0_hat = x0 + delta  # the model's x0 is off by delta; its other outputs agree with x_t
        out = gd.target(x0_hat, (x_t - a * x0_hat) / s, t)
        if learned:  # the hybrid loss weights its MSE part alike (the bound's weight is 0 here)
            out = torch.cat([out, torch.zeros_like(out)], 1)
        losses = gd.training_losses(lambda x, tt: out, x0, t=t, noise=noise)
        snr = (a / s).pow(2).flatten()
        expected = snr.clamp(max=5.0) * delta.pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(losses["loss"], expected, rtol=2e-3, atol=1e-6)
        assert not torch.allclose(losses["mse"], expected)  # the logged MSE stays unweighted
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionConfig.from_dict({"min_snr_gamma": -1})
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionConfig(min_snr_gamma=-1)


def test_learned_variance_bound_is_smallest_near_the_true_posterior():
    """The VLB term is a KL that vanishes when the predicted variance is the posterior's."""
    cfg = DiffusionConfig(learn_variance=True)
    gd = GaussianDiffusion(cfg)
    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.full((8,), 500)
    x_t = gd.q_sample(x0, t, noise)
    # v = -1 selects the posterior variance exactly; +1 the (larger) beta_t.
    lo = gd.vlb_terms(noise, -torch.ones_like(x0), x0, x_t, t)
    hi = gd.vlb_terms(noise, torch.ones_like(x0), x0, x_t, t)
    assert torch.all(lo < 1e-4) and torch.all(hi > lo)
    with pytest.raises(ValueError, match="output channels"):
        gd.training_losses(lambda x, tt: x, x0)
    losses = gd.training_losses(lambda x, tt: torch.cat([x, torch.zeros_like(x)], 1), x0)
    assert set(losses) == {"loss", "mse", "vlb"} and torch.isfinite(losses["loss"]).all()


def test_learned_variance_samples_with_every_sampler():
    cfg = DiffusionConfig(learn_variance=True)
    fn = lambda x, t: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)  # noqa: E731
    for s in SAMPLERS:
        x = sample(fn, (2, 3, 8, 8), cfg, s, steps=5, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


def test_guidance():
    cond, uncond = torch.ones(2, 6, 4, 4), torch.zeros(2, 6, 4, 4)
    torch.testing.assert_close(guide(cond, uncond, 1.0), cond)
    g = guide(cond, uncond, 3.0, channels=3)
    assert torch.all(g[:, :3] == 3.0) and torch.all(g[:, 3:] == 1.0)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown diffusion option"):
        DiffusionConfig.from_dict({"num_steps": 3})
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(lambda x, t: x, (1, 2), DiffusionConfig(), "euler", 5)
    assert math.isclose(DiffusionConfig.from_dict({"vlb_weight": 0.01}).vlb_weight, 0.01)


def on_path_model(gd: GaussianDiffusion, x0: torch.Tensor, eps: torch.Tensor, learned: bool = False):
    """A model that knows x0 on the DDIM path x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps: its epsilon
    is ``eps`` everywhere (so its x0 is exact on the path), in gd's parameterization."""
    def fn(x, t):
        a, s = gd.sqrt_ac[t].view(-1, 1).to(x.dtype), gd.sqrt_1m_ac[t].view(-1, 1).to(x.dtype)
        out = gd.target((x - s * eps) / a, eps, t)
        return torch.cat([out, torch.zeros_like(out)], 1) if learned else out
    return fn


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [15, 27, 50, 64])
def test_ddim_sampling_and_inversion_share_one_schedule(steps, prediction, learned):
    """Inversion climbs the timesteps that sampling descends: for a model exact on the path both
    are exact, at any step count. diffusers' DDIM stepped to t - T // steps, not to the next
    listed timestep, so where 1000 / steps is not whole its sampling left the path inversion took
    (epsilon-prediction, float64: x0 off by 0.044 at 15 steps, 0.0034 at 27, 0.22 at 64)."""
    cfg = DiffusionConfig(prediction_type=prediction, clip_sample=False, learn_variance=learned)
    gd = GaussianDiffusion(cfg)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 4, generator=g, dtype=torch.float64)
    fn = on_path_model(gd, x0, eps, learned)
    seen = []
    record = lambda x, t: seen.append(int(t[0])) or fn(x, t)  # noqa: E731
    x_T = ddim_invert(record, x0, cfg, steps)
    climbed, seen[:] = list(seen), []
    torch.testing.assert_close(x_T, gd.sqrt_ac[999] * x0 + gd.sqrt_1m_ac[999] * eps, atol=1e-8, rtol=0)
    back = sample(record, x0.shape, cfg, "ddim", steps, x_T=x_T)
    assert seen == climbed[::-1] and len(seen) == steps and seen[0] == 999
    torch.testing.assert_close(back, x0, atol=1e-8, rtol=0)


def test_ddim_with_clipping_and_eta():
    """clip_sample: with x0 inside [-1, 1] the clamp changes nothing, the path is still exact.
    eta = 1 is DDPM with the posterior variance (Song et al. 2021): it draws what strided DDPM
    draws at the same step count (both under-disperse at 27 steps)."""
    cfg = DiffusionConfig(clip_sample=True)
    gd = GaussianDiffusion(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, generator=g, dtype=torch.float64) * 1.8 - 0.9
    eps = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x_T = ddim_invert(on_path_model(gd, x0, eps), x0, cfg, 27)
    torch.testing.assert_close(sample(on_path_model(gd, x0, eps), x0.shape, cfg, "ddim", 27, x_T=x_T),
                               x0, atol=1e-9, rtol=0)
    cfg = DiffusionConfig(clip_sample=False)
    fn = oracle(GaussianDiffusion(cfg))
    a = sample(fn, (8000, 2), cfg, "ddim", 27, generator=torch.Generator().manual_seed(1), eta=1.0)
    b = sample(fn, (8000, 2), cfg, "ddpm", 27, generator=torch.Generator().manual_seed(2))
    c = sample(fn, (8000, 2), cfg, "ddim", 27, generator=torch.Generator().manual_seed(1), eta=0.0)
    assert abs(a.mean().item() - MU) < 0.01 and abs(b.mean().item() - MU) < 0.01
    assert abs(a.std().item() - b.std().item()) < 0.01, (a.std(), b.std())
    assert (a - c).abs().mean() > 0.1  # the noise is really added


def variance_oracle(gd: GaussianDiffusion, steps: int, scale: float = 1.0):
    """Exact epsilon and learned-range variance values for data ~ N(MU, SIGMA^2) under DDPM strided
    to ``steps``: each reverse step t -> t' (the next listed timestep) is Gaussian with variance
    beta~ + c0^2 Var[x0 | x_t], beta~ and c0 those of the strided pair (improved DDPM's
    respacing). ``scale`` multiplies that variance (a deliberately wrong oracle). The last step,
    to the clean sample, returns the mean; its variance value is not used."""
    sched = make_scheduler(gd.cfg, "ddpm", steps)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    prev = dict(zip(ts, ts[1:] + [-1]))
    mean_fn = oracle(gd)

    def fn(x, t):
        tt = int(t[0])
        if prev[tt] < 0:
            return torch.cat([mean_fn(x, t), torch.full_like(x, 0.9)], 1)
        a_t, a_p = float(gd.alphas_cumprod[tt]), float(gd.alphas_cumprod[prev[tt]])
        beta = 1 - a_t / a_p
        post = (1 - a_p) / (1 - a_t) * beta
        c0 = math.sqrt(a_p) * beta / (1 - a_t)
        true = scale * (post + c0**2 * var_x0_given(a_t))
        v = 2 * (math.log(true) - math.log(post)) / (math.log(beta) - math.log(post)) - 1
        return torch.cat([mean_fn(x, t), torch.full_like(x, v)], 1)
    return fn, ts[-1]


def var_x0_given(a_t: float) -> float:
    """Var[x0 | x_t] for x0 ~ N(MU, SIGMA^2) (the same for every x_t)."""
    return SIGMA**2 * (1 - a_t) / (a_t * SIGMA**2 + 1 - a_t)


@pytest.mark.parametrize("steps", [25, 64])
def test_ddpm_with_a_learned_variance_samples_the_known_variance(steps):
    """DDPM with variance_type learned_range, strided: an oracle that outputs the exact reverse
    variance of each strided step draws the analytic variance to within 3%: SIGMA^2 less
    Var[x0 | x_t1], as the last step (t_1 -> clean) returns E[x0 | x_t1] without noise. The same
    oracle with a 10% wrong variance misses by more than that, so the check can catch it; and a
    variance value of 0.9 at the last step adds no noise there (diffusers added std ~0.02)."""
    cfg = DiffusionConfig(clip_sample=False, learn_variance=True)
    gd = GaussianDiffusion(cfg)
    tol = 0.03

    def rel_var(scale):
        fn, t1 = variance_oracle(gd, steps, scale)
        x = sample(fn, (20000, 1), cfg, "ddpm", steps, generator=torch.Generator().manual_seed(0))
        assert abs(x.mean().item() - MU) < 0.01
        expected = SIGMA**2 - var_x0_given(float(gd.alphas_cumprod[t1]))
        return x.var().item() / expected - 1

    exact = rel_var(1.0)
    assert abs(exact) < tol, exact
    high, low = rel_var(1.1), rel_var(0.9)
    assert high > tol and low < -tol, (high, low)
