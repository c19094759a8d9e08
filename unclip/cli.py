"""unclip: generate and manipulate images with the models a pipeline run registered.

Models come from MLflow as ``models:/NAME@ALIAS`` (alias ``champion`` unless ``--alias`` says
otherwise), from the same store ``make pipeline`` wrote to, and are cached on local disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

EPILOG = """examples:
  unclip generate "a red circle" --num-images 4 --seed 1
  unclip generate "a small blue square to the left of a green triangle" --all-resolutions
  unclip vary photo.png --num-images 4 --eta 0.8
  unclip interpolate a.png b.png --frames 6 --noise interpolated
  unclip edit a.png --from "a red circle" --to "a blue circle"
  unclip pca-reconstruct a.png --dims 1,2,4,8,16
  unclip batch prompts.txt --seeds 0,1,2 --num-actors 2 --out grid/
  unclip import-diffusers /models/karlo-v1-alpha --image-encoder /models/karlo-v1-alpha-image-variations --alias karlo
  unclip export-diffusers exported/karlo --alias karlo

models: --alias candidate uses the latest candidates; --prior/--decoder/... take any
models:/NAME@ALIAS, models:/NAME/VERSION or checkpoint folder. The store is MLFLOW_TRACKING_URI,
else the sqlite store of --run-dir (runs/tiny, the default of `make pipeline`).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unclip", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output and models")
    g.add_argument("--out", default="unclip-out", help="folder for the PNGs (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--alias", default="champion", help="registry alias of every model (default: %(default)s)")
    g.add_argument("--run-dir", default="runs/tiny",
                   help="run directory whose MLflow store holds the models (default: %(default)s)")
    for name in ("clip", "prior", "decoder", "upsampler1", "upsampler2", "pca"):
        g.add_argument(f"--{name}", metavar="URI", help=f"{name} model (default: models:/unclip-{name}@ALIAS)")
    g.add_argument("--no-upsample", action="store_true", help="stop at the decoder's resolution")
    g.add_argument("--all-resolutions", action="store_true", help="also write the intermediate resolutions")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s = common.add_argument_group(
        "sampling", "every default is 'as trained': the settings the prior's and the decoder's stages "
                    "validated with, recorded in their checkpoints")
    s.add_argument("--prior-guidance", type=float, default=None, help="prior guidance scale")
    s.add_argument("--decoder-guidance", type=float, default=None,
                   help="decoder guidance scale (1 for vary, edit and --noise interpolated, which "
                        "decode DDIM-inverted noise: 3 edits harder but keeps less of the input)")
    s.add_argument("--prior-steps", type=int, default=None, help="prior sampling steps")
    s.add_argument("--prior-candidates", type=int, default=None,
                   help="prior samples per image, the one closest to the caption kept")
    s.add_argument("--decoder-steps", type=int, default=None, help="decoder sampling steps")
    s.add_argument("--upsampler-steps", type=int, default=None, help="upsampler steps")
    s.add_argument("--sampler", default=None, choices=("ddim", "dpm", "ddpm", "unclip"),
                   help="decoder sampler (unclip: diffusers' UnCLIPScheduler, imported decoders only)")
    s.add_argument("--eta", type=float, default=None,
                   help="DDIM eta of the decoder (vary: 0.5 from the inverted noise; 0 returns the "
                        "input; larger values vary more)")

    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("generate", parents=[common], help="images from a caption", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("prompt")
    c.add_argument("--num-images", type=int, default=4, help="images to write (default: %(default)s)")
    c = sub.add_parser("vary", parents=[common], help="variations of an image")
    c.add_argument("image")
    c.add_argument("--num-images", type=int, default=4, help="variations to write (default: %(default)s)")
    c.add_argument("--noise", choices=("inverted", "fresh"), default="inverted",
                   help="decoder noise x_T: the image's own DDIM inversion (the paper's variations, "
                        "varied by --eta), or fresh noise per variation (default: %(default)s)")
    c = sub.add_parser("interpolate", parents=[common], help="frames between two images")
    c.add_argument("image_a")
    c.add_argument("image_b")
    c.add_argument("--frames", type=int, default=5, help="frames including both ends (default: %(default)s)")
    c.add_argument("--noise", choices=("fixed", "interpolated"), default="fixed",
                   help="decoder noise x_T: fixed, or slerped between both images' DDIM inversions")
    c = sub.add_parser("edit", parents=[common], help="text diff: move an image from one caption to another")
    c.add_argument("image")
    c.add_argument("--from", dest="source", required=True, help="caption describing the image now")
    c.add_argument("--to", dest="target", required=True, help="caption describing the wanted image")
    c.add_argument("--frames", type=int, default=5, help="frames from the original to the edit (default: %(default)s)")
    c.add_argument("--max-theta", type=float, default=0.5, help="largest slerp angle fraction (default: %(default)s)")
    c = sub.add_parser("batch", parents=[common],
                       help="a prompt file as a Ray Data job: a PNG per prompt and seed, index.parquet")
    c.add_argument("prompt_file", help="one prompt per line (# comments and blank lines skipped)")
    c.add_argument("--seeds", default="0", help="comma-separated seeds, one image each (default: %(default)s)")
    c.add_argument("--num-actors", type=int, default=1, help="model replicas (default: %(default)s)")
    c = sub.add_parser("pca-reconstruct", parents=[common], help="decodings from the first k PCA components")
    c.add_argument("image")
    c.add_argument("--dims", default="1,2,4,8,16,32", help="comma-separated k values (default: %(default)s)")
    c = sub.add_parser("import-diffusers",
                       help="register a diffusers UnCLIPPipeline folder (Karlo) as this run's models")
    c.add_argument("source", help="pipeline folder or s3:// prefix: an UnCLIPPipeline (or an "
                                  "UnCLIPImageVariationPipeline, which brings no prior: the unclip commands "
                                  "need one, so pass it as --image-encoder beside a text-to-image one)")
    c.add_argument("--image-encoder", metavar="SOURCE", default=None,
                   help="a pipeline folder with image_encoder/ and feature_extractor/ (Karlo's variation "
                        "pipeline), for vary, interpolate and edit")
    c.add_argument("--alias", default="champion", help="alias every imported model gets (default: %(default)s)")
    c.add_argument("--run-dir", default="runs/tiny",
                   help="run directory whose MLflow store registers them (default: %(default)s)")
    c.add_argument("--experiment", default="unclip", help="MLflow experiment of the import run (default: %(default)s)")
    c = sub.add_parser("export-diffusers",
                       help="write this run's models as a diffusers UnCLIPPipeline folder (imported "
                            "models map; our own do not, and the error says why)")
    c.add_argument("out", help="folder (or s3:// prefix) for the UnCLIPPipeline; must not hold one")
    c.add_argument("--image-variations", metavar="OUT2", default=None,
                   help="folder for the UnCLIPImageVariationPipeline, written when the CLIP has an "
                        "image encoder (default: OUT-image-variations)")
    c.add_argument("--alias", default="champion", help="registry alias of every model (default: %(default)s)")
    c.add_argument("--run-dir", default="runs/tiny",
                   help="run directory whose MLflow store holds the models (default: %(default)s)")
    for name in ("clip", "prior", "decoder", "upsampler1", "upsampler2"):
        c.add_argument(f"--{name}", metavar="URI", help=f"{name} model (default: models:/unclip-{name}@ALIAS)")
    return p


def _export(args: argparse.Namespace) -> int:
    """``unclip export-diffusers``: the registered cascade as diffusers pipeline folders."""
    import dataclasses

    import mlflow

    from unclip.checkpoint import CheckpointError
    from unclip.generation.models import ModelRefs, default_tracking_uri
    from unclip.interop.diffusers_export import export_diffusers

    say = lambda m: print(f"[unclip] {m}", file=sys.stderr)  # noqa: E731
    try:
        uri = default_tracking_uri(args.run_dir)
        overrides = {k: getattr(args, k) for k in ("clip", "prior", "decoder", "upsampler1", "upsampler2")}
        if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]) \
                and not all(overrides[k] for k in ("clip", "prior", "decoder", "upsampler1")):
            raise LookupError(f"no MLflow store at {uri[len('sqlite:///'):]}: point --run-dir / "
                              "MLFLOW_TRACKING_URI at the run that holds the models")
        mlflow.set_tracking_uri(uri)
        refs = ModelRefs.registered(args.alias, **overrides)
        if not args.upsampler2:  # the pipeline has one super-resolution stage: never look it up
            refs = dataclasses.replace(refs, upsampler2=None)
        written = export_diffusers(args.out, refs, args.image_variations, progress=say)
    except (LookupError, ValueError, OSError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for kind, folder in written.items():
        print(f"{kind}\t{folder}")
    return 0


def _import(args: argparse.Namespace) -> int:
    """``unclip import-diffusers``: register the pipeline's models; print their URIs."""
    from unclip.interop.diffusers_import import import_diffusers

    say = lambda m: print(f"[unclip] {m}", file=sys.stderr)  # noqa: E731
    try:
        registered = import_diffusers(args.source, args.run_dir, args.alias, args.image_encoder,
                                      args.experiment, progress=say)
    except (LookupError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for stage, uri in registered.items():
        print(f"{stage}\t{uri}\t@{args.alias}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.command == "import-diffusers":
        return _import(args)
    if args.command == "export-diffusers":
        return _export(args)
    from unclip.generation import ModelRefs, UnCLIP
    from unclip.generation.images import InputError, grid, read_image, save_pngs
    from unclip.generation.models import default_tracking_uri

    try:
        if args.command == "generate":
            from unclip.generation.images import check_prompt

            check_prompt(args.prompt)
        images = {k: read_image(getattr(args, k)) for k in ("image", "image_a", "image_b") if hasattr(args, k)}
        import mlflow

        uri = default_tracking_uri(args.run_dir)
        if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
            raise LookupError(f"no MLflow store at {uri[len('sqlite:///'):]}: run `make pipeline` first, "
                              f"or point --run-dir / MLFLOW_TRACKING_URI at the run that trained the models")
        mlflow.set_tracking_uri(uri)
        refs = ModelRefs.registered(args.alias, **{k: getattr(args, k) for k in
                                                    ("clip", "prior", "decoder", "upsampler1", "upsampler2", "pca")})
        t0 = time.monotonic()
        if args.command == "batch":
            return _batch(args, refs, uri, t0)
        model = UnCLIP(refs, device=args.device, progress=lambda m: print(f"[unclip] {m}", file=sys.stderr))
        s = _settings(args)
        if args.command == "generate":
            stages = model.generate(args.prompt, args.num_images, args.seed, s)
            stem = "_".join(args.prompt.lower().split())[:60]
        elif args.command == "vary":
            stages = model.vary(images["image"], args.num_images, args.seed, s, args.noise)
            stem = "variation"
        elif args.command == "interpolate":
            stages = model.interpolate(images["image_a"], images["image_b"], args.frames, args.seed, args.noise, s)
            stem = "interpolation"
        elif args.command == "edit":
            stages = model.edit(images["image"], args.source, args.target, args.frames, args.max_theta, s, args.seed)
            stem = "edit"
        else:
            try:
                dims = [int(d) for d in args.dims.split(",") if d.strip()]
            except ValueError:
                raise InputError(f"--dims {args.dims!r}: expected comma-separated integers") from None
            stages = model.pca_reconstruct(images["image"], dims, args.seed, s)
            stem = "pca"
    except (InputError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = []
    for i, imgs in enumerate(stages):
        final = i == len(stages) - 1
        if final or args.all_resolutions:
            side = imgs[0].size[0]
            written += save_pngs(imgs, args.out, stem if final else f"{stem}_{side}px")
    grid(stages[-1]).save(os.path.join(args.out, f"{stem}_grid.png"))
    print(f"[unclip] wrote {len(written)} image(s) at {stages[-1][0].size[0]}px to {args.out}/ "
          f"in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def _settings(args: argparse.Namespace):
    """The sampling settings the common options describe (every command shares them)."""
    from unclip.generation.cascade import Settings

    return Settings(prior_guidance=args.prior_guidance, decoder_guidance=args.decoder_guidance,
                    prior_steps=args.prior_steps, prior_candidates=args.prior_candidates,
                    decoder_steps=args.decoder_steps, decoder_sampler=args.sampler,
                    decoder_eta=args.eta, upsampler_steps=args.upsampler_steps,
                    upsample=not args.no_upsample)


def _batch(args: argparse.Namespace, refs, tracking_uri: str, t0: float) -> int:
    import ray

    from unclip.generation.batch import generate_batch, read_prompt_file

    try:
        prompts = read_prompt_file(args.prompt_file)
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():  # the Python API may call this with Ray already up
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count() or 1}))
    table = generate_batch(prompts, seeds, refs, os.path.abspath(args.out), _settings(args), args.num_actors,
                           tracking_uri, "base" if args.no_upsample else "final")
    print(f"[unclip] wrote {table.num_rows} image(s) and index.parquet to {args.out}/ in "
          f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
