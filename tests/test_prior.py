"""The priors: causality and shapes, learning on a learnable synthetic set (beating both trivial
baselines), sampling determinism, checkpoint and registry round trips, and the stage's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unclip.eval.prior_eval import validate
from unclip.models.captions import CaptionEncoder
from unclip.data.shapes import COLORS, SHAPES, sample_scene
from unclip.embeddings.pca import fit as fit_pca
from unclip.models.ar_prior import ARPrior, similarity_edges
from unclip.models.clip import ClipEncoder, create_custom
from unclip.models.prior import DiffusionPrior, load_prior, mean_cosine, rerank, resolve_embed_scale
from unclip.models.transformer import CausalTransformer
from unclip.training.loop import LoopConfig, make_optimizer, train
from unclip.training.state import EMA

DIM, WIDTH, CTX = 16, 32, 16
N_TRAIN = 3000
CLIP_CFG = {"embed_dim": DIM,
            "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
            "text_cfg": {"context_length": CTX, "width": WIDTH, "heads": 2, "layers": 1}}


class Session:
    """Single-process stand-in for the Ray Train session (keeps what it is given)."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def progress(self, step, total, metrics):
        pass

    def report(self, metrics, model, optimizer, ema, meta, checkpoint=True):
        pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine a second thread
    only waits for the first (several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth():
    """Captions from the shapes vocabulary; z_i a noisy function of the first object's colour and
    shape (learnable from the caption, far from z_t of an untrained CLIP and from the mean z_i)."""
    torch.manual_seed(0)
    clip = ClipEncoder(create_custom(CLIP_CFG), {"arch": "custom"}, CLIP_CFG)
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(N_TRAIN + 100)]
    colour = rng.normal(size=(len(COLORS), DIM))
    shape = rng.normal(size=(len(SHAPES), DIM))
    zi = np.stack([colour[list(COLORS).index(s.objects[0].color)]
                   + shape[list(SHAPES).index(s.objects[0].shape)] for s in scenes])
    zi += 0.3 * rng.normal(size=zi.shape)
    zi = (zi / np.linalg.norm(zi, axis=1, keepdims=True)).astype(np.float32)
    caps = [s.caption for s in scenes]
    zt = clip.encode_text(caps).astype(np.float32)
    tr, ho = slice(0, N_TRAIN), slice(N_TRAIN, N_TRAIN + 100)
    return {"clip": clip, "encoder": CaptionEncoder(clip), "captions": caps, "zi": zi, "zt": zt,
            "train": tr,
            "holdout": {"captions": caps[ho], "image": zi[ho], "text": zt[ho],
                        "mean_train_image": zi[tr].mean(0)}}


def _diffusion_prior(**kw) -> DiffusionPrior:
    torch.manual_seed(0)
    cfg = {"dim": DIM, "text_width": WIDTH, "max_text_len": CTX, "width": 32, "layers": 2, "heads": 2,
           "embed_scale": resolve_embed_scale("sqrt_dim", DIM),
           "diffusion": {"num_train_timesteps": 200, "beta_schedule": "squaredcos_cap_v2"}}
    return DiffusionPrior({**cfg, **kw})


def _ar_prior(synth, n_components=8, buckets=16) -> ARPrior:
    torch.manual_seed(0)
    zi, zt = synth["zi"][synth["train"]], synth["zt"][synth["train"]]
    pca = fit_pca(zi, n_components=n_components, num_buckets=buckets)
    cfg = {"dim": DIM, "text_width": WIDTH, "max_text_len": CTX, "n_components": n_components,
           "num_buckets": buckets, "sim_buckets": 8, "width": 32, "layers": 2, "heads": 2}
    return ARPrior.from_pca(cfg, pca, similarity_edges(np.sum(zi * zt, 1), 8))


