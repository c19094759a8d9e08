"""``<stage>.init_from``: fine-tuning from a registered or saved model. The source is resolved and
digested once, the model is built from the source's own config, the worker template loads its
weights before the first step (not when it resumes its own checkpoint), and imported diffusers
models are refused by kind. Driven on tiny models, without the pipeline."""

from __future__ import annotations

import types

import pytest
import torch

from stages import training
from stages.init_from import InitFromError, init_metrics, load_init_weights, resolve_init
from unclip import checkpoint
from unclip.diffusion import DiffusionConfig
from unclip.models.decoder import Decoder, DecoderConfig
from unclip.models.prior import DiffusionPrior
from unclip.models.upsampler import Upsampler
from unclip.training.loop import LoopConfig

CLIP = types.SimpleNamespace(dim=16, text_width=12, context_length=8)


def _decoder(seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = dict(resolution=8, clip_dim=CLIP.dim, text_width=CLIP.text_width, base_channels=16,
               channel_mult=(1, 2), attention_resolutions=(4,), head_channels=16, context_dim=32,
               norm_groups=8, use_caption=True, learn_variance=True)
    cfg.update(kw)
    return Decoder(DecoderConfig(**cfg), DiffusionConfig(num_train_timesteps=50,
                                                         learn_variance=cfg["learn_variance"]))


def _prior(seed: int = 0, **kw) -> DiffusionPrior:
    torch.manual_seed(seed)
    cfg = {"dim": CLIP.dim, "text_width": CLIP.text_width, "max_text_len": CLIP.context_length,
           "width": 32, "layers": 1, "heads": 2, "embed_scale": 4.0,
           "diffusion": {"num_train_timesteps": 50, "beta_schedule": "squaredcos_cap_v2"}}
    return DiffusionPrior({**cfg, **kw})


class FakeSession:
    """The Ray Train session of one worker, without Ray: ``saved`` is a training state of its own
    to resume (None: a fresh training)."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, config, saved=None):
        self.saved, self.reports = saved, []

    def has_checkpoint(self):
        return self.saved is not None

    def restore(self, model, optimizer, ema):
        if self.saved is None:
            return {}
        model.load_state_dict(self.saved)
        if ema is not None:
            ema.model.load_state_dict(self.saved)
        return {"step": 1, "epoch": 0, "batch": 1}

    def log(self, metrics, step):
        pass

    def progress(self, step, total, metrics):
        pass

    def report(self, metrics, model, optimizer, ema, meta, checkpoint=True):
        self.reports.append(dict(meta))


def _run_worker(monkeypatch, build, init, loss, saved=None, total=3):
    """Run :func:`stages.training.train_worker` in-process; returns (weights the steps saw at the
    start, EMA weights at the start, final weights)."""
    monkeypatch.setattr(training, "WorkerSession", lambda config: FakeSession(config, saved))
    monkeypatch.setattr(training, "prepare", lambda model, train: model)
    seen = {}

    def steps(w):
        seen["start"] = {k: v.detach().clone() for k, v in w.model.state_dict().items()}
        seen["model"] = w.model

        def batches(epoch):
            for _ in range(total):
                yield None
        return training.Steps(batches, lambda m, b: {"loss": loss(m)})

    cfg = LoopConfig(total_steps=total, lr=1e-2, warmup_steps=0, log_every=1, checkpoint_every=100,
                     ema_decay=0.5)
    config = {"train": {"seed": 3}, "init": init}
    emas = {}
    from unclip.training import sharding

    orig = sharding.make_ema

    def make_ema(model, decay):
        emas["ema"] = orig(model, decay)
        emas["start"] = {k: v.detach().clone() for k, v in emas["ema"].model.state_dict().items()}
        return emas["ema"]

    monkeypatch.setattr(sharding, "make_ema", make_ema)
    training.train_worker(config, build, cfg, steps)
    final = {k: v.detach().clone() for k, v in seen["model"].state_dict().items()}
    return seen["start"], emas["start"], final


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_decoder_starts_from_the_source_weights_and_architecture(tmp_path, monkeypatch):
    """A decoder folder as init_from: the stage's model config becomes the source's (its widths,
    its learned variance) whatever the stage said; step-0 weights (and the EMA's) are the source's;
    training then moves them; the record names the pinned source and its digest."""
    from stages.decoder import init_config

    source = _decoder(seed=1, base_channels=24, norm_groups=8, head_channels=24)
    folder = str(tmp_path / "src")
    source.save(folder)
    init = resolve_init(folder, "decoder", ("decoder",))
    assert init.pinned == folder and init.kind == "decoder" and init.digest.startswith("sha256:")
    assert init_metrics(init)["init_from_digest"] == init.digest
    stage_mcfg = {**_decoder().cfg.to_dict(), "base_channels": 16, "learn_variance": False}
    mcfg, diffusion = init_config(init, stage_mcfg, {"num_train_timesteps": 50,
                                                     "learn_variance": False}, CLIP)
    assert mcfg["base_channels"] == 24 and mcfg["learn_variance"] and diffusion["learn_variance"]

    def build():
        torch.manual_seed(99)  # a different random init: the source's weights must replace it
        return Decoder(DecoderConfig.from_dict(mcfg), DiffusionConfig.from_dict(diffusion))

    def loss(m):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        z = torch.randn(2, CLIP.dim, generator=torch.Generator().manual_seed(1))
        return m(x, torch.tensor([3, 7]), z).square().mean()

    start, ema_start, final = _run_worker(monkeypatch, build, init.record(), loss)
    assert _equal(start, source.state_dict())
    assert _equal(ema_start, source.state_dict())
    assert not _equal(final, source.state_dict())  # it trained from there
    assert build().out_channels == 6


def test_decoder_source_that_contradicts_the_run_is_refused(tmp_path):
    from stages.decoder import init_config

    folder = str(tmp_path / "src")
    _decoder(clip_dim=8).save(folder)
    init = resolve_init(folder, "decoder", ("decoder",))
    with pytest.raises(InitFromError, match="clip_dim is 8 but this run's CLIP embedding needs 16"):
        init_config(init, {"resolution": 8}, {}, CLIP)
    with pytest.raises(InitFromError, match="resolution"):
        init_config(resolve_init(_saved(tmp_path / "r", _decoder(resolution=16)), "decoder",
                                 ("decoder",)), {"resolution": 8}, {}, CLIP)


def _saved(path, model) -> str:
    model.save(str(path))
    return str(path)


def test_prior_starts_from_a_registered_source(tmp_path, monkeypatch):
    """models:/NAME@ALIAS is pinned to its version; the prior is built from the source's config
    (width, layers, its embedding scale); step-0 weights are the source's (the worker resolves the
    pinned version in the same store)."""
    import mlflow

    monkeypatch.setenv("UNCLIP_CACHE_DIR", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    # an experiment of this store: the active one may be an earlier pipeline run's, in another
    mlflow.set_experiment("init-from")
    try:
        _prior_from_registry(tmp_path, monkeypatch)
    finally:
        mlflow.set_tracking_uri(None)


def _prior_from_registry(tmp_path, monkeypatch):
    from stages.prior import init_config
    from unclip.registry import register_checkpoint

    source = _prior(seed=2, width=48, layers=2, embed_scale=7.0)
    version, alias = register_checkpoint(_saved(tmp_path / "prior", source), "test-prior", 0.5)
    init = resolve_init(f"models:/test-prior@{alias}", "prior", ("diffusion_prior",))
    assert init.pinned == f"models:/test-prior/{version}"
    mcfg = init_config(init, CLIP)
    assert mcfg["width"] == 48 and mcfg["layers"] == 2 and mcfg["embed_scale"] == 7.0

    def build():
        torch.manual_seed(5)
        return DiffusionPrior(mcfg)

    def loss(m):
        return sum(p.square().sum() for p in m.parameters()) * 1e-3

    start, ema_start, final = _run_worker(monkeypatch, build, init.record(), loss)
    assert _equal(start, source.state_dict()) and _equal(ema_start, source.state_dict())
    assert not _equal(final, source.state_dict())
    with pytest.raises(InitFromError, match="text_width is 12 but this run's CLIP text tower needs 4"):
        init_config(init, types.SimpleNamespace(dim=16, text_width=4, context_length=8))


def test_a_resumed_training_continues_from_its_own_checkpoint(tmp_path, monkeypatch):
    """With a training state to restore, init_from is not loaded again (nor even read)."""
    source = _prior(seed=2)
    init = resolve_init(_saved(tmp_path / "prior", source), "prior", ("diffusion_prior",))
    own = _prior(seed=8).state_dict()
    gone = {**init.record(), "pinned": str(tmp_path / "deleted")}  # the source need not exist
    start, _, _ = _run_worker(monkeypatch, lambda: _prior(seed=5), gone,
                              lambda m: sum(p.sum() for p in m.parameters()) * 0, saved=own)
    assert _equal(start, own) and not _equal(start, source.state_dict())


def test_changed_weights_and_wrong_or_imported_sources_are_refused(tmp_path):
    from stages.upsample import init_config

    folder = _saved(tmp_path / "up", Upsampler({"channels": [8, 16], "norm_num_groups": 4}))
    init = resolve_init(folder, "upsample1", ("upsampler",))
    assert init_config(init, "upsample1", 4, "blur")["channels"] == [8, 16]  # the source's widths
    with pytest.raises(InitFromError, match="upsample2.init_from: the source's scale is 4 but "
                                            "upsample2.scale needs 2"):
        init_config(init, "upsample2", 2, "bsr")
    with pytest.raises(InitFromError, match="holds a 'upsampler', not a decoder"):
        resolve_init(folder, "decoder", ("decoder",))
    with pytest.raises(InitFromError, match="decoder.init_from=.*nowhere"):
        resolve_init(str(tmp_path / "nowhere"), "decoder", ("decoder",))
    imported = tmp_path / "karlo"
    checkpoint.save(str(imported), {"w": torch.zeros(1)}, "diffusers_unclip_prior", {"prior": {}})
    with pytest.raises(InitFromError, match="'diffusers_unclip_prior'.*does not support fine-tuning"):
        resolve_init(str(imported), "prior", ("diffusion_prior",))
    hf = tmp_path / "hf"
    checkpoint.save(str(hf), {"w": torch.zeros(1)}, "clip", {"backend": "transformers"})
    with pytest.raises(InitFromError, match="imported transformers 'clip', which only clip.init_from"):
        resolve_init(str(hf), "decoder", ("decoder",))
    Upsampler({"channels": [8, 16], "norm_num_groups": 4}).save(folder)  # other weights, same place
    with pytest.raises(InitFromError, match="changed since the stage resolved them"):
        load_init_weights(Upsampler({"channels": [8, 16], "norm_num_groups": 4}), init.record())


def test_decoder_stage_fine_tunes_the_registered_decoder(smoke_run, tmp_path):
    """The stage end to end on the smoke run: decoder.init_from=models:/unclip-decoder@champion
    with a stage model option that differs (ignored) and a learning rate too small to move the
    weights: the result has the registered decoder's architecture and (to float noise) its weights,
    and the manifest and the saved config.json name the pinned version and the weights' digest."""
    import shutil

    from pipelines.cli import main
    from pipelines.manifest import read_manifest
    from unclip.models.decoder import load_decoder

    before = read_manifest(str(smoke_run), "decoder")
    source = load_decoder(before.outputs["model"])
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("decoder", "decoder-*"))
    assert main(["stage", "decoder", "preset=smoke", f"run_dir={run_dir}",
                 "decoder.init_from=models:/unclip-decoder@champion", "decoder.model.base_channels=8",
                 "decoder.train.total_steps=2", "decoder.train.lr=1e-12",
                 "decoder.train.warmup_steps=0", "decoder.eval.num_images=4",
                 "decoder.eval.neighbour_reference=false"]) == 0
    m = read_manifest(str(run_dir), "decoder")
    version = int(before.metrics["registered_version"])
    assert m.metrics["init_from"] == "models:/unclip-decoder@champion"
    assert m.metrics["init_from_pinned"] == f"models:/unclip-decoder/{version}"
    assert m.metrics["init_from_digest"].startswith("sha256:")
    tuned = load_decoder(m.outputs["model"])
    assert tuned.cfg == source.cfg and tuned.cfg.base_channels != 8
    a, b = source.state_dict(), tuned.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    config = checkpoint.read_config(m.outputs["model"])
    assert config["init_from"]["pinned"] == m.metrics["init_from_pinned"]
    assert config["init_from"]["digest"] == m.metrics["init_from_digest"]


