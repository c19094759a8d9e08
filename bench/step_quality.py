"""Quality per sampling step count, for every stage of a finished run: the curve a preset's step
counts should come from.

On a run directory (each finished stage's model, from its manifest, and the run's held-out
split; stages still missing can be left out with ``--stages``), each stage is sampled at every step count of ``--steps`` and at the step count it was
trained to sample with ("configured"), with DDIM and DPM-Solver++ (and the configured sampler):

* prior (diffusion): mean cosine of sampled z_i to the true z_i of held-out captions, beside the
  caption's own z_t (the trivial baseline);
* decoder: held-out images' true z_i decoded; CLIP cosine of the decodes to that z_i, and the shapes
  detector's colour / shape / position accuracies where the data has a ground truth;
* upsamplers: held-out images degraded as in training and upsampled; PSNR / SSIM against the
  original, beside bicubic.

Scores only (no timing): the same on a loaded machine. Every sample is seeded, so two step counts
differ by the sampler alone.

    .venv/bin/python -m bench.step_quality --run-dir runs/tiny [--steps 5,10,25,50]
        [--samplers ddim,dpm] [--captions 64] [--images 16] [--up-images 4] [--stages prior,decoder]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from bench import common

STAGES = ("prior", "decoder", "upsample1", "upsample2")


def _settings(steps: list[int], samplers: list[str], configured: tuple[str, int]) -> list[tuple[str, int, bool]]:
    """(sampler, steps, is the configured setting) for the grid plus the configured one."""
    grid = [(s, n, (s, n) == configured) for s in samplers for n in steps]
    if configured not in {(s, n) for s, n, _ in grid}:
        grid.append((*configured, True))
    return grid


def _manifest(run_dir: str, stage: str):
    from pipelines.manifest import read_manifest

    m = read_manifest(run_dir, stage)
    if m is None:
        raise SystemExit(f"{run_dir}: stage {stage} has no manifest (run the pipeline first)")
    return m


def prior_rows(run_dir: str, clip: Any, prior: Any, trained: dict[str, Any], steps: list[int],
               samplers: list[str], n: int, seed: int) -> list[dict]:
    from stages.prior_data import read_holdout, read_split, train_statistics
    from unclip.embeddings import io as eio
    from unclip.eval.prior_eval import validate
    from unclip.models.captions import CaptionEncoder

    cfg = _manifest(run_dir, "prior").config["prior"]
    if cfg["kind"] != "diffusion":
        return [{"stage": "prior", "note": f"{cfg['kind']} prior: sampled token by token, no step count"}]
    frac = float(cfg["holdout_fraction"])
    files = eio.list_files(_manifest(run_dir, "embed").outputs["embeddings"])
    holdout = read_holdout(files, frac, n)
    holdout["mean_train_image"] = train_statistics(
        read_split({"uri": np.array([u])}, "train", frac) for u in files)["mean"]
    encoder = CaptionEncoder(clip, clip.device)
    rows = []
    for sampler, k, configured in _settings(steps, samplers, (trained["sampler"], int(trained["steps"]))):
        t0 = time.perf_counter()
        m = validate(prior, "diffusion", {**trained, "sampler": sampler, "steps": k}, encoder,
                     holdout, seed)
        rows.append({"stage": "prior", "sampler": sampler, "steps": k, "configured": configured,
                     "cosine": m["val_cosine"], "baseline_text": m["val_baseline_text"],
                     "baseline_mean": m["val_baseline_mean"], "n": len(holdout["captions"]),
                     "seconds": time.perf_counter() - t0})
    return rows


def decoder_rows(run_dir: str, clip: Any, decoder: Any, trained: dict[str, Any], steps: list[int],
                 samplers: list[str], n: int, seed: int) -> list[dict]:
    from stages.decoder import _holdout
    from unclip.data.shards import list_shards
    from unclip.eval.decoder_eval import DecoderEvaluator

    cfg = _manifest(run_dir, "decoder").config["decoder"]
    shards = list_shards(_manifest(run_dir, "filter").outputs["shards"])
    holdout = _holdout(shards, _manifest(run_dir, "embed").outputs["embeddings"], decoder.resolution,
                       float(cfg["holdout_fraction"]), n)
    eval_cfg = {**cfg["eval"], "seed": seed}
    rows = []
    for sampler, k, configured in _settings(steps, samplers, (trained["sampler"], int(trained["steps"]))):
        t0 = time.perf_counter()
        ev = DecoderEvaluator(holdout, clip, {**trained, "sampler": sampler, "steps": k},
                              eval_cfg, bool(cfg["use_caption"]))
        scores = ev.scores(ev.decode(decoder, len(holdout["captions"])))
        rows.append({"stage": "decoder", "sampler": sampler, "steps": k, "configured": configured,
                     "guidance": float(trained["guidance_scale"]), **scores,
                     "n": len(holdout["captions"]), "seconds": time.perf_counter() - t0})
    return rows


def upsampler_rows(run_dir: str, stage: str, up: Any, steps: list[int], samplers: list[str], n: int,
                   seed: int) -> list[dict]:
    from stages.upsample import _holdout
    from unclip.data.shards import list_shards
    from unclip.eval.upsampling import validate

    cfg = _manifest(run_dir, stage).config[stage]
    shards = list_shards(_manifest(run_dir, "filter").outputs["shards"])
    images = _holdout(shards, int(cfg["high_res"]), float(cfg["holdout_fraction"]), n)
    configured = (str(up.config["sampler"]), int(up.config["steps"]))
    rows = []
    for sampler, k, is_cfg in _settings(steps, samplers, configured):
        t0 = time.perf_counter()
        m, _ = validate(up, images, str(cfg["kind"]), cfg.get("degradation"), seed, k, sampler)
        rows.append({"stage": stage, "sampler": sampler, "steps": k, "configured": is_cfg,
                     **{key: m[key] for key in ("val_psnr", "val_psnr_bicubic", "val_ssim",
                                                "val_ssim_bicubic", "val_psnr_sharp",
                                                "val_psnr_sharp_bicubic")},
                     "n": len(images), "seconds": time.perf_counter() - t0})
    return rows


class Models:
    """The run's CLIP and each finished stage's model, from the stage manifests' checkpoint folders
    (the ones each stage registered): a run whose later stages are still training is measured too.
    CLIP is loaded when first needed, so the upsamplers of a run without a clip stage are scored."""

    def __init__(self, run_dir: str, device: str = "cpu"):
        self.run_dir, self.device = run_dir, torch.device(device)
        self._clip: Any = None

    @property
    def clip(self) -> Any:
        if self._clip is None:
            from unclip.models.clip import load_clip

            self._clip = load_clip(_manifest(self.run_dir, "clip").outputs["model"])
            self._clip.model.to(self.device)
        return self._clip

    def folder(self, stage: str) -> str:
        out = _manifest(self.run_dir, stage).outputs
        return out.get("model") or out[stage]  # the prior names its output "prior"

    def load(self, stage: str) -> tuple[Any, dict[str, Any]]:
        """(model, the sampling settings its stage validated with: "as trained")."""
        from unclip.generation.cascade import trained_sampling
        from unclip.generation.models import load_stage

        folder = self.folder(stage)
        kind = "upsampler" if stage.startswith("upsample") else stage
        model = load_stage(folder, kind).to(self.device).eval()
        return model, (trained_sampling(folder, stage) if kind != "upsampler" else {})


def run(run_dir: str, steps: list[int], samplers: list[str], stages: list[str], captions: int,
        images: int, up_images: int, seed: int = 0) -> dict[str, Any]:
    models = Models(run_dir)
    rows: list[dict] = []
    with torch.no_grad():
        for stage in stages:
            model, trained = models.load(stage)
            if stage == "prior":
                rows += prior_rows(run_dir, models.clip, model, trained, steps, samplers, captions, seed)
            elif stage == "decoder":
                rows += decoder_rows(run_dir, models.clip, model, trained, steps, samplers, images, seed)
            else:
                rows += upsampler_rows(run_dir, stage, model, steps, samplers, up_images, seed)
    return {"run_dir": run_dir, "steps": steps, "samplers": samplers, "rows": rows,
            "machine": common.machine()}


METRICS = {"prior": [("cosine", "cosine to true z_i"), ("baseline_text", "z_t")],
           "decoder": [("val_clip_cosine", "CLIP cosine"), ("val_clip_cosine_mismatched", "mismatched"),
                       ("val_color", "colour"), ("val_shape", "shape"), ("val_position", "position")],
           "upsample1": [("val_psnr", "PSNR dB"), ("val_psnr_bicubic", "bicubic"), ("val_ssim", "SSIM")],
           "upsample2": [("val_psnr", "PSNR dB"), ("val_psnr_bicubic", "bicubic"), ("val_ssim", "SSIM")]}


def print_table(result: dict[str, Any]) -> None:
    for stage in STAGES:
        rows = [r for r in result["rows"] if r["stage"] == stage]
        if not rows:
            continue
        if "note" in rows[0]:
            print(f"\n{stage}: {rows[0]['note']}")
            continue
        cols = [(k, label) for k, label in METRICS[stage] if k in rows[0]]
        print(f"\n{stage} ({rows[0]['n']} held-out)")
        print(f"{'sampler':<8}{'steps':>6}  " + "".join(f"{label:>20}" for _, label in cols) + f"{'seconds':>10}")
        for r in rows:
            mark = " *" if r["configured"] else "  "
            print(f"{r['sampler']:<8}{r['steps']:>6}{mark}" + "".join(f"{r[k]:>20.4f}" for k, _ in cols)
                  + f"{r['seconds']:>10.1f}")
    print("\n* = the setting the stage was trained to sample with (recorded in its checkpoint)")


DEFAULTS = {"steps": [5, 10, 25, 50], "samplers": ["ddim", "dpm"], "captions": 64, "images": 16,
            "up_images": 4}
QUICK = {"steps": [5, 10], "samplers": ["ddim", "dpm"], "captions": 16, "images": 4,
         "up_images": 2}  # python -m bench --quick


def run_on(run_dir: str, quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """``python -m bench --run-dir RUN``: every stage of the run that has finished (the others
    are named in the result), at the defaults or, with ``--quick``, a short pass."""
    from pipelines.manifest import read_manifest

    common.set_threads(threads)
    stages = [s for s in STAGES if read_manifest(run_dir, s) is not None]
    if not stages:
        raise SystemExit(f"{run_dir}: none of {', '.join(STAGES)} has finished")
    result = run(run_dir, stages=stages, **(QUICK if quick else DEFAULTS))
    result["not_finished"] = [s for s in STAGES if s not in stages]
    print_table(result)
    common.write_result("step_quality", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    p.add_argument("--run-dir", required=True, metavar="RUN", help="a run directory whose stages are done")
    d = DEFAULTS
    p.add_argument("--steps", default=",".join(map(str, d["steps"])),
                   help="step counts (the configured one is added; default %(default)s)")
    p.add_argument("--samplers", default=",".join(d["samplers"]),
                   help="ddim, dpm (DPM-Solver++), ddpm (default %(default)s)")
    p.add_argument("--stages", default=",".join(STAGES), help="default %(default)s")
    p.add_argument("--captions", type=int, default=d["captions"],
                   help="held-out captions scored for the prior (default %(default)s)")
    p.add_argument("--images", type=int, default=d["images"],
                   help="held-out images decoded per setting (default %(default)s)")
    p.add_argument("--up-images", type=int, default=d["up_images"],
                   help="held-out images upsampled per setting (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/step_quality.json)")
    a = p.parse_args(argv)
    stages = [s for s in a.stages.split(",") if s]
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    result = run(a.run_dir, [int(s) for s in a.steps.split(",")], a.samplers.split(","), stages,
                 a.captions, a.images, a.up_images, a.seed)
    print_table(result)
    common.write_result("step_quality", result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
