"""Per-row generators: a row's random draws depend on its own generator only, so a served request
batched with others gets the images it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unclip.diffusion import noise


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_each_row_draws_from_its_own_generator():
    a, b = _gens(1, 2)
    x = noise.randn((2, 3, 4), [a, b])
    assert torch.equal(x[0], torch.randn((1, 3, 4), generator=torch.Generator().manual_seed(1))[0])
    assert torch.equal(x[1], torch.randn((1, 3, 4), generator=torch.Generator().manual_seed(2))[0])
    # a generator owning two rows draws them one after the other, whatever sits beside them
    g, = _gens(7)
    alone = noise.randn((2, 5), [g, g])
    g2, other = _gens(7, 9)
    mixed = noise.randn((3, 5), [other, g2, g2])
    assert torch.equal(mixed[1:], alone)
    assert not torch.equal(alone[0], alone[1])
    # one generator (or none) keeps torch's own draw
    assert torch.equal(noise.randn((2, 5), torch.Generator().manual_seed(3)),
                       torch.randn((2, 5), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3 rows"):
        noise.randn((3, 5), _gens(1, 2))


def test_integers_categories_and_repeated_rows_per_generator():
    probs = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)), -1)
    got = noise.multinomial(probs, _gens(4, 5, 6))
    for i, s in enumerate((4, 5, 6)):
        want = torch.multinomial(probs[i:i + 1], 1, generator=torch.Generator().manual_seed(s))[0, 0]
        assert got[i] == want
        assert noise.randint(0, 1000, 3, _gens(4, 5, 6))[i] == torch.randint(
            0, 1000, (1,), generator=torch.Generator().manual_seed(s))[0]
    a, b = _gens(1, 2)
    assert noise.repeat_rows([a, b], 2) == [a, a, b, b]
    g = torch.Generator()
    assert noise.repeat_rows(g, 3) is g and noise.repeat_rows(None, 3) is None


def test_a_request_batched_with_others_gets_its_images_alone(tmp_path):
    """The cascade (stochastic prior and decoder samplers, two candidates, both upsamplers'
    noise augmentation): each request of a batch comes out as it does alone."""
    from bench.serving import build_tiny_models
    from unclip.generation import ModelRefs, UnCLIP
    from unclip.generation.cascade import Settings

    model = UnCLIP(ModelRefs(**build_tiny_models(tmp_path, sampling=False)), device="cpu")
    s = Settings(prior_sampler="ddpm", prior_steps=3, prior_candidates=2, decoder_sampler="ddpm",
                 decoder_steps=3, upsampler_steps=2)
    jobs = [("a blue square", 1, 5), ("a red circle", 2, 3), ("a red circle", 1, 4)]
    batched = model.generate_batch(jobs, s)
    for (prompt, n, seed), got in zip(jobs, batched):
        alone = model.generate(prompt, n, seed, s)
        assert [len(r) for r in got] == [n, n, n]  # base and both upsamplers
        for res_got, res_alone in zip(got, alone):
            for x, y in zip(res_got, res_alone):
                diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16))
                # float rounding of the larger batch: a pixel may move a few levels, not an image
                assert diff.max() <= 4 and diff.mean() < 0.01, (prompt, seed, diff.max())
    final = [np.asarray(im) for r in batched for im in r[-1]]
    assert not np.array_equal(final[1], final[2])  # one request's two images differ
    assert not np.array_equal(final[2], final[3])  # the same prompt, another seed
