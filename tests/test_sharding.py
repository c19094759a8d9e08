"""FSDP (unclip.training.sharding) on CPU: two gloo processes against one process, tiny models.

One pair of processes (started once for the module) trains a tiny decoder and upsampler (both
with activation checkpointing) and a tiny diffusion prior through the shared loop (unclip.training.loop.train),
writes checkpoints as the training stages do, and resumes from the one at step 2. The test process
trains the same models unsharded on the concatenated batch. The noise and timesteps are part of
each batch, so the two must agree: weights, EMA and optimizer state to float tolerance.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from unclip.training import sharding
from unclip.training.loop import LoopConfig, make_optimizer, train
from unclip.training.state import EMA, load_state, state_tensors, unwrap, write_state

WORLD = 2
GLOBAL_BATCH = 4
STEPS, EVERY = 4, 2          # a checkpoint and an evaluation at step 2, the final ones at 4
CLIP_DIM, TEXT_W, TEXT_LEN = 16, 12, 5
MODELS = ("decoder", "prior", "upsampler")
CHECKPOINTED = ("decoder", "upsampler")  # their FSDP runs recompute activations too


# ---- the models and their data (the same in every process) --------------------------------------


def _build(name: str, checkpointing: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "decoder":
        from unclip.diffusion import DiffusionConfig
        from unclip.models.decoder import Decoder, DecoderConfig

        model = Decoder(DecoderConfig(resolution=8, clip_dim=CLIP_DIM, text_width=TEXT_W,
                                      base_channels=16, channel_mult=(1, 2),
                                      attention_resolutions=(4,), head_channels=16, context_dim=32,
                                      norm_groups=8),
                        DiffusionConfig(num_train_timesteps=100, learn_variance=True))
    elif name == "prior":
        from unclip.models.prior import DiffusionPrior

        model = DiffusionPrior({"dim": CLIP_DIM, "text_width": TEXT_W, "max_text_len": 8,
                                "width": 32, "layers": 2, "heads": 2, "embed_scale": 4.0,
                                "diffusion": {"num_train_timesteps": 100,
                                              "beta_schedule": "squaredcos_cap_v2"}})
    elif name == "upsampler":
        from unclip.models.upsampler import Upsampler

        model = Upsampler({"channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                           "diffusion": {"num_train_timesteps": 100}})
    else:  # the autoregressive prior, for the activation checkpointing check only
        import numpy as np

        from unclip.embeddings.pca import fit as fit_pca
        from unclip.models.ar_prior import ARPrior, similarity_edges

        g = torch.Generator().manual_seed(5)
        zi = torch.nn.functional.normalize(torch.randn(256, CLIP_DIM, generator=g), dim=-1).numpy()
        zt = torch.nn.functional.normalize(torch.randn(256, CLIP_DIM, generator=g), dim=-1).numpy()
        pca = fit_pca(zi, n_components=8, num_buckets=16)
        model = ARPrior.from_pca({"dim": CLIP_DIM, "text_width": TEXT_W, "max_text_len": 8,
                                  "n_components": 8, "num_buckets": 16, "sim_buckets": 4,
                                  "width": 32, "layers": 2, "heads": 2}, pca,
                                 similarity_edges(np.sum(zi * zt, 1), 4))
    if checkpointing:
        sharding.set_activation_checkpointing(model)
    return model


def _unit(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, CLIP_DIM, generator=g), dim=-1)


def _batch(name: str, index: int, n: int = GLOBAL_BATCH) -> dict[str, torch.Tensor]:
    """Batch ``index`` of the run, noise, timesteps and dropouts included."""
    g = torch.Generator().manual_seed(1000 + index)
    mask = torch.ones(n, TEXT_LEN, dtype=torch.bool)
    mask[::2, 3:] = False  # padded captions
    common = {"tokens": torch.randn(n, TEXT_LEN, TEXT_W, generator=g), "mask": mask,
              "t": torch.randint(0, 100, (n,), generator=g)}
    if name == "decoder":
        return {**common, "x0": torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, "z": _unit(g, n),
                "noise": torch.randn(n, 3, 8, 8, generator=g),
                "drop_clip": torch.tensor([False, True, False, False])[:n],
                "drop_caption": torch.tensor([True, False, False, True])[:n]}
    if name == "upsampler":  # 4 px -> 16 px
        return {"x0": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "t": common["t"],
                "low": torch.rand(n, 3, 4, 4, generator=g) * 2 - 1,
                "t_aug": torch.randint(0, 50, (n,), generator=g),
                "noise": torch.randn(n, 3, 16, 16, generator=g)}
    return {**common, "zi": _unit(g, n), "zt": _unit(g, n), "noise": torch.randn(n, CLIP_DIM, generator=g),
            "drop": torch.tensor([False, False, True, False])[:n]}


def _loss(name: str, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from unclip.diffusion import GaussianDiffusion

    inner = unwrap(model)
    if name == "decoder":
        out = GaussianDiffusion(inner.diffusion).training_losses(
            lambda x, t: model(x, t, b["z"], b["tokens"], b["mask"], b["drop_clip"], b["drop_caption"]),
            b["x0"], t=b["t"], noise=b["noise"])
    elif name == "upsampler":
        out = GaussianDiffusion(inner.diffusion_config).training_losses(
            lambda x, t: model(x, t, b["low"], b["t_aug"]), b["x0"], t=b["t"], noise=b["noise"])
    elif name == "prior":
        out = inner.diffusion.training_losses(
            lambda x, t: model(x, t, b["tokens"], b["mask"], b["zt"], b["drop"]),
            inner.to_latent(b["zi"]), t=b["t"], noise=b["noise"])
    else:
        g = torch.Generator().manual_seed(3)
        return inner.losses(b["zi"], b["tokens"], b["mask"], b["zt"], g, net=model)
    return {k: v.mean() for k, v in out.items()}


@torch.no_grad()
def _probe(name: str, model: torch.nn.Module) -> torch.Tensor:
    """The model's output on fixed inputs (what an evaluation sees)."""
    b = _batch(name, 99, 2)
    model.eval()
    if name == "decoder":
        x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
        return model(x_t, b["t"], b["z"], b["tokens"], b["mask"])
    if name == "upsampler":
        return model(b["noise"], b["t"], b["low"], b["t_aug"])
    return model(b["noise"], b["t"], b["tokens"], b["mask"], b["zt"])


