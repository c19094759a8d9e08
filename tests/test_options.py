"""Option bounds declared beside the library's defaults (unclip.options), and the sampling defaults
written once."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import pytest

from unclip.options import Bounds, option, validate


@dataclass
class _Toy:
    steps: int = option(10, ge=1)
    prob: float = option(0.5, ge=0, le=1)
    sizes: tuple[int, ...] = option((1, 2), gt=0)
    kind: str = option("a", choices=("a", "b"))
    off: float | None = option(None, ge=0)


def test_bounds_name_the_field_and_check_lists_per_element():
    validate(_Toy())
    for kw, field in [({"steps": 0}, "steps must be >= 1, got 0"), ({"prob": 1.5}, "prob must be <= 1"),
                      ({"sizes": (1, 0)}, "sizes must be > 0"), ({"kind": "c"}, "kind 'c' is not one of a, b"),
                      ({"prob": float("nan")}, "prob must be >= 0")]:
        with pytest.raises(ValueError, match=field):
            validate(_Toy(**kw))
    assert Bounds(ge=0).problem(None) is None          # null switches an option off
    assert Bounds(ge=0).problem("sqrt_dim") is None    # a rule: its consumer checks it


def test_library_configs_refuse_out_of_range_values():
    from unclip.diffusion import DiffusionConfig
    from unclip.models.decoder import DecoderConfig
    from unclip.models.prior import PriorConfig
    from unclip.training.loop import LoopConfig

    with pytest.raises(ValueError, match="total_steps"):
        LoopConfig(total_steps=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        LoopConfig.from_dict({"lr_schedule": "cosin"})
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionConfig(beta_schedule="bogus")
    with pytest.raises(ValueError, match="dropout"):
        DecoderConfig(dropout=1.0)
    with pytest.raises(ValueError, match="divisible by heads"):
        PriorConfig(dim=8, text_width=8, width=256, heads=7)


def test_sampling_defaults_are_written_once():
    """The cascade's fallback for checkpoints that record no sampling, and the sampling functions'
    own defaults, are the library's sampling dataclasses."""
    from unclip.generation.cascade import FALLBACK
    from unclip.models.ar_prior import ARPrior, ARPriorSampling
    from unclip.models.decoder_sampling import DecoderSampling, decode
    from unclip.models.prior import DiffusionPrior, PriorSampling

    assert FALLBACK == {"prior": asdict(PriorSampling()), "decoder": asdict(DecoderSampling())}
    for fn, cls in ((decode, DecoderSampling), (DiffusionPrior.sample, PriorSampling),
                    (ARPrior.sample, ARPriorSampling)):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in asdict(cls())} == asdict(cls()), fn
