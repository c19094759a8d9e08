"""Batch generation of a prompt file as a Ray Data job: one PNG per (prompt, seed), plus a Parquet
index (prompt, seed, path, size). A pool of actors each holds the whole cascade once."""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unclip import storage
from unclip.generation.cascade import Settings
from unclip.generation.images import check_prompt
from unclip.generation.models import ModelRefs


def read_prompt_file(uri: str) -> list[str]:
    """One prompt per line (blank lines and lines starting with # skipped)."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such prompt file") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{uri}: no prompts in the file")
    return prompts


class CascadeActor:
    """Holds the models; renders rows {index, prompt, seed} to PNG files under ``out``."""

    def __init__(self, refs: dict[str, Any], settings: dict[str, Any], out: str,
                 tracking_uri: str | None, resolution: str):
        import mlflow
        import torch

        from unclip.generation.cascade import UnCLIP

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.model = UnCLIP(ModelRefs(**refs))
        self.settings = Settings(**settings)
        self.out = out
        self.resolution = resolution  # "final" or "base"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[str, list] = {"index": [], "prompt": [], "seed": [], "path": [], "size": []}
        for index, prompt, seed in zip(batch["index"], batch["prompt"], batch["seed"]):
            stages = self.model.generate(str(prompt), 1, int(seed), self.settings)
            image = stages[-1][0] if self.resolution == "final" else stages[0][0]
            path = storage.join(self.out, f"{int(index):06d}_seed{int(seed)}.png")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            storage.write_bytes(path, buf.getvalue())
            for k, v in (("index", int(index)), ("prompt", str(prompt)), ("seed", int(seed)),
                         ("path", path), ("size", image.size[0])):
                rows[k].append(v)
        return rows


def generate_batch(prompts: Sequence[str], seeds: Sequence[int], refs: ModelRefs, out: str,
                   settings: Settings | None = None, num_actors: int = 1,
                   tracking_uri: str | None = None, resolution: str = "final") -> pa.Table:
    """Render every (prompt, seed) on a Ray Data actor pool; returns and writes ``index.parquet``."""
    import ray

    prompts = [check_prompt(p) for p in prompts]
    rows = [{"index": i * len(seeds) + j, "prompt": p, "seed": int(s)}
            for i, p in enumerate(prompts) for j, s in enumerate(seeds)]
    storage.makedirs(out)
    # each actor a share of the cluster's GPUs when it has any (Ray hides the GPUs from an actor
    # that asks for none, which left the cascade on the CPU of a GPU machine)
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    gpus_per_actor = min(1.0, gpus / max(1, num_actors)) if gpus else 0.0
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * num_actors)))
    done = ds.map_batches(
        CascadeActor, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs={"refs": asdict(refs), "settings": asdict(settings or Settings()),
                               "out": out, "tracking_uri": tracking_uri, "resolution": resolution},
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=1,
        **({"num_gpus": gpus_per_actor} if gpus_per_actor else {})).take_all()
    done.sort(key=lambda r: r["index"])
    table = pa.Table.from_pylist([{k: r[k] for k in ("index", "prompt", "seed", "path", "size")}
                                  for r in done])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(out, "index.parquet"), buf.getvalue())
    return table
