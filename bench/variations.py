"""Variations by DDIM eta: how close the paper's variations stay to their input, and how much they
differ from one another, on a run's registered decoder and CLIP.

For each held-out image of the run: its CLIP embedding z_i and DDIM-inverted x_T are decoded
``--num`` times at each eta (no upsampling). Reported per eta: PSNR of the variations against the
input image (at the decoder's resolution) and their diversity (mean RMS distance of each
variation from the variations' mean, in [0, 255] pixel units). At eta 0 every variation is the
same deterministic reconstruction; both the distance to the input and the diversity grow with eta.

    .venv/bin/python -m bench.variations --run-dir runs/tiny [--images 8] [--num 4]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import common


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def held_out_images(run_dir: str, n: int, side: int) -> list:
    from PIL import Image

    from unclip.data.loading import iter_decoded
    from unclip.data.shards import list_shards

    out = []
    for shard in list_shards(f"{run_dir}/filter/shards"):
        for row in iter_decoded(shard, side, "holdout", 0.1):
            out.append(Image.fromarray(row["image"]))
            if len(out) >= n:
                return out
    return out


def run(run_dir: str, images: int, num: int, etas: list[float], steps: int | None) -> dict:
    import mlflow

    from unclip.generation import ModelRefs, UnCLIP
    from unclip.generation.cascade import Settings

    mlflow.set_tracking_uri(f"sqlite:///{run_dir}/mlflow.db")
    model = UnCLIP(ModelRefs.registered("champion"))
    side = model.resolution
    inputs = held_out_images(run_dir, images, side)
    rows = []
    for eta in etas:
        s = Settings(decoder_eta=eta, upsample=False, decoder_steps=steps)
        ps, div = [], []
        for i, img in enumerate(inputs):
            out = np.stack([np.asarray(v, np.float64) for v in model.vary(img, num, seed=i, settings=s)[0]])
            ref = np.asarray(img.convert("RGB"), np.float64)
            ps.extend(psnr(v, ref) for v in out)
            div.append(float(np.sqrt(((out - out.mean(0)) ** 2).mean(axis=(1, 2, 3))).mean()))
        rows.append({"eta": eta, "psnr_to_input_db": float(np.mean(ps)), "diversity_rms": float(np.mean(div)),
                     "images": len(inputs), "variations": num})
    return {"run_dir": run_dir, "decoder_steps": model.resolve(Settings(decoder_steps=steps)).decoder_steps,
            "resolution": side, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    p.add_argument("--run-dir", required=True)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: as trained)")
    p.add_argument("--etas", default="0,0.25,0.5,1.0")
    a = p.parse_args(argv)
    result = run(a.run_dir, a.images, a.num, [float(e) for e in a.etas.split(",")], a.steps)
    print(f"variations of {result['rows'][0]['images']} held-out images, {a.num} each, "
          f"{result['resolution']} px, DDIM {result['decoder_steps']} steps ({a.run_dir})")
    print(f"{'eta':>6}{'PSNR to input (dB)':>20}{'diversity (RMS)':>18}")
    for r in result["rows"]:
        print(f"{r['eta']:>6.2f}{r['psnr_to_input_db']:>20.2f}{r['diversity_rms']:>18.2f}")
    common.write_result("variations", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
