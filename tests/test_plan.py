"""``python -m pipelines plan``: every preset is checked and sized in-process on the meta device;
a bad option exits 2 with one line naming it."""

from __future__ import annotations

import re

import pytest

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.plan import make_plan

STAGES = ("clip", "prior", "decoder", "upsample1", "upsample2")


@pytest.mark.parametrize("preset", ["smoke", "tiny", "paper"])
def test_plan_checks_and_sizes_every_preset(preset, capsys):
    assert main(["plan", f"preset={preset}"]) == 0
    out = capsys.readouterr().out
    assert f"preset {preset}: every stage's options check out" in out
    for stage in STAGES:  # one row in each table
        assert len(re.findall(rf"^{stage}\s", out, re.M)) >= 2, stage


@pytest.fixture(scope="module")
def paper():
    return make_plan(load_config(["preset=paper"]))


def test_paper_sizes_are_near_table_3(paper):
    # Table 3: 3.5B for the decoder counts GLIDE's ~1.2B text transformer, which this decoder does
    # not have (it reads the CLIP text tower's states): its ~2.3B UNet is the comparable part.
    assert 1.8e9 < paper.params("decoder") < 3.5e9
    assert 0.8e9 < paper.params("diffusion prior") < 1.5e9
    assert 0.8e9 < paper.params("AR prior") < 1.5e9
    assert 0.5e9 < paper.params("upsampler 64->256") < 0.9e9
    assert 0.2e9 < paper.params("upsampler 256->1024") < 0.4e9
    # open_clip ViT-H-14 (laion2b), the open equivalent of the paper's ~1B ViT-H/16 CLIP
    assert 0.9e9 < paper.params("CLIP (frozen)") < 1.1e9
    assert paper.clip["embedding dim"] == 1024 and paper.clip["context length"] == 77


def test_paper_memory_and_batches(paper):
    rows = {r.built.name: r for r in paper.rows}
    clip = paper.params("CLIP (frozen)")
    dec = rows["decoder"]
    p = dec.built.params
    m = dec.memory()
    # fp32 weights + grads + two AdamW moments + EMA = 20 bytes/param, plus the frozen CLIP's weights
    assert m["ddp"] == 20 * p + 4 * clip
    assert m["fsdp"] == pytest.approx(20 * p / 64 + 4 * clip)
    assert 40e9 < m["ddp"] < 60e9  # the ~45 GB SPEC.md gives for a 2.25B decoder, plus CLIP
    # Table 3's global batches and iterations
    assert (dec.batch * dec.workers, dec.iterations) == (2048, "800,000")
    prior = rows["diffusion prior"]
    assert (prior.batch * prior.workers, prior.iterations) == (4096, "600,000")
    assert rows["upsampler 64->256"].batch * rows["upsampler 64->256"].workers == 1024
    assert rows["upsampler 256->1024"].batch * rows["upsampler 256->1024"].workers == 512
    assert rows["upsampler 64->256"].memory()["frozen"] == 0  # the upsamplers hold no CLIP
    assert "ddp" not in rows["CLIP (frozen)"].memory()  # a pretrained CLIP is not trained here


@pytest.mark.parametrize("overrides, named", [
    (["decoder.model.base_channels=abc"], "decoder.model.base_channels"),
    (["+decoder.model.foo=1"], "decoder.model.foo"),
    (["+decoder.train.totl_steps=5"], "decoder.train.totl_steps"),
    (["decoder.train.lr_schedule=cosin"], "decoder.train.lr_schedule"),
    (["prior.diffusion.model.heads=7"], "prior.diffusion.model"),
    (["decoder.diffusion.beta_schedule=bogus"], "decoder.diffusion.beta_schedule"),
    (["upsample2.model.norm_num_groups=5"], "upsample2.model"),
    (["preset=paper", "clip.source=pretrained:nosuchtag"], "clip.source"),
])
def test_bad_option_fails_naming_it(overrides, named, capsys):
    assert main(["plan", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err


def test_clip_dims_come_from_the_configured_source(tmp_path):
    """A CLIP checkpoint folder is sized from its config.json, a weights file from clip.arch's
    open_clip config; neither file's weights are read, and the prior and decoder take its dims."""
    from unclip.models.clip import ClipEncoder, create_custom

    arch = {"embed_dim": 48, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                            "head_width": 16},
            "text_cfg": {"context_length": 12, "width": 40, "heads": 2, "layers": 1}}
    folder = str(tmp_path / "clip")
    ClipEncoder(create_custom(arch), {"arch": "custom"}, arch).save(folder)
    plan = make_plan(load_config(["preset=smoke", f"clip.source={folder}"]))
    assert (plan.clip["embedding dim"], plan.clip["text width"], plan.clip["context length"]) == (48, 40, 12)
    rows = {r.built.name: r for r in plan.rows}
    assert not rows["CLIP (frozen)"].built.trained and rows["decoder"].frozen == plan.params("CLIP (frozen)")
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"")  # plan never opens it
    plan = make_plan(load_config(["preset=smoke", f"clip.source={weights}", "clip.arch=ViT-B-32"]))
    assert plan.clip["embedding dim"] == 512 and 140e6 < plan.params("CLIP (frozen)") < 160e6