def _fit(model, synth, steps, lr=3e-3, batch=64):
    """The shared step loop (no Ray), as the stage's workers run it."""
    cfg = LoopConfig(total_steps=steps, lr=lr, warmup_steps=20, lr_schedule="cosine", log_every=20,
                     checkpoint_every=10**6, ema_decay=0.95)
    opt, ema, session = make_optimizer(model, cfg), EMA(model, cfg.ema_decay), Session()
    enc, caps, zi, zt = synth["encoder"], synth["captions"], synth["zi"], synth["zt"]

    def batches(epoch):
        order = np.random.default_rng(epoch).permutation(N_TRAIN)
        for i in range(0, N_TRAIN - batch + 1, batch):
            yield order[i:i + batch]

    def step_loss(m, idx):
        tokens, mask = enc([caps[i] for i in idx])
        return m.losses(torch.from_numpy(zi[idx]), tokens, mask, torch.from_numpy(zt[idx]))

    train(session, model, opt, ema, batches, step_loss, cfg)
    losses = [m["train_loss"] for _, m in session.logged if "train_loss" in m]
    return ema.model, losses


# ---- structure -----------------------------------------------------------------------------


def test_transformer_is_causal():
    torch.manual_seed(0)
    net = CausalTransformer(16, 2, 2).eval()
    x = torch.randn(2, 7, 16)
    y = x.clone()
    y[:, 4] += torch.randn(2, 16)
    a, b = net(x), net(y)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_masked_keys_are_excluded_exactly():
    """Padded positions change nothing at the valid ones: the valid outputs are those of the
    sequence with the padded positions cut out (the Transformer itself has no positions), even
    with a padded first position (a query with no valid key) and huge values under the mask."""
    torch.manual_seed(0)
    net = CausalTransformer(16, 2, 2).eval()
    x = torch.randn(2, 9, 16)
    valid = torch.tensor([[True, False, True, True, False, False, True, True, True],
                          [False, True, True, False, True, True, True, False, True]])
    x[~valid] = 1e4
    out = net(x, valid)
    assert torch.isfinite(out).all()
    for i in range(2):
        alone = net(x[i, valid[i]][None])
        torch.testing.assert_close(out[i, valid[i]], alone[0], atol=1e-5, rtol=1e-5)


def _padded(tokens: torch.Tensor, mask: torch.Tensor, length: int = CTX):
    """The same captions padded to ``length`` positions (as the cascade pads to the context)."""
    pad = length - tokens.shape[1]
    return (torch.nn.functional.pad(tokens, (0, 0, 0, pad)),
            torch.nn.functional.pad(mask, (0, pad), value=False))


def _captions_of_different_lengths(synth, k=3):
    """k captions whose token counts differ (the longest sets the batch's padded length)."""
    enc, seen, out = synth["encoder"], set(), []
    for c in synth["captions"]:
        n = int(enc([c])[1].sum())
        if n not in seen:
            seen.add(n)
            out.append(c)
        if len(out) == k:
            break
    return sorted(out, key=len)


def test_guided_diffusion_prior_samples_do_not_depend_on_the_padding(synth):
    """The null branch is one token at position 0, the rest masked: a guided sample of a caption
    is the same trimmed to the batch's longest caption (as trained) or padded to the context (as
    the cascade pads), alone or in a batch. The old null branch (null_text[:n], all n valid)
    changed with n: cosine 0.86 between the two on one caption at guidance 4."""
    m = _diffusion_prior().eval()
    caps = _captions_of_different_lengths(synth)
    tokens, mask = synth["encoder"](caps)
    assert tokens.shape[1] < CTX and mask.sum(1).min() < tokens.shape[1]
    zt = torch.from_numpy(synth["zt"][[synth["captions"].index(c) for c in caps]])
    x, t = torch.randn(3, DIM), torch.tensor([10, 100, 190])
    drop = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, *_padded(tokens, mask), zt, drop),
                                   m(x, t, tokens[:, :1], mask[:, :1], zt, drop), atol=1e-5, rtol=1e-5)

    def draw(tt, tm, z, scale):
        return m.sample(tt, tm, z, steps=10, guidance_scale=scale, num_candidates=2,
                        generator=torch.Generator().manual_seed(4))

    for scale in (1.0, 4.0):
        torch.testing.assert_close(draw(*_padded(tokens, mask), zt, scale), draw(tokens, mask, zt, scale),
                                   atol=1e-5, rtol=1e-4)
        n0 = int(mask[0].sum())  # the shortest caption alone, trimmed to itself vs padded
        torch.testing.assert_close(draw(*_padded(tokens[:1], mask[:1]), zt[:1], scale),
                                   draw(tokens[:1, :n0], mask[:1, :n0], zt[:1], scale), atol=1e-5, rtol=1e-4)


