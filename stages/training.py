"""Ray Train glue shared by the training stages: trainer set-up, the one worker template
(:func:`train_worker`), resume, reporting, MLflow from rank 0.

Checkpoints live in ``run_dir/checkpoints/<stage>-<config hash>`` (outside the stage folder, which a
re-run empties), so constructing the trainer again with the same name resumes from the last one:
same step, same optimizer state. A config change gives a new name and a fresh start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from stages.contract import StageContext
from unclip import storage
from unclip.training import sharding
from unclip.training.state import (STATE_META, STATE_WEIGHTS, EMA, load_state, state_tensors, unwrap,
                                   write_state)

log = logging.getLogger("unclip")


def fit(ctx: StageContext, train_loop: Callable[[dict], None], loop_config: dict[str, Any],
        num_workers: int, datasets: dict | None = None, max_failures: int = 3):
    """Run ``train_loop`` data-parallel on ``num_workers`` Ray Train workers; returns the Result."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = bool(ctx.cfg.ray.num_gpus) or (torch.cuda.is_available() and not ctx.cfg.ray.address
                                             and ctx.cfg.ray.num_gpus is None)
    name = checkpoint_name(ctx)
    board = ProgressBoard.start() if show_progress_bar() else None
    if not ctx.verbose:  # the stage's one bar replaces Ray Data's bar per split and epoch
        for ds in (datasets or {}).values():
            ds.context.enable_progress_bars = False
    config = {**loop_config,
              "mlflow": {"tracking_uri": ctx.tracking_uri, "run_id": ctx.mlflow_run_id},
              "fault": fault_injection(), "progress_board": board,
              "checkpoint_dir": storage.join(checkpoint_root(ctx), name),
              "collective_timeout_s": collective_timeout(ctx)}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(timeout_s=int(config["collective_timeout_s"])),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else
                                     {"CPU": cpus_per_worker(num_workers, bool(datasets))}),
        run_config=RunConfig(name=name, storage_path=checkpoint_root(ctx),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig("INFO" if ctx.verbose else "WARNING")),
        datasets=datasets or {},
    )
    with _progress_bar(board, ctx.name):
        return trainer.fit()


def cpus_per_worker(num_workers: int, streams_data: bool) -> float:
    """Ray CPUs each CPU worker reserves: one, unless the workers would then hold every CPU of the
    cluster while their Ray Data input still has read and map tasks to run (Ray Data plans with
    what training leaves; with nothing left the stage stalls before its first step). Then they share
    all but one CPU. Only scheduling changes: a worker's torch threads follow :func:`worker_threads`."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    if not streams_data or total - num_workers >= 1.0:
        return 1.0
    return max(0.1, (total - 1.0) / num_workers)


def show_progress_bar() -> bool:
    """A live bar on a terminal; a line every ``log_every`` steps in logs and under TQDM_DISABLE."""
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true")


class ProgressBoard:
    """Where rank 0 posts (step, total, metrics) and the driver's bar reads them: one tiny actor,
    so the bar renders in the driver's terminal instead of as forwarded worker lines."""

    def __init__(self) -> None:
        self.state: tuple[int, int, dict[str, float]] | None = None

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.state = (step, total, metrics)

    def get(self) -> tuple[int, int, dict[str, float]] | None:
        return self.state

    @classmethod
    def start(cls):
        import ray

        return ray.remote(num_cpus=0)(cls).remote()


