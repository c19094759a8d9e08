"""The speed-up: the CLIP stage with and without its decoded-image cache, end to end.

The tiny pipeline's slowest stage was CLIP training (818 s of a 30-minute budget in a tiny run on
this machine) while its model work is small (a 32 px ViT): every epoch, and the sample count
before training, decoded and resized every 512 px PNG again (~6.7 ms of CPU per image here,
9 passes for 8 epochs). ``stages/clip.py`` now materializes the decoded, resized images once in
Ray's object store when they fit ``clip.train.cache_decoded_max_mb`` (tiny: 12 MB).

This runs the real pipeline CLI on a fresh run directory (data -> filter -> clip, tiny preset at
512 px with fewer samples and epochs), then the clip stage again with the cache off
(``clip.train.cache_decoded_max_mb=0``), and reports both stage durations from the manifests.

    .venv/bin/python -m bench.clip_stage [--quick] [--samples 1000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import common

ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pipelines {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def _manifest(run_dir: str, stage: str) -> dict[str, Any]:
    return json.loads(Path(run_dir, stage, "manifest.json").read_text())


def run(quick: bool = False, threads: int = 1, out: str | None = None, samples: int | None = None,
        epochs: int | None = None, num_cpus: int = 2) -> dict[str, Any]:
    samples = samples or (300 if quick else 1000)
    epochs = epochs or (2 if quick else 8)   # full: the tiny preset's 8 epochs
    rows = []
    with tempfile.TemporaryDirectory(prefix="unclip-bench-clip-") as tmp:
        common_args = ["preset=tiny", f"run_dir={tmp}", f"data.num_samples={samples}",
                       f"data.samples_per_shard={max(50, samples // 4)}", f"clip.train.epochs={epochs}",
                       f"ray.num_cpus={num_cpus}"]
        _cli(["run", "--until", "clip", *common_args])
        after = _manifest(tmp, "clip")
        _cli(["stage", "clip", "--force", *common_args, "clip.train.cache_decoded_max_mb=0"])
        before = _manifest(tmp, "clip")
        for label, m in (("before: decode every epoch", before), ("after: decoded once, cached", after)):
            rows.append({"clip stage": label, "samples": samples, "epochs": epochs,
                         "seconds": m["duration_s"],
                         "val_recall_at_5": m["metrics"].get("val_recall_at_5"),
                         "resolution": 512})
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    common.print_table(rows, ["clip stage", "samples", "epochs", "seconds", "speedup", "val_recall_at_5"],
                       f"CLIP stage before/after the decoded-image cache (tiny preset, 512 px shards, "
                       f"local Ray {num_cpus} CPUs; wall seconds incl. Ray Train start-up)")
    result = {"name": "clip_stage", "machine": common.machine(threads), "rows": rows}
    path = common.write_result("clip_stage", result, out)
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    common.add_common_args(p)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    a = p.parse_args(argv)
    run(a.quick, a.threads, a.out, a.samples, a.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