def test_guided_ar_prior_samples_do_not_depend_on_the_padding(synth):
    """As for the diffusion prior: the AR prior's unconditional logits, hence its guided samples,
    are the same whatever the caption padding."""
    m = _ar_prior(synth).eval()
    caps = _captions_of_different_lengths(synth)
    tokens, mask = synth["encoder"](caps)
    idx = [synth["captions"].index(c) for c in caps]
    zt, zi = torch.from_numpy(synth["zt"][idx]), torch.from_numpy(synth["zi"][idx])
    codes, sim = m.encode(zi), m.sim_token(zi, zt)
    drop = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(m(codes[:, :4], *_padded(tokens, mask), zt, sim, drop),
                                   m(codes[:, :4], tokens[:, :1], mask[:, :1], zt, sim, drop),
                                   atol=1e-5, rtol=1e-5)

    def draw(tt, tm, z, scale):
        return m.sample(tt, tm, z, guidance_scale=scale, num_candidates=4,
                        generator=torch.Generator().manual_seed(5))

    for scale in (1.0, 3.0):
        assert torch.equal(draw(*_padded(tokens, mask), zt, scale), draw(tokens, mask, zt, scale))
        n0 = int(mask[0].sum())
        assert torch.equal(draw(*_padded(tokens[:1], mask[:1]), zt[:1], scale),
                           draw(tokens[:1, :n0], mask[:1, :n0], zt[:1], scale))


def test_diffusion_prior_shapes_masking_and_dropout(synth):
    m = _diffusion_prior().eval()
    tokens, mask = synth["encoder"](synth["captions"][:3])
    zt = torch.from_numpy(synth["zt"][:3])
    x, t = torch.randn(3, DIM), torch.tensor([0, 50, 199])
    out = m(x, t, tokens, mask, zt)
    assert out.shape == (3, DIM)
    # padded caption positions are masked out
    garbage = tokens.clone()
    garbage[~mask] = 100.0
    assert torch.allclose(m(x, t, garbage, mask, zt), out, atol=1e-5)
    # dropped captions: the output no longer depends on the caption or z_t
    drop = torch.ones(3, dtype=torch.bool)
    d1 = m(x, t, tokens, mask, zt, drop)
    d2 = m(x, t, torch.randn_like(tokens), mask, torch.randn_like(zt), drop)
    assert torch.allclose(d1, d2, atol=1e-5) and not torch.allclose(d1, out)
    with pytest.raises(ValueError, match="text_tokens must be"):
        m(x, t, tokens[..., :5], mask, zt)
    with pytest.raises(ValueError, match="unknown diffusion prior option"):
        DiffusionPrior({"dim": 4, "text_width": 4, "widht": 8})


def test_ar_prior_is_causal_and_quantizer_round_trips(synth):
    m = _ar_prior(synth).eval()
    zi = torch.from_numpy(synth["zi"][:5])
    codes = m.encode(zi)
    assert codes.shape == (5, 8) and codes.min() >= 0 and codes.max() < 16
    assert torch.equal(m.encode(m.decode(codes, normalize=False)), codes)  # bucket centres quantize to themselves
    assert mean_cosine(m.decode(m.encode(synth["zi"])), synth["zi"]) > 0.9
    tokens, mask = synth["encoder"](synth["captions"][:5])
    zt = torch.from_numpy(synth["zt"][:5])
    sim = m.sim_token(zi, zt)
    logits = m(codes[:, :-1], tokens, mask, zt, sim)
    assert logits.shape == (5, 8, 16)
    changed = codes.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 16
    other = m(changed[:, :-1], tokens, mask, zt, sim)
    assert torch.allclose(logits[:, :4], other[:, :4], atol=1e-5)  # code j sees codes < j only
    assert not torch.allclose(logits[:, 4:], other[:, 4:])