def _loop_config() -> LoopConfig:
    return LoopConfig(total_steps=STEPS, lr=1e-3, warmup_steps=0, weight_decay=0.01, grad_clip=0.5,
                      ema_decay=0.5, log_every=1, checkpoint_every=EVERY, eval_every=EVERY, amp="off")


class _Session:
    """What stages.training.WorkerSession does without Ray: every rank gathers, rank 0 writes
    ``<out>/step<N>`` in the training stages' layout."""

    def __init__(self, rank: int, world_size: int, out: Path):
        self.rank, self.world_size, self.out = rank, world_size, out
        self.collective_timeout_s = 120.0
        self.metrics: dict[str, float] = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        pass

    def report(self, metrics, model, optimizer, ema, meta, checkpoint=True) -> None:
        tensors, opt_meta = state_tensors(unwrap(model), optimizer, ema)
        if self.is_main:
            write_state(str(self.out / f"step{meta['step']}"), tensors, opt_meta,
                        {**meta, "metrics": metrics})
            self.metrics = dict(metrics)


def _run(name: str, model: torch.nn.Module, out: Path, rank: int = 0, world: int = 1,
         resume_from: Path | None = None) -> dict[str, Any]:
    """Train ``model`` (sharded or not) to STEPS, from ``resume_from`` if given; rank 0's
    evaluation outputs (of the EMA, gathered) by step, and the final metrics."""
    cfg = _loop_config()
    opt = make_optimizer(model, cfg)
    for g in opt.param_groups:
        # Adam's first steps move a weight by ~lr * sign(grad): with the default eps a gradient
        # near 0 whose last bits differ (ranks sum in another order) could flip it. A larger eps
        # keeps tiny gradients' updates proportional, so the comparison measures the sharding.
        g["eps"] = 1e-4
    ema = sharding.make_ema(model, cfg.ema_decay)
    meta = {} if resume_from is None else load_state(str(resume_from), unwrap(model), opt, ema)
    per = GLOBAL_BATCH // world

    def batches(epoch: int):  # EVERY batches an epoch: a resume at step 2 continues with epoch 1
        for i in range(EVERY):
            b = _batch(name, epoch * EVERY + i)
            yield {k: v[rank * per:(rank + 1) * per] for k, v in b.items()}

    outputs: dict[str, torch.Tensor] = {}

    def evaluate(ema_model: torch.nn.Module, step: int) -> dict[str, float]:
        outputs[f"step{step}"] = _probe(name, ema_model)
        return {"eval_mean": float(outputs[f"step{step}"].mean())}

    session = _Session(rank, world, out)
    train(session, model, opt, ema, batches, lambda m, b: _loss(name, m, b), cfg, meta,
          evaluate=evaluate)
    held = {"model": _share(model), "ema": _share(ema.model),
            "adam": _share_of_state(opt), "sharded_ema": isinstance(ema, sharding.ShardedEMA)}
    return {"outputs": outputs, "metrics": {**session.metrics, "held": held}}