@pytest.mark.parametrize("stage, output, overrides", [
    ("prior", "prior", ["prior.diffusion.model.width=16", "prior.diffusion.optim.lr=1e-12",
                        "prior.train.total_steps=2", "prior.train.warmup_steps=0",
                        "prior.max_holdout=8"]),
    ("upsample1", "model", ["upsample1.model.channels=[8,16]", "upsample1.model.norm_num_groups=4",
                            "upsample1.train.lr=1e-12", "upsample1.train.total_steps=2",
                            "upsample1.train.warmup_steps=0"]),
])
def test_prior_and_upsampler_stages_fine_tune_their_registered_model(smoke_run, tmp_path, stage,
                                                                     output, overrides):
    """As the decoder's stage test, for the diffusion prior and the first upsampler: the stage's
    own model options are ignored, the weights are the registered model's, the source is recorded."""
    import shutil

    from pipelines.cli import main
    from pipelines.manifest import read_manifest
    from unclip.generation.models import DEFAULT_NAMES

    name = DEFAULT_NAMES["upsampler1" if stage == "upsample1" else stage]
    before = read_manifest(str(smoke_run), stage)
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns(stage, f"{stage}-*"))
    assert main(["stage", stage, "preset=smoke", f"run_dir={run_dir}",
                 f"{stage}.init_from=models:/{name}@champion", *overrides]) == 0
    m = read_manifest(str(run_dir), stage)
    assert m.metrics["init_from_pinned"] == f"models:/{name}/{int(before.metrics['registered_version'])}"
    src, new = checkpoint.load(before.outputs[output]), checkpoint.load(m.outputs[output])
    assert new[1]["config"] == src[1]["config"] or stage == "upsample1" and \
        {**new[1]["config"], "kind": None} == {**src[1]["config"], "kind": None}
    assert all(torch.allclose(src[0][k], new[0][k], atol=1e-6) for k in src[0])
    assert new[1]["init_from"]["digest"] == m.metrics["init_from_digest"]