def test_rerank_keeps_the_best_dot_product():
    cands = torch.nn.functional.normalize(torch.randn(4, 3, 8), dim=-1)
    zt = torch.randn(4, 8)
    best = rerank(cands, zt)
    scores = (cands * torch.nn.functional.normalize(zt, dim=-1)[:, None]).sum(-1)
    assert torch.allclose((best * torch.nn.functional.normalize(zt, dim=-1)).sum(-1), scores.max(1).values)


# ---- learning ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_diffusion(synth):
    return _fit(_diffusion_prior(), synth, steps=250)


def test_diffusion_prior_learns_and_beats_baselines(synth, trained_diffusion):
    model, losses = trained_diffusion
    assert losses[-1] < 0.5 * losses[0]
    m = validate(model, "diffusion", {"steps": 25, "num_candidates": 2}, synth["encoder"],
                 synth["holdout"], seed=0)
    base = max(m["val_baseline_text"], m["val_baseline_mean"])
    assert m["val_cosine"] > base + 0.2, m
    assert m["val_delta"] == pytest.approx(m["val_cosine"] - base)


def test_ar_prior_learns_and_beats_mean_baseline(synth):
    model, losses = _fit(_ar_prior(synth), synth, steps=1000, lr=5e-3)
    assert losses[-1] < 0.6 * losses[0]
    m = validate(model, "autoregressive", {"num_candidates": 1, "sim_quantile": [0.5, 1.0]},
                 synth["encoder"], synth["holdout"], seed=0)
    assert m["val_cosine"] > max(m["val_baseline_text"], m["val_baseline_mean"]) + 0.15, m


# ---- sampling and files --------------------------------------------------------------------


