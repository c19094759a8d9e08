"""The shared step loop without Ray: learning, EMA, non-finite guard, checkpoint cadence."""

from __future__ import annotations

import pytest
import torch

from unclip.training.loop import (LoopConfig, NonFiniteLossError, autocast_for, lr_at, make_optimizer,
                                  train)
from unclip.training.state import EMA


class RecordingSession:
    """A single-process stand-in for the Ray Train session: keeps what it is given."""

    rank, world_size = 0, 1
    is_main = True

    def __init__(self):
        self.logged, self.reports = [], []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def progress(self, step, total, metrics):
        pass

    def report(self, metrics, model, optimizer, ema, meta, checkpoint=True):
        self.reports.append((dict(metrics), dict(meta)))


def _setup(total=120, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    cfg = LoopConfig(total_steps=total, lr=0.05, warmup_steps=5, log_every=10, checkpoint_every=50,
                     ema_decay=0.9, **kw)
    return model, make_optimizer(model, cfg), EMA(model, cfg.ema_decay), cfg


def _batches(epoch):
    g = torch.Generator().manual_seed(epoch)
    for _ in range(16):
        x = torch.randn(32, 4, generator=g)
        yield x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _mse(model, batch):
    x, y = batch
    return {"loss": (model(x) - y).pow(2).mean()}


def test_loop_learns_reports_and_evaluates():
    model, opt, ema, cfg = _setup(eval_every=40)
    session = RecordingSession()
    evals = []

    def evaluate(m, step):
        evals.append(step)
        x, y = next(iter(_batches(99)))
        return {"val_mse": float((m(x) - y).pow(2).mean())}

    final = train(session, model, opt, ema, _batches, _mse, cfg, evaluate=evaluate)
    losses = [m["train_loss"] for _, m in session.logged if "train_loss" in m]
    assert losses[-1] < 0.01 * losses[0]
    assert final["val_mse"] < 0.05
    assert [meta["step"] for _, meta in session.reports] == [50, 100, 120]
    assert evals == [40, 80, 120]


def test_bf16_on_a_cpu_that_emulates_it_warns(caplog, monkeypatch):
    """Emulated bfloat16 made the tiny decoder 14x slower per step on an AVX2 machine: say so."""
    import unclip.training.loop as loop

    assert isinstance(loop.cpu_has_native_bf16(), bool)
    for native, warned in ((False, True), (True, False)):
        monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
        caplog.clear()
        with caplog.at_level("WARNING", logger="unclip"):
            autocast_for(torch.device("cpu"), "bf16")
            autocast_for(torch.device("cpu"), "auto")
        assert ("emulated" in caplog.text) == warned, caplog.text


def test_bf16_on_cpu_only_when_asked_and_it_still_learns():
    x = torch.randn(4, 8)
    for amp, dtype in (("auto", torch.float32), ("off", torch.float32), ("bf16", torch.bfloat16)):
        autocast, scaler = autocast_for(torch.device("cpu"), amp)
        with autocast:
            assert torch.nn.Linear(8, 2)(x).dtype == dtype and scaler is None
    with pytest.raises(ValueError, match="amp must be"):
        autocast_for(torch.device("cpu"), "int8")
    model, opt, ema, cfg = _setup(amp="bf16")
    session = RecordingSession()
    train(session, model, opt, ema, _batches, _mse, cfg)
    losses = [m["train_loss"] for _, m in session.logged if "train_loss" in m]
    assert losses[-1] < 0.02 * losses[0] and model.weight.dtype == torch.float32


def test_nonfinite_steps_are_skipped_then_stop(caplog):
    model, opt, ema, cfg = _setup(total=30, max_nonfinite_steps=3)
    calls = {"n": 0}

    def sometimes_nan(m, batch):
        calls["n"] += 1
        out = _mse(m, batch)
        if calls["n"] in (3, 7):
            out["loss"] = out["loss"] * float("nan")
        return out

    before = [p.clone() for p in model.parameters()]
    with caplog.at_level("WARNING", logger="unclip"):
        train(RecordingSession(), model, opt, ema, _batches, sometimes_nan, cfg)
    assert calls["n"] == 32  # two skipped steps did not count
    warned = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(warned) == 2 and "non-finite loss" in warned[0], warned
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    model, opt, ema, cfg = _setup(total=30, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(RecordingSession(), model, opt, ema, _batches,
              lambda m, b: {"loss": _mse(m, b)["loss"] * float("inf")}, cfg)


def test_resume_continues_the_step_count():
    model, opt, ema, cfg = _setup(total=60)
    session = RecordingSession()
    train(session, model, opt, ema, _batches, _mse, cfg, resume={"step": 50, "epoch": 2, "batch": 2})
    assert [meta["step"] for _, meta in session.reports] == [60]
    assert session.logged[0][0] == 60


def test_lr_schedule():
    cfg = LoopConfig(total_steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.0, abs=1e-9)


def test_ema_follows_its_closed_form():
    """No warm-up: starting from a copy of the weights w_0, k updates with decay d after the model
    took weights w_1..w_k give d^k w_0 + sum_j (1 - d) d^(k - j) w_j; buffers are copied as they are."""
    torch.manual_seed(0)
    model = torch.nn.BatchNorm1d(3)  # a weight, a bias and buffers
    d = 0.9
    w = [torch.randn(3) for _ in range(6)]
    with torch.no_grad():
        model.weight.copy_(w[0])
    ema = EMA(model, d)
    for j in range(1, 6):
        with torch.no_grad():
            model.weight.copy_(w[j])
            model.running_mean.fill_(float(j))
        ema.update(model)
        expected = d**j * w[0] + sum((1 - d) * d ** (j - i) * w[i] for i in range(1, j + 1))
        torch.testing.assert_close(ema.model.weight, expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(ema.model.running_mean, torch.full((3,), float(j)))
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    frozen = EMA(model, 1.0)
    frozen.update(torch.nn.BatchNorm1d(3))
    torch.testing.assert_close(frozen.model.weight, model.weight)  # decay 1 keeps w_0


def test_cpu_workers_leave_a_cpu_to_their_data_input(monkeypatch):
    """Ray Data plans with what training leaves: 2 workers x 1 CPU on a 2-CPU Ray would leave the
    prior's lazy read tasks nothing (a stall before step 1), so they share all but one CPU."""
    import ray

    from stages.training import cpus_per_worker

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert cpus_per_worker(2, streams_data=True) == 0.5
    assert cpus_per_worker(1, streams_data=True) == 1.0
    assert cpus_per_worker(2, streams_data=False) == 1.0  # nothing to stream: one CPU each
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    assert cpus_per_worker(8, streams_data=True) == 1.0
