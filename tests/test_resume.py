"""The one resume rule of every training stage (unclip.training.loop.train), without Ray.

A run checkpoints mid-epoch; a fresh model restored from that checkpoint and trained on ends at
the uninterrupted run's step count with the uninterrupted run's weights (optimizer moments, EMA,
data position and every step's noise included). Checked for CLIP (no EMA) and an upsampler
(EMA, diffusion noise drawn from the stage's generator and from torch's default one), each with the
stage's own loss and batch source at a tiny size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unclip.training.loop import LoopConfig, make_optimizer, resume_position, train
from unclip.training.state import EMA, load_state, save_state


class CheckpointingSession:
    """Single-process stand-in for the Ray Train session: each report is a checkpoint folder."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, out: Path):
        self.out, self.steps = out, []

    def log(self, metrics, step):
        pass

    def progress(self, step, total, metrics):
        pass

    def report(self, metrics, model, optimizer, ema, meta, checkpoint=True):
        save_state(str(self.out / f"step{meta['step']}"), model, optimizer, ema,
                   {**meta, "metrics": metrics})
        self.steps.append(meta["step"])


def _run(build, parts, cfg: LoopConfig, out: Path, betas=(0.9, 0.999), eps=1e-8, ema_decay=None,
         resume_from: Path | None = None):
    """Train as ``stages.training.train_worker`` does, from ``resume_from`` if given."""
    torch.manual_seed(0)
    model = build()
    opt = make_optimizer(model, cfg, betas, eps)
    ema = None if ema_decay is None else EMA(model, ema_decay)
    meta = {} if resume_from is None else load_state(str(resume_from), model, opt, ema)
    gen = torch.Generator()
    batches, loss, evaluate, after_step = parts(gen)
    session = CheckpointingSession(out)
    final = train(session, model, opt, ema, batches, loss, cfg, meta, evaluate=evaluate,
                  generator=gen, seed=5, after_step=after_step)
    return model, ema, final, session


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def _resumes_like_uninterrupted(build, parts, cfg, tmp_path, ckpt_step, **kw):
    full_model, full_ema, full, session = _run(build, parts, cfg, tmp_path / "full", **kw)
    assert session.steps[-1] == cfg.total_steps and full["resumed_from_step"] == 0
    meta = load_state(str(tmp_path / "full" / f"step{ckpt_step}"), build(), None, None)
    assert 0 < meta["batch"], "the checkpoint under test must fall mid-epoch"
    model, ema, final, session = _run(build, parts, cfg, tmp_path / "resumed",
                                      resume_from=tmp_path / "full" / f"step{ckpt_step}", **kw)
    assert final["resumed_from_step"] == ckpt_step
    assert session.steps[-1] == cfg.total_steps  # the same step count, not one epoch more or less
    _assert_same(model, full_model)
    if ema is not None:
        _assert_same(ema.model, full_ema.model)
    return final, full


def test_resume_position_rule():
    assert resume_position(None) == (0, 0, 0) and resume_position({}) == (0, 0, 0)
    assert resume_position({"step": 7, "epoch": 2, "batch": 3}) == (7, 2, 3)
    # a checkpoint written before the rule (no batch count): the next epoch boundary
    assert resume_position({"step": 7, "epoch": 2}) == (7, 3, 0)


CAPTIONS = ["a red circle", "a blue square", "a green star", "a yellow triangle",
            "a small purple circle", "a large orange square"]


def test_clip_resumes_mid_epoch_like_an_uninterrupted_run(tmp_path):
    """CLIP's loss, schedule and Adam settings (stages.clip), 3 steps an epoch, checkpoint at 4."""
    from open_clip.loss import ClipLoss
    from open_clip.tokenizer import SimpleTokenizer

    from stages.clip import clamp_logit_scale, contrastive_loss, loop_config
    from unclip.eval.clip_eval import heldout_retrieval
    from unclip.models.clip import create_custom

    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
                                                 "layers": 1, "head_width": 8},
                 "text_cfg": {"context_length": 12, "width": 16, "heads": 2, "layers": 1}}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    captions = np.array([CAPTIONS[i % len(CAPTIONS)] for i in range(24)])
    holdout = {"images": images[:12], "captions": list(captions[:12])}
    train_opts = {"epochs": 3, "lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.1, "grad_clip": 1.0,
                  "log_every": 2}
    cfg = loop_config(train_opts, steps_per_epoch=3)
    assert (cfg.total_steps, cfg.checkpoint_every, cfg.lr_schedule, cfg.amp) == (9, 3, "cosine", "off")
    cfg.checkpoint_every = 4  # mid-epoch checkpoints (the stage's are at epoch ends)

    def parts(gen):
        def batches(epoch):
            order = np.random.default_rng(epoch).permutation(24)
            for i in range(0, 24, 8):
                idx = order[i:i + 8]
                yield {"image": images[idx], "caption": captions[idx]}

        loss = contrastive_loss(ClipLoss(), SimpleTokenizer(context_length=12), torch.device("cpu"))
        return batches, loss, lambda m, step: heldout_retrieval(m, holdout), clamp_logit_scale

    final, full = _resumes_like_uninterrupted(lambda: create_custom(model_cfg), parts, cfg, tmp_path,
                                              ckpt_step=4, betas=(0.9, 0.98), eps=1e-6)
    assert final["val_recall_at_5"] == full["val_recall_at_5"]


@pytest.mark.parametrize("ema_decay", [0.9])
def test_upsampler_resumes_mid_epoch_like_an_uninterrupted_run(tmp_path, ema_decay):
    """The upsampler stage's crop batches and loss (noise from its generator and torch's default
    one, noise-level augmentation), with EMA: 4 steps an epoch, checkpoint at step 6 of 10."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.models.upsampler import Upsampler
    from unclip.training.upsampler import CropBatches, make_step_loss

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)

    def build():
        return Upsampler({"channels": [8, 16], "norm_num_groups": 4, "steps": 4})

    def parts(gen):
        probe = build()
        batches = CropBatches(images, 2, 8, 4, "blur", seed=3, steps_per_epoch=4)
        loss = make_step_loss(GaussianDiffusion(probe.diffusion_config), 50, gen)
        return batches, loss, None, None

    cfg = LoopConfig(total_steps=10, lr=1e-3, warmup_steps=2, log_every=2, checkpoint_every=3,
                     ema_decay=ema_decay)
    _resumes_like_uninterrupted(build, parts, cfg, tmp_path, ckpt_step=6, ema_decay=ema_decay)