@contextlib.contextmanager
def _progress_bar(board, stage: str):
    """Poll ``board`` into one tqdm bar (step, loss, throughput, ETA) while the block runs."""
    if board is None:
        yield
        return
    import threading

    import ray
    from tqdm import tqdm

    stop = threading.Event()

    def poll() -> None:
        bar = None
        while not stop.wait(1.0):
            try:
                state = ray.get(board.get.remote(), timeout=5)
            except Exception:
                continue
            if state is None:
                continue
            step, total, metrics = state
            if bar is None:
                bar = tqdm(total=total, initial=step, desc=f"{stage} training", unit="step",
                           dynamic_ncols=True)
            bar.total = total
            bar.update(step - bar.n)
            shown = {k.removeprefix("train_"): f"{v:.4g}" for k, v in metrics.items()
                     if isinstance(v, (int, float)) and (k.startswith(("train_loss", "val_")) or k == "lr")}
            bar.set_postfix(dict(list(shown.items())[:4]), refresh=True)
        if bar is not None:
            bar.close()

    thread = threading.Thread(target=poll, name=f"unclip-{stage}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        with contextlib.suppress(Exception):
            ray.kill(board)


def collective_timeout(ctx: StageContext) -> float:
    """``ray.collective_timeout_s``: the process group's timeout and the evaluation barrier's."""
    value = ctx.cfg.ray.get("collective_timeout_s", 1800)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"ray.collective_timeout_s must be a positive number of seconds, got {value!r}")
    return seconds


def checkpoint_name(ctx: StageContext) -> str:
    """``<stage>-<hash of the keys that define the result>``: an operational change (log or
    checkpoint cadence, threads) resumes the same training. A training interrupted before that
    rule (named by the whole subtree's hash) is resumed under its old name."""
    if not ctx.config_hash:
        raise ValueError(f"stage {ctx.name!r}: the executor passed no config hash to name its checkpoints")
    name = f"{ctx.name}-{ctx.config_hash}"
    root = checkpoint_root(ctx)
    if not storage.exists(storage.join(root, name)):
        for old in ctx.legacy_hashes:
            if storage.exists(storage.join(root, f"{ctx.name}-{old}")):
                return f"{ctx.name}-{old}"
    return name


def worker_threads(requested: int | None) -> int:
    """Intra-op threads for this Ray Train worker: ``requested``, else this machine's cores shared
    among its workers. Ray sets OMP_NUM_THREADS to the one CPU a worker reserves, which left the tiny
    decoder on one of two cores (2.1 s a step against 1.3 s with both)."""
    if requested:
        return int(requested)
    import ray.train

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, ray.train.get_context().get_local_world_size()))


def fault_injection() -> dict[str, Any] | None:
    """Tests kill one training worker at a given step: UNCLIP_FAULT_KILL_AT_STEP + _MARKER (a file
    created when it fires, so it fires once). Not a config value: it must not change the run."""
    step, marker = os.environ.get("UNCLIP_FAULT_KILL_AT_STEP"), os.environ.get("UNCLIP_FAULT_MARKER")
    return {"kill_at_step": int(step), "marker": marker} if step and marker else None


def checkpoint_root(ctx: StageContext) -> str:
    root = storage.join(ctx.cfg.run_dir, "checkpoints")
    storage.makedirs(root)
    return root


# ---- inside the training workers -------------------------------------------------------------


def prepare(model: torch.nn.Module, train: dict[str, Any]) -> torch.nn.Module:
    """The model of one Ray Train worker, on its device, as ``train.parallel`` says: ``ddp`` (Ray
    Train's ``prepare_model``: a replica per worker) or ``fsdp`` (sharded per block,
    :mod:`unclip.training.sharding`); with ``train.activation_checkpointing``, its blocks recompute
    their activations in the backward pass. Build the optimizer and the EMA
    (:func:`unclip.training.sharding.make_ema`) from what this returns."""
    import ray.train.torch

    opts = sharding.ShardingConfig(parallel=str(train.get("parallel") or "ddp"),
                                   activation_checkpointing=bool(train.get("activation_checkpointing")))
    if opts.activation_checkpointing:
        sharding.set_activation_checkpointing(model)
    if opts.parallel == "ddp":
        return ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the device mesh is built on the current device
    return sharding.shard(model.to(device), "fsdp")