def _share(module: torch.nn.Module) -> float:
    """The share of the parameters this rank holds (1 unsharded)."""
    local = sum((p.to_local() if sharding.is_dtensor(p) else p).numel() for p in module.parameters())
    return local / sum(p.numel() for p in module.parameters())


def _share_of_state(opt: torch.optim.Optimizer) -> float:
    moments = [v for st in opt.state.values() for k, v in st.items() if k.startswith("exp_avg")]
    return sum((v.to_local() if sharding.is_dtensor(v) else v).numel() for v in moments) / \
        sum(v.numel() for v in moments)


# ---- the two sharded processes ---------------------------------------------------------------------


def _worker(rank: int, root: str, port: int) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name in MODELS:
            base = Path(root) / "fsdp" / name
            runs = {"run": None, "resumed": base / "run" / f"step{EVERY}"}
            for run, resume_from in runs.items():
                model = sharding.shard(_build(name, checkpointing=name in CHECKPOINTED), "fsdp")
                got = _run(name, model, base / run, rank, WORLD, resume_from)
                dist.barrier()
                if rank == 0:
                    save_file({k: v.contiguous() for k, v in got["outputs"].items()},
                              str(base / run / "outputs.safetensors"))
                    (base / run / "metrics.json").write_text(json.dumps(got["metrics"]))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The FSDP runs spawn a 2-process group (20 s of the fast tier): they run with the whole suite.
SPAWNS = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """FSDP runs (2 processes) and unsharded references (this process) of both tiny models."""
    import torch.multiprocessing as mp
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sharding")
    mp.start_processes(_worker, args=(str(root), _free_port()), nprocs=WORLD, start_method="spawn")
    for name in MODELS:
        out = root / "reference" / name
        got = _run(name, _build(name), out)
        save_file(got["outputs"], str(out / "outputs.safetensors"))
    return root


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "state.safetensors"))


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                       atol: float = 2e-5, rtol: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


# ---- the tests --------------------------------------------------------------------------------------


@SPAWNS
@pytest.mark.parametrize("name", MODELS)
def test_fsdp_steps_match_one_process_on_the_whole_batch(runs, name):
    """Weights, EMA and AdamW moments after 2 and 4 steps (gradient clipping on), and the gathered
    EMA's evaluation outputs, as one process training on both ranks' batches together."""
    from safetensors.torch import load_file

    for step in (EVERY, STEPS):
        got = _tensors(runs / "fsdp" / name / "run" / f"step{step}")
        want = _tensors(runs / "reference" / name / f"step{step}")
        assert any(k.startswith("opt.") for k in got) and any(k.startswith("ema.") for k in got)
        _assert_same_state(got, want)
        # the steps moved the weights (a comparison of untrained models would prove nothing)
        initial = _build(name).state_dict()
        assert any(not torch.equal(want[f"model.{k}"], v) for k, v in initial.items())
    outs = load_file(str(runs / "fsdp" / name / "run" / "outputs.safetensors"))
    refs = load_file(str(runs / "reference" / name / "outputs.safetensors"))
    assert outs.keys() == refs.keys() == {f"step{EVERY}", f"step{STEPS}"}
    for k in refs:
        torch.testing.assert_close(outs[k], refs[k], atol=2e-5, rtol=1e-4)
    m = json.loads((runs / "fsdp" / name / "run" / "metrics.json").read_text())
    # rank 0 held about half of the weights, of the EMA and of the AdamW moments
    assert m["held"]["sharded_ema"]
    for what in ("model", "ema", "adam"):
        assert 0.4 < m["held"][what] < 0.6, (what, m["held"])
    assert m["dp_world_size"] == WORLD and m["dp_distinct_weights"] == 1
    assert m["dp_distinct_batches"] == WORLD
    assert m["dp_distinct_weights_final"] == 1 and m["dp_distinct_ema_final"] == 1


@SPAWNS
@pytest.mark.parametrize("name", MODELS)
def test_a_sharded_checkpoint_loads_into_the_unsharded_model(runs, name, tmp_path):
    """As the stage registers it: the final state into a plain model and EMA, the EMA saved as a
    model folder, rebuilt from it by the model's own loader, giving rank 0's gathered outputs."""
    from safetensors.torch import load_file

    from unclip.models.decoder import Decoder
    from unclip.models.prior import DiffusionPrior
    from unclip.models.upsampler import Upsampler

    model = _build(name)
    ema = EMA(model, 0.0)
    meta = load_state(str(runs / "fsdp" / name / "run" / f"step{STEPS}"), model, None, ema)
    assert meta["step"] == STEPS
    ema.model.save(str(tmp_path / "model"))
    loader = {"decoder": Decoder, "prior": DiffusionPrior, "upsampler": Upsampler}[name]
    loaded = loader.from_checkpoint(str(tmp_path / "model"))
    want = load_file(str(runs / "fsdp" / name / "run" / "outputs.safetensors"))[f"step{STEPS}"]
    torch.testing.assert_close(_probe(name, loaded), want, atol=1e-6, rtol=1e-6)
    # the layout of an unsharded run's checkpoint: the same names, shapes and dtypes
    got = _tensors(runs / "fsdp" / name / "run" / f"step{STEPS}")
    ref = _tensors(runs / "reference" / name / f"step{STEPS}")
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
    assert {k[len("model."):] for k in got if k.startswith("model.")} == set(model.state_dict())


