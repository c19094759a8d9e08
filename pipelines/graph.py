"""The stage graph: what each stage reads, which config it depends on, where its code lives."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]
    # Config subtrees whose (resolved) values define the stage's result; a change re-runs it.
    config_keys: tuple[str, ...]
    # "module:function" taking a StageContext and returning a StageResult.
    entry: str
    description: str = ""
    # Optional "module:function" (cfg -> JSON-able) identifying inputs no stage produced, such as
    # an external shard folder; a change in it makes the stage stale.
    fingerprint: str | None = None
    # Keys under the stage's config (dotted, relative to its subtree) that cannot change its
    # result: logging, checkpoint and evaluation cadence, threads, batch sizes of pure inference,
    # caches. They stay out of the config hash and the checkpoint name, so changing one neither
    # re-runs a finished stage nor restarts an interrupted training from step 0.
    operational: tuple[str, ...] = ()
    # What the stage returns (StageResult.outputs must hold exactly these), and the upstream
    # outputs it reads as "stage.output": the graph refuses a read no upstream declares.
    outputs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()

    def result_config(self, cfg) -> dict:
        """The part of ``cfg`` that defines this stage's result (``config_keys`` less
        ``operational``, and less the keys the schema added while they hold their default), resolved."""
        from pipelines.schema.derive import without_added_defaults

        out = {k: without_added_defaults(cfg[k]) for k in self.config_keys}
        for dotted in self.operational:  # relative to the first (the stage's own) subtree
            node = out[self.config_keys[0]]
            parts = dotted.split(".")
            for part in parts[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(parts[-1], None)
        return out

    def load(self) -> Callable:
        return _resolve(self.entry)

    def external_fingerprint(self, cfg) -> object:
        return _resolve(self.fingerprint)(cfg) if self.fingerprint else None


def _resolve(ref: str) -> Callable:
    module, func = ref.split(":")
    return getattr(importlib.import_module(module), func)


# cadence, and how the model is spread over the workers (the same maths under DDP and FSDP, with or
# without activations recomputed): a change resumes the same training
_TRAINING = ("train.log_every", "train.checkpoint_every", "train.parallel",
             "train.activation_checkpointing")

STAGES: tuple[StageSpec, ...] = (
    StageSpec("data", (), ("data",), "stages.data:run",
              "synthetic shapes, an image folder import, or existing shards",
              fingerprint="stages.data:fingerprint", outputs=("shards",)),
    StageSpec("filter", ("data",), ("filter",), "stages.filter:run",
              "drop bad samples by reason; RGB-convert the rest",
              outputs=("shards", "drop_counts", "dropped"), reads=("data.shards",)),
    StageSpec("clip", ("filter",), ("clip",), "stages.clip:run",
              "a configured CLIP, or one trained here with open_clip (Ray Train)",
              operational=("train.log_every", "train.cache_decoded_max_mb"),
              outputs=("model", "registered"), reads=("filter.shards",)),
    StageSpec("embed", ("filter", "clip"), ("embed",), "stages.embed:run",
              "CLIP image + text embeddings to Parquet (Ray Data actor pool)",
              operational=("batch_size", "num_actors"),
              outputs=("embeddings",), reads=("filter.shards", "clip.model")),
    StageSpec("pca", ("embed",), ("pca",), "stages.pca:run",
              "out-of-core PCA of the image embeddings + AR-prior bucket edges (Ray Data passes)",
              operational=("batch_size",), outputs=("pca", "registered"), reads=("embed.embeddings",)),
    StageSpec("prior", ("embed", "pca", "clip"), ("prior",), "stages.prior:run",
              "diffusion or autoregressive prior P(z_i | caption) (Ray Train), held-out cosine",
              operational=(*_TRAINING, "train.eval_every", "cache_text_encodings"),
              outputs=("prior", "registered"), reads=("embed.embeddings", "pca.pca", "clip.model")),
    StageSpec("upsample1", ("filter",), ("upsample1",), "stages.upsample:run",
              "x4 diffusion upsampler on Gaussian-blurred inputs (conv-only UNet, Ray Train)",
              operational=(*_TRAINING, "train.eval_every", "validation.grid_rows"),
              outputs=("model", "registered", "samples"), reads=("filter.shards",)),
    StageSpec("upsample2", ("filter",), ("upsample2",), "stages.upsample:run",
              "x4 diffusion upsampler on BSR-degraded inputs (conv-only UNet, Ray Train)",
              operational=(*_TRAINING, "train.eval_every", "validation.grid_rows"),
              outputs=("model", "registered", "samples"), reads=("filter.shards",)),
    StageSpec("decoder", ("filter", "embed", "clip"), ("decoder",), "stages.decoder:run",
              "GLIDE-style diffusion decoder P(x | z_i, caption) (Ray Train), detector-scored decodes",
              operational=(*_TRAINING, "train.torch_threads", "eval.grid_every", "eval.grid_images"),
              outputs=("model", "registered", "grids"),
              reads=("filter.shards", "embed.embeddings", "clip.model")),
    StageSpec("evaluate", ("filter", "clip", "prior", "decoder", "upsample1", "upsample2"),
              ("evaluate",), "stages.evaluate:run",
              "the whole cascade on held-out captions: CLIP score, FD, grid.png (+ detector on shapes data)",
              operational=("num_actors",), outputs=("samples", "grid", "grid_prompts", "index", "registered"),
              reads=("filter.shards", "clip.model", "prior.prior", "decoder.model", "upsample1.model",
                     "upsample2.model", "clip.registered", "prior.registered",
                     "decoder.registered", "upsample1.registered", "upsample2.registered")),
)


class Graph:
    """A topologically ordered set of stages (declaration order must already be topological)."""

    def __init__(self, stages: tuple[StageSpec, ...] = STAGES):
        names: set[str] = set()
        by_name: dict[str, StageSpec] = {}
        for s in stages:
            missing = [i for i in s.inputs if i not in names]
            if missing:
                raise ValueError(f"stage {s.name!r} reads {missing} which are not declared before it")
            for read in s.reads:
                up, _, output = read.partition(".")
                if up not in s.inputs:
                    raise ValueError(f"stage {s.name!r} reads {read}, but {up!r} is not one of its "
                                     f"inputs {list(s.inputs)}")
                if output not in by_name[up].outputs:
                    raise ValueError(f"stage {s.name!r} reads {read}, but {up!r} declares only the "
                                     f"outputs {list(by_name[up].outputs)}")
            names.add(s.name)
            by_name[s.name] = s
        self.stages = stages
        self.by_name = {s.name: s for s in stages}

    def __getitem__(self, name: str) -> StageSpec:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(self.by_name)}") from None

    def downstream(self, name: str) -> list[str]:
        """``name`` and every stage that depends on it, in order."""
        out = {name}
        for s in self.stages:
            if any(i in out for i in s.inputs):
                out.add(s.name)
        return [s.name for s in self.stages if s.name in out]

    def upstream(self, name: str) -> list[str]:
        """Every stage ``name`` depends on (transitively), in order, without ``name`` itself."""
        need = set(self[name].inputs)
        for s in reversed(self.stages):
            if s.name in need:
                need.update(s.inputs)
        return [s.name for s in self.stages if s.name in need]