@dataclass
class Worker:
    """What a stage's training parts get from the template: the placed model and its position."""

    session: WorkerSession
    model: torch.nn.Module       # as prepared: DDP, or FSDP-sharded
    device: torch.device
    generator: torch.Generator   # reseeded every step by the loop (the resume rule)
    start_step: int              # 0, or the restored checkpoint's step


@dataclass
class Steps:
    """What differs between training stages once the model is built: the batch source
    (``batches(epoch)``), the loss (``loss(model, batch) -> {"loss": ..., ...}``), the evaluation
    on rank 0 (``evaluate(model, step) -> metrics``, of the EMA when there is one) and a hook after
    each optimizer step."""

    batches: Callable[[int], Any]
    loss: Callable[[torch.nn.Module, Any], dict]
    evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None
    after_step: Callable[[torch.nn.Module], None] | None = None


def train_worker(config: dict[str, Any], build: Callable[[], torch.nn.Module], cfg,
                 steps: Callable[[Worker], Steps], *, ema: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> dict[str, float]:
    """The one Ray Train worker of every training stage: seed -> ``build()`` -> :func:`prepare`
    (DDP or FSDP, ``config["train"]``; ``config["init"]``: the weights ``<stage>.init_from`` names,
    loaded first unless a checkpoint of this training will be restored) -> AdamW (``betas``,
    ``eps``) -> EMA (unless ``ema`` is false) -> restore the latest checkpoint -> ``steps(worker)``
    -> :func:`unclip.training.loop.train`
    (AMP, LR schedule, non-finite cap, evaluation, checkpoints, progress; its resume rule).
    ``cfg`` is the stage's :class:`unclip.training.loop.LoopConfig`; returns the final metrics."""
    from unclip.devices import model_device
    from unclip.training import loop
    from unclip.training.sharding import make_ema

    t = config["train"]
    session = WorkerSession(config)
    seed = int(t["seed"])
    seed_everything(seed + session.rank)
    if (config.get("mlflow") or {}).get("tracking_uri"):
        import mlflow

        mlflow.set_tracking_uri(config["mlflow"]["tracking_uri"])  # a models:/ CLIP resolves here
    built = build()
    init = config.get("init")  # <stage>.init_from, resolved by the driver (stages.init_from)
    if init and not session.has_checkpoint():  # a resumed training continues from its own state
        from stages.init_from import load_init_weights

        load_init_weights(built, init)
        if session.is_main:
            _say(f"[unclip] starting from {init['uri']} ({init['pinned']}, {init['digest'][:19]})")
    model = prepare(built, t)
    optimizer = loop.make_optimizer(model, cfg, betas, eps)
    average = make_ema(model, cfg.ema_decay) if ema else None  # sharded like the model under FSDP
    meta = session.restore(model, optimizer, average)
    worker = Worker(session, model, model_device(model), torch.Generator(), int(meta.get("step", 0)))
    parts = steps(worker)
    return loop.train(session, model, optimizer, average, parts.batches, parts.loss, cfg, meta,
                      evaluate=parts.evaluate, fault=config.get("fault"), generator=worker.generator,
                      seed=seed, after_step=parts.after_step)


class WorkerSession:
    """Rank, resume, periodic checkpoint + metrics reporting and MLflow logging from rank 0."""

    def __init__(self, config: dict[str, Any]):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.mlflow = config.get("mlflow") or {}
        self.checkpoint_dir = config.get("checkpoint_dir")
        self.board = config.get("progress_board")  # the driver's bar, when it shows one
        # bounds the barrier the other ranks wait at while rank 0 evaluates (unclip.training.loop)
        self.collective_timeout_s = float(config.get("collective_timeout_s") or 1800)
        self._client = None
        self._t0 = time.monotonic()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def has_checkpoint(self) -> bool:
        """Whether :meth:`restore` will find a training state (registered or persisted)."""
        import ray.train

        return ray.train.get_checkpoint() is not None or latest_persisted(self.checkpoint_dir)[1] is not None

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                ema: EMA | None) -> dict[str, Any]:
        """Load the latest checkpoint if there is one; returns its meta ({} for a fresh run).
        Every rank loads it (a sharded model keeps its own shards of the full tensors).

        Ray Train hands back the last checkpoint its controller *registered*; one persisted just
        before a worker died can be missing from that list (the controller polls reports), so the
        run's checkpoint folder is scanned too and the later of the two wins."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        best_step, best_dir = latest_persisted(self.checkpoint_dir)
        if ckpt is not None:
            with ckpt.as_directory() as d:
                registered = storage.read_json(os.path.join(d, STATE_META)).get("step", -1)
                if registered >= best_step:
                    return self._loaded(load_state(d, unwrap(model), optimizer, ema))
        if best_dir is None:
            return {}
        with _local_copy(best_dir) as d:
            return self._loaded(load_state(d, unwrap(model), optimizer, ema))

    def _loaded(self, meta: dict[str, Any]) -> dict[str, Any]:
        if self.is_main:
            _say(f"[unclip] resumed from step {meta.get('step')} (epoch {meta.get('epoch')})")
        return meta

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main or not self.mlflow.get("run_id"):
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.mlflow["tracking_uri"])
        now = int(time.time() * 1000)
        try:
            self._client.log_batch(self.mlflow["run_id"], metrics=[
                Metric(k, float(v), now, step) for k, v in metrics.items()])
        except Exception as exc:  # a tracking hiccup must not kill hours of training
            _say(f"[unclip] warning: could not log metrics to MLflow at step {step}: "
                 f"{str(exc).splitlines()[0][:200]}")

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        if self.board is not None:
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.board.update.remote(step, total, numeric)
            return
        rate = step / max(1e-9, time.monotonic() - self._t0)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        _say(f"[unclip] step {step}/{total} {shown} ({rate:.2f} step/s)")

    def report(self, metrics: dict[str, float], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None, ema: EMA | None, meta: dict[str, Any],
               checkpoint: bool = True) -> None:
        """A barrier on every rank; rank 0 attaches the training state as a checkpoint (full
        tensors: a sharded model's are gathered first, every rank taking part)."""
        import ray.train
        from ray.train import Checkpoint

        if checkpoint and (self.is_main or sharding.is_sharded(model)):
            tensors, opt_meta = state_tensors(unwrap(model), optimizer, ema)
            if self.is_main:
                with tempfile.TemporaryDirectory() as d:
                    write_state(d, tensors, opt_meta, {**meta, "metrics": metrics})
                    del tensors
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
                return
            del tensors
        ray.train.report(metrics)


def latest_persisted(folder: str | None) -> tuple[int, str | None]:
    """(step, folder) of the furthest complete training state under a Ray Train run folder."""
    if not folder or not storage.exists(folder):
        return -1, None
    fs, path = storage.get_fs(folder)
    best: tuple[int, str | None] = (-1, None)
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_"):
            continue
        sub = storage.join(folder, name)
        try:  # a folder whose upload was cut short has no (or an unreadable) meta: skip it
            if not storage.exists(storage.join(sub, STATE_WEIGHTS)):
                continue
            step = int(storage.read_json(storage.join(sub, STATE_META)).get("step", -1))
        except (OSError, ValueError):
            continue
        if step > best[0]:
            best = (step, sub)
    return best


@contextlib.contextmanager
def _local_copy(folder: str):
    if not storage.is_remote(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory() as d:
        fs, path = storage.get_fs(folder)
        for name in (STATE_WEIGHTS, STATE_META):
            fs.get(f"{path.rstrip('/')}/{name}", os.path.join(d, name))
        yield d


def _say(line: str) -> None:
    """Straight to stdout: Ray Train's patched ``print`` would echo every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def load_result_state(result, model: torch.nn.Module, ema: EMA | None = None) -> dict[str, Any]:
    """Load the final checkpoint of a finished Ray Train run into ``model`` (and ``ema``)."""
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        return load_state(d, model, None, ema)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