def test_sampling_is_deterministic_and_checkpoints_round_trip(synth, trained_diffusion, tmp_path):
    model = trained_diffusion[0]
    tokens, mask = synth["encoder"](synth["captions"][:4])
    zt = torch.from_numpy(synth["zt"][:4])

    def draw(m, seed, **kw):
        return m.sample(tokens, mask, zt, steps=10, generator=torch.Generator().manual_seed(seed), **kw)

    a = draw(model, 1, guidance_scale=2.0, num_candidates=3)
    assert a.shape == (4, DIM) and torch.allclose(a.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(a, draw(model, 1, guidance_scale=2.0, num_candidates=3))
    assert not torch.equal(a, draw(model, 2, guidance_scale=2.0, num_candidates=3))
    for sampler in ("ddim", "dpm"):
        assert draw(model, 1, sampler=sampler).shape == (4, DIM)
    model.save(str(tmp_path / "diffusion"))
    again = load_prior(str(tmp_path / "diffusion"))
    assert isinstance(again, DiffusionPrior) and again.cfg == model.cfg
    assert torch.equal(draw(again, 1, guidance_scale=2.0, num_candidates=3), a)

    ar = _ar_prior(synth)
    b = ar.sample(tokens, mask, zt, guidance_scale=1.5, generator=torch.Generator().manual_seed(3))
    assert b.shape == (4, DIM)
    ar.save(str(tmp_path / "ar"))
    ar2 = load_prior(str(tmp_path / "ar"))
    assert isinstance(ar2, ARPrior)
    assert torch.equal(ar2.sample(tokens, mask, zt, guidance_scale=1.5,
                                  generator=torch.Generator().manual_seed(3)), b)
    assert json.loads((tmp_path / "ar" / "config.json").read_text())["kind"] == "ar_prior"


def test_registry_round_trip_through_mlflow_server(mlflow_server, synth, trained_diffusion, tmp_path):
    import mlflow

    from unclip.registry import register_checkpoint, resolve_checkpoint

    model = trained_diffusion[0]
    folder = str(tmp_path / "prior")
    model.save(folder)
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        mlflow.set_experiment("prior-registry-test")
        name = f"unclip-prior-test-{tmp_path.name}"
        with mlflow.start_run():
            v1, alias1 = register_checkpoint(folder, name, 0.8)
        with mlflow.start_run():
            v2, alias2 = register_checkpoint(folder, name, 0.5)
        assert (alias1, alias2) == ("champion", "candidate")
        local = resolve_checkpoint(f"models:/{name}@champion", cache_dir=str(tmp_path / "cache"))
        assert not (Path(local) / "model.pkl").exists()
        loaded = load_prior(local)
        tokens, mask = synth["encoder"](synth["captions"][:2])
        zt = torch.from_numpy(synth["zt"][:2])
        g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        assert torch.equal(loaded.sample(tokens, mask, zt, steps=5, generator=g()),
                           model.sample(tokens, mask, zt, steps=5, generator=g()))
    finally:
        mlflow.set_tracking_uri(None)


# ---- the stage -----------------------------------------------------------------------------


def test_prior_stage_outputs(smoke_run):
    from pipelines.manifest import read_manifest

    m = read_manifest(str(smoke_run), "prior")
    assert m is not None
    for k in ("val_cosine", "val_baseline_text", "val_baseline_mean", "val_delta",
              "registered_version", "registered_alias", "train_loss"):
        assert k in m.metrics, k
    assert m.metrics["registered_alias"] in ("champion", "candidate")
    model = load_prior(m.outputs["prior"])
    assert isinstance(model, DiffusionPrior)
    assert m.metrics["trained_steps"] > 0


def test_prior_resumes_after_a_killed_worker(smoke_run, tmp_path, monkeypatch):
    """A worker dies at step 25 (checkpoints every 20): Ray Train restarts it from step 20, the
    run ends at the configured step count, and no step before 20 is trained (or logged) twice."""
    import shutil

    from mlflow import MlflowClient

    from pipelines import tracking
    from pipelines.cli import main
    from pipelines.config import load_config
    from pipelines.manifest import read_manifest

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("prior", "prior-*"))
    marker = tmp_path / "killed"
    monkeypatch.setenv("UNCLIP_FAULT_KILL_AT_STEP", "25")
    monkeypatch.setenv("UNCLIP_FAULT_MARKER", str(marker))
    # run --until prior: another test may have re-run the shared smoke run's embed stage, and the
    # pipeline then first refreshes what went stale upstream (pca) before the prior
    assert main(["run", "--until", "prior", "preset=smoke", f"run_dir={run_dir}"]) == 0
    assert marker.read_text() == "25"  # the fault fired (once)
    m = read_manifest(str(run_dir), "prior")
    assert m.metrics["trained_steps"] == 40
    cfg = load_config(["preset=smoke", f"run_dir={run_dir}"])
    client = MlflowClient(tracking.tracking_uri(cfg))
    # the training loop's series (the stage's summary metrics are logged once more at step 0)
    steps = [h.step for h in client.get_metric_history(m.mlflow_run_id, "train_loss") if h.step > 0]
    assert steps == [10, 20, 30, 40], steps  # resumed at 20: steps 10 and 20 were not redone


