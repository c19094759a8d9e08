"""Schema of the evaluate stage: generate images for distinct held-out captions with this run's
models (the whole cascade) and score them on any data: CLIP score against the captions, and a
Frechet distance on the pipeline's own CLIP image features against held-out real images beside
that of real vs real (skipped, with the reason in fd_clip_skipped, below 2 images a side). Where the
data has a ground truth (the shapes generator), detector accuracies too (colour, shape, position,
two-object binding)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import II

from unclip.diffusion.sampling import SAMPLERS
from unclip.options import option

GRID_PROMPTS = ("a red circle", "a blue square", "a green triangle at the top left",
                "a small yellow star", "a purple circle to the left of an orange square",
                "a white triangle above a black circle")


@dataclass
class EvaluateStage:
    num_one_object: int = option(48, ge=0)   # ground truth: held-out captions with one object
    num_two_objects: int = option(48, ge=0)  # ground truth: held-out captions with two objects
    num_captions: int | None = option(None, ge=1)  # no ground truth: this many (null: the sum of the two)
    seed: int = II("seed")
    num_actors: int = option(1, ge=1)        # model replicas generating in parallel (Ray Data actors)
    # score the final resolution (false: the decoder's base images, faster); grid.png always goes
    # through the whole cascade
    score_upsampled: bool = True
    score_resolution: int = option(64, ge=1)  # images are resized to this side before the detector
    # Sampling (see `unclip generate --help`). null: as trained, the settings the prior's and the
    # decoder's stages validated with (recorded in their checkpoints), so the cascade is sampled as
    # each stage scored itself; the values used are in the manifest (sampling_*).
    prior_guidance: float | None = option(None, ge=0)
    prior_steps: int | None = option(None, ge=1)
    decoder_guidance: float | None = option(None, ge=0)
    decoder_steps: int | None = option(None, ge=1)
    decoder_sampler: str | None = option(None, choices=SAMPLERS)
    upsampler_steps: int | None = option(None, ge=1)  # null: as each upsampler was trained
    holdout_fraction: float = II("holdout_fraction")
    # grid.png: one row per prompt, grid_seeds columns. auto draws grid_prompts (shapes captions)
    # where the data has a ground truth and the first grid_rows held-out captions elsewhere;
    # prompts / holdout pick one always. The rows used are listed in evaluate/grid_prompts.txt.
    grid_source: str = option("auto", choices=("auto", "prompts", "holdout"))
    grid_rows: int = option(6, ge=1)
    grid_prompts: list[str] = field(default_factory=lambda: list(GRID_PROMPTS))
    grid_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