@SPAWNS
@pytest.mark.parametrize("name", MODELS)
def test_resume_from_a_sharded_checkpoint_matches_an_uninterrupted_run(runs, name, tmp_path):
    """Model, EMA and optimizer restored from step 2: sharded again (2 processes) or unsharded
    (this process; the strategy is operational, so either may resume the other's checkpoint)."""
    from safetensors.torch import load_file

    uninterrupted = _tensors(runs / "fsdp" / name / "run" / f"step{STEPS}")
    _assert_same_state(_tensors(runs / "fsdp" / name / "resumed" / f"step{STEPS}"), uninterrupted,
                       atol=1e-6, rtol=1e-6)
    outs = load_file(str(runs / "fsdp" / name / "resumed" / "outputs.safetensors"))
    assert set(outs) == {f"step{STEPS}"}  # evaluated after the resume only
    m = json.loads((runs / "fsdp" / name / "resumed" / "metrics.json").read_text())
    assert m["resumed_from_step"] == EVERY

    _run(name, _build(name), tmp_path, resume_from=runs / "fsdp" / name / "run" / f"step{EVERY}")
    _assert_same_state(_tensors(tmp_path / f"step{STEPS}"),
                       _tensors(runs / "reference" / name / f"step{STEPS}"))


# ---- activation checkpointing and the options, one process ------------------------------------------


@pytest.mark.parametrize("name", ("decoder", "prior", "ar_prior", "upsampler"))
def test_activation_checkpointing_gives_the_same_gradients(name):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _build(name, checkpointing)
        if name in ("decoder", "upsampler"):  # diffusers' own switch, per resnet / attention block
            assert model.unet.is_gradient_checkpointing == checkpointing
        model.train()
        b = _batch("prior" if name == "ar_prior" else name, 0)
        _loss(name, model, b)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def test_activation_checkpointing_recomputes_and_is_refused_where_nothing_would(monkeypatch):
    from unclip.models.transformer import Block, CausalTransformer

    model = _build("prior", checkpointing=True)
    calls = []
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    _loss("prior", model, _batch("prior", 0))["loss"].backward()
    assert len(calls) == 2 * 2  # 2 layers: the forward, and again in the backward
    assert sharding.set_activation_checkpointing(CausalTransformer(8, 3, 2)) == 3
    with pytest.raises(ValueError, match="no UNet or transformer blocks"):
        sharding.set_activation_checkpointing(torch.nn.Linear(2, 2))
    with torch.no_grad():  # sampling: nothing to recompute, the KV cache path untouched
        calls.clear()
        _probe("prior", model)
        assert len(calls) == 2


def test_sharding_needs_a_process_group_and_a_known_strategy():
    with pytest.raises(ValueError, match="one of"):
        sharding.shard(torch.nn.Linear(2, 2), "zero3")
    with pytest.raises(RuntimeError, match="process group"):
        sharding.shard(torch.nn.Linear(2, 2), "fsdp")
    assert isinstance(sharding.shard(torch.nn.Linear(2, 2), "ddp"), torch.nn.Linear)  # one process
    assert not sharding.is_sharded(torch.nn.Linear(2, 2))


def test_parallel_and_activation_checkpointing_are_operational_options():
    """Every training stage but CLIP takes them; default ddp, off; a bad value fails composing; set,
    they leave the stage's hash (and so its checkpoint name) as it was."""
    from pipelines.config import ConfigError, load_config
    from pipelines.graph import Graph
    from pipelines.plan.checks import check
    from pipelines.status import stage_config_hash

    g = Graph()
    base = load_config(["preset=smoke"])
    for stage in ("prior", "decoder", "upsample1", "upsample2"):
        assert base[stage].train.parallel == "ddp" and base[stage].train.activation_checkpointing is False
        changed = load_config(["preset=smoke", f"{stage}.train.parallel=fsdp",
                               f"{stage}.train.activation_checkpointing=true"])
        assert stage_config_hash(g[stage], changed) == stage_config_hash(g[stage], base)
    with pytest.raises(ConfigError, match=r"decoder\.train\.parallel"):
        check(load_config(["decoder.train.parallel=zero3"]))