def test_prior_resumes_after_a_killed_driver(smoke_run, tmp_path):
    """SIGKILL the whole pipeline process (driver, its local Ray, the workers) once a checkpoint is
    persisted: the re-run continues from that checkpoint's step, not from zero, even with other
    operational values (checkpoint and log cadence)."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pipelines.cli import main
    from pipelines.manifest import read_manifest
    from stages.training import latest_persisted

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("prior", "prior-*"))
    overrides = ["preset=smoke", f"run_dir={run_dir}", "prior.train.total_steps=300",
                 "prior.train.checkpoint_every=20"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "run", "--until", "prior", *overrides],
                            cwd=root, env={**os.environ, "TQDM_DISABLE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed_after = -1
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            folders = list((run_dir / "checkpoints").glob("prior-*"))
            if folders:
                killed_after = latest_persisted(str(folders[0]))[0]
                if killed_after >= 20:
                    break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 20 <= killed_after < 300, "no checkpoint was persisted before the driver ended"
    assert read_manifest(str(run_dir), "prior") is None

    # resumed under other operational values (log and checkpoint cadence define no result):
    # the same training continues, it does not restart from step 0
    assert main(["run", "--until", "prior", *overrides[:-1], "prior.train.checkpoint_every=100",
                 "prior.train.log_every=7"]) == 0
    m = read_manifest(str(run_dir), "prior")
    assert m.metrics["trained_steps"] == 300
    assert m.metrics["resumed_from_step"] >= killed_after


@torch.no_grad()
def test_ar_prior_guidance_and_similarity_token(synth):
    """Guidance on the AR prior's log-probabilities is uncond + s (cond - uncond): s > 1 moves
    them away from the unconditional ones, past the conditional ones, by exactly (s - 1)(cond -
    uncond) (the sampler draws from ``next_log_probs``). The similarity token comes from the
    configured quantile range: top half (0.5, 1) -> the upper half of the buckets, whose edges
    are the training z_i . z_t quantiles."""
    m = _ar_prior(synth).eval()
    tokens, mask = synth["encoder"](synth["captions"][:4])
    zt, zi = torch.from_numpy(synth["zt"][:4]), torch.from_numpy(synth["zi"][:4])
    m.null_zt.add_(1.0)  # an untrained null branch barely differs: make it
    codes, sim = m.encode(zi)[:, :3], m.sim_token(zi, zt)
    cond = torch.log_softmax(m(codes, tokens, mask, zt, sim)[:, -1], -1)
    uncond = torch.log_softmax(m(codes, tokens, mask, zt, sim, torch.ones(4, dtype=torch.bool))[:, -1], -1)
    assert (cond - uncond).abs().max() > 1e-2
    torch.testing.assert_close(m.next_log_probs(codes, tokens, mask, zt, sim, 1.0), cond)
    for s in (2.0, 4.0):
        g = m.next_log_probs(codes, tokens, mask, zt, sim, s)
        torch.testing.assert_close(g - cond, (s - 1) * (cond - uncond), atol=1e-5, rtol=1e-5)
        assert ((g - uncond).norm(dim=-1) > (cond - uncond).norm(dim=-1) * (s - 0.01)).all()
    # the similarity tokens the sampler feeds the network (sim_quantile defaults to the top half)
    sims = []
    hook = m.sim_embed.register_forward_hook(lambda mod, inp, out: sims.append(inp[0].clone()))
    big = 200
    tt, tm, z = tokens[:1].expand(big, -1, -1), mask[:1].expand(big, -1), zt[:1].expand(big, -1)
    m.sample(tt, tm, z, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    hook.remove()
    drawn = sims[0][:big]
    assert set(drawn.tolist()) == set(range(4, 8))  # sim_buckets 8: the upper half, every bucket
    assert m.sim_range((0.5, 1.0)) == (4, 8) and m.sim_range((0.75, 1.0)) == (6, 8)
    assert m.sim_range((0.0, 0.25)) == (0, 2)
    with pytest.raises(ValueError, match="sim_quantile"):
        m.sim_range((0.8, 0.5))
    # bucket k holds quantiles [k, k + 1) / 8 of the training similarities: the top half of the
    # training pairs gets tokens 4..7, the bottom half 0..3
    tr = synth["train"]
    s_train = np.sum(synth["zi"][tr] * synth["zt"][tr], 1)
    tok = m.sim_token(torch.from_numpy(synth["zi"][tr]), torch.from_numpy(synth["zt"][tr])).numpy()
    med = np.median(s_train)
    assert (tok[s_train > med + 1e-6] >= 4).all() and (tok[s_train < med - 1e-6] < 4).all()
    counts = np.bincount(tok, minlength=8)
    assert counts.min() > 0.8 * len(tok) / 8, counts


def _peaky_ar_prior(synth) -> ARPrior:
    """An untrained AR prior whose next-code distributions are far from uniform and whose null
    branch differs from the conditional one, so a wrong key, value or mask changes the draws."""
    m = _ar_prior(synth, n_components=12).eval()
    with torch.no_grad():
        m.head.weight.mul_(8.0)
        m.null_zt.add_(1.0)
    return m


@torch.no_grad()
def test_ar_prior_cached_logits_match_a_full_forward(synth):
    """Teacher-forced through the key/value cache (prefill, then one code at a time, then several
    at once), every step's logits are the full forward's at that position to 1e-5, for captions of
    different lengths in one batch and with dropped (null) rows among them."""
    m = _peaky_ar_prior(synth)
    caps = _captions_of_different_lengths(synth, 3) * 2
    tokens, mask = synth["encoder"](caps)
    idx = [synth["captions"].index(c) for c in caps]
    zt, zi = torch.from_numpy(synth["zt"][idx]), torch.from_numpy(synth["zi"][idx])
    codes, sim = m.encode(zi), m.sim_token(zi, zt)
    drop = torch.tensor([False, False, False, True, True, True])
    full = m(codes[:, :-1], tokens, mask, zt, sim, drop)  # (6, 12, V): logits of codes 1..12
    first, state = m.prefill(tokens, mask, zt, sim, drop)
    steps = [first]
    for j in range(6):
        steps.append(m.extend(state, codes[:, j:j + 1])[:, -1])
    assert state.codes == 6 and state.cache.length == tokens.shape[1] + 2 + 6
    rest = m.extend(state, codes[:, 6:11])  # five codes in one call
    torch.testing.assert_close(torch.cat([torch.stack(steps, 1), rest], 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at most n_components - 1"):
        m.extend(state, codes[:, 11:12])  # the last code predicts nothing


@torch.no_grad()
def test_ar_prior_cached_sampling_gives_the_uncached_samples(synth):
    """With the same generator the cached sampler returns exactly the codes and embeddings of the
    uncached one (a full forward per code): unguided and guided (> 1), several candidates,
    temperature, captions of different lengths in one batch, and the same captions padded."""
    m = _peaky_ar_prior(synth)
    caps = _captions_of_different_lengths(synth, 3)
    tokens, mask = synth["encoder"](caps)
    zt = torch.from_numpy(synth["zt"][[synth["captions"].index(c) for c in caps]])
    seen = []
    for scale, temp, k in ((1.0, 1.0, 1), (3.0, 1.0, 1), (3.0, 0.7, 3), (1.5, 1.3, 2)):
        for tt, tm in ((tokens, mask), _padded(tokens, mask)):
            kw = dict(guidance_scale=scale, temperature=temp)
            rep = [v.repeat_interleave(k, 0) for v in (tt, tm, zt)]
            cached = m.sample_codes(*rep, generator=torch.Generator().manual_seed(7), **kw)
            full = m.sample_codes(*rep, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
            assert cached.shape == (3 * k, 12) and torch.equal(cached, full), (scale, temp, k)
            seen.append(cached)
            z = m.sample(tt, tm, zt, num_candidates=k, generator=torch.Generator().manual_seed(7), **kw)
            z_full = m.sample(tt, tm, zt, num_candidates=k, use_cache=False,
                              generator=torch.Generator().manual_seed(7), **kw)
            assert z.shape == (3, DIM) and torch.equal(z, z_full)
    # the draws are not trivially equal: guidance and temperature change them
    assert not torch.equal(seen[0], seen[2])
    assert len({tuple(c[:, :3].flatten().tolist()) for c in seen[:2]}) == 1  # padding changes nothing


@torch.no_grad()
def test_ar_prior_cache_follows_autocast_and_restores_training_mode(synth):
    """Under bfloat16 autocast the cache holds bfloat16 keys and values and its logits are the
    autocast full forward's (to bfloat16 rounding); sampling leaves a training model training."""
    m = _peaky_ar_prior(synth)
    tokens, mask = synth["encoder"](synth["captions"][:2])
    zt, zi = torch.from_numpy(synth["zt"][:2]), torch.from_numpy(synth["zi"][:2])
    codes, sim = m.encode(zi), m.sim_token(zi, zt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = m(codes[:, :3], tokens, mask, zt, sim)
        first, state = m.prefill(tokens, mask, zt, sim)
        rest = m.extend(state, codes[:, :3])
        z = m.sample(tokens, mask, zt, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert state.cache.keys[0].dtype == torch.bfloat16 and len(state.cache.keys) == m.cfg.layers
    torch.testing.assert_close(torch.cat([first[:, None], rest], 1).float(), full.float(),
                               atol=0.1, rtol=0.05)
    assert z.shape == (2, DIM) and torch.isfinite(z).all()
    m.train()
    m.sample(tokens, mask, zt, generator=torch.Generator().manual_seed(0))
    assert m.training