def test_clip_training_starts_from_a_clip_checkpoint(tmp_path, monkeypatch):
    """clip.init_from: a trained CLIP checkpoint's own open_clip config builds the model and its
    weights are step 0's; beside clip.source (a CLIP used as it is) it is refused."""
    from omegaconf import OmegaConf

    from stages import clip as clip_stage
    from unclip.models.clip import ClipEncoder, create_custom

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32,
                                           "layers": 1, "head_width": 16},
           "text_cfg": {"context_length": 16, "width": 24, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    source = ClipEncoder(create_custom(cfg), {"arch": "custom"}, cfg)
    folder = str(tmp_path / "clip")
    source.save(folder)
    init = resolve_init(folder, "clip", ("clip",))
    assert init.config == cfg

    def build():
        torch.manual_seed(4)
        return create_custom(init.config)

    def loss(m):
        return sum(p.square().sum() for p in m.parameters() if p.requires_grad) * 1e-3

    start, ema_start, final = _run_worker(monkeypatch, build, init.record(), loss)
    assert _equal(start, source.model.state_dict()) and _equal(ema_start, source.model.state_dict())
    assert not _equal(final, source.model.state_dict())
    ctx = types.SimpleNamespace(stage_cfg=OmegaConf.create({"source": "ViT-B-32", "init_from": folder}))
    with pytest.raises(InitFromError, match="set one, not both"):
        clip_stage.run(ctx)
