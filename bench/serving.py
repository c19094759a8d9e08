"""Load on ``unclip serve``: requests/s and p50 / p95 latency at 1, 4 and 16 concurrent clients.

The cascade is tiny random models (CLIP 16-d, prior, an 8 px decoder, two x4 upsamplers to
128 px; each stage's sampling as trained, 2 steps) registered in a store of the benchmark's own,
served by the Ray Serve app on loopback with one replica (a GPU where there is one), batching
concurrent ``/generate`` requests. Each client sends its requests one after another (distinct
prompts and seeds); latency is a request's wall time at the client. The figures are the
service's overhead and batching at a load where the models cost little: what a client sees on
these 2 shared cores, not the models' own speed (bench.sampling has that).

    .venv/bin/python -m bench.serving [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench import common

CLIENTS = (1, 4, 16)


TINY_SAMPLING = {"prior": {"sampler": "ddim", "steps": 2, "guidance_scale": 2.0, "num_candidates": 1},
                 "decoder": {"sampler": "ddim", "steps": 2, "guidance_scale": 2.0}}


def build_tiny_models(root: Path | str, upsamplers: int = 2, sampling: bool = True) -> dict[str, str]:
    """Random tiny clip, prior, decoder and ``upsamplers`` upsamplers as checkpoint folders (8 px
    base), the same weights on every call; ``sampling``: prior and decoder record
    :data:`TINY_SAMPLING` as the settings they were "trained" with. Tests build theirs here too."""
    from unclip.diffusion import DiffusionConfig
    from unclip.models.clip import ClipEncoder, create_custom
    from unclip.models.decoder import Decoder, DecoderConfig
    from unclip.models.prior import DiffusionPrior, PriorConfig
    from unclip.models.upsampler import Upsampler

    clip_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16,
                                                "layers": 1, "head_width": 8},
                "text_cfg": {"context_length": 16, "width": 16, "heads": 2, "layers": 1}}
    ups = [f"upsampler{i + 1}" for i in range(upsamplers)]
    extra = (lambda stage: {"sampling": TINY_SAMPLING[stage]}) if sampling else (lambda stage: None)
    torch.manual_seed(0)
    folders = {k: str(Path(root) / k) for k in ("clip", "prior", "decoder", *ups)}
    ClipEncoder(create_custom(clip_cfg), {"arch": "custom"}, clip_cfg).save(folders["clip"])
    DiffusionPrior(PriorConfig(dim=16, text_width=16, max_text_len=16, width=32, layers=1, heads=2,
                               diffusion={"num_train_timesteps": 100})).save(
        folders["prior"], extra=extra("prior"))
    Decoder(DecoderConfig(resolution=8, clip_dim=16, text_width=16, base_channels=16, channel_mult=(1, 2),
                          attention_resolutions=(4,), head_channels=16, context_dim=32, norm_groups=8),
            DiffusionConfig(num_train_timesteps=100, learn_variance=True)).save(
        folders["decoder"], extra=extra("decoder"))
    for name in ups:
        Upsampler({"channels": [8, 8], "norm_num_groups": 4, "steps": 2,
                   "diffusion": {"num_train_timesteps": 100}}).save(folders[name])
    return folders


def register_tiny(root: Path) -> str:
    """Register the tiny models as the pipeline does (stage names, prior and decoder with their
    CLIP, the cascade `unclip` by version) in a sqlite store under ``root``; its tracking URI."""
    import mlflow

    from unclip.generation.models import CASCADE_NAME, DEFAULT_NAMES
    from unclip.registry import register_cascade, register_checkpoint

    folders = build_tiny_models(root / "models")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving-test")
    registered = {}
    with mlflow.start_run():
        for stage, folder in folders.items():
            clip = folders["clip"] if stage in ("prior", "decoder") else None
            version, alias = register_checkpoint(folder, DEFAULT_NAMES[stage], 1.0, clip=clip)
            assert alias == "champion"
            registered[stage] = f"models:/{DEFAULT_NAMES[stage]}@champion"
        version, alias = register_cascade(registered, CASCADE_NAME, 0.25)
    assert (version, alias) == ("1", "champion")
    return uri


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def load(url: str, clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` /generate requests in turn."""

    def client(c: int) -> list[tuple[float, int]]:
        out = []
        for i in range(per_client):
            t0 = time.perf_counter()
            answer = _post(f"{url}/generate", {"prompt": f"a red circle {c}-{i}", "seed": c * 1000 + i})
            out.append((time.perf_counter() - t0, int(answer["batch"])))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(d for d, _ in done)
    p95 = lat[min(len(lat) - 1, max(0, int(round(0.95 * len(lat))) - 1))]
    return {"clients": clients, "requests": len(done), "seconds": round(wall, 3),
            "req_per_s": len(done) / wall, "p50_s": statistics.median(lat), "p95_s": p95,
            "mean_batch": statistics.mean(b for _, b in done)}


def run(quick: bool = False, threads: int = 1) -> dict[str, Any]:
    import mlflow
    from ray import serve

    from unclip.generation import ModelRefs
    from unclip.serving.app import build_app, start

    common.set_threads(threads)
    per_client = 2 if quick else 6
    rows = []
    before = mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["UNCLIP_CACHE_DIR"] = str(Path(tmp) / "cache")
        uri = register_tiny(Path(tmp))
        with common.local_ray(num_cpus=2):
            port = _free_port()
            start(build_app(ModelRefs.registered("champion"), uri, max_batch_size=16, batch_wait_s=0.02),
                  "127.0.0.1", port)
            url = f"http://127.0.0.1:{port}"
            try:
                _post(f"{url}/generate", {"prompt": "warm up"})
                for clients in CLIENTS:
                    row = load(url, clients, per_client)
                    rows.append(row)
                    print(f"{clients:>3} client(s): {row['req_per_s']:.2f} req/s, p50 {row['p50_s']:.3f} s, "
                          f"p95 {row['p95_s']:.3f} s, mean batch {row['mean_batch']:.1f}", flush=True)
            finally:
                serve.shutdown()
        os.environ.pop("UNCLIP_CACHE_DIR", None)
    mlflow.set_tracking_uri(before)
    result = {"machine": common.machine(threads), "quick": quick, "per_client": per_client,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "rows": rows}
    common.write_result("serving", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    run(a.quick, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
