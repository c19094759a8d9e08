"""One source of defaults: the schema (pipelines/schema, built from the library's dataclasses) is
every key's type, default and range; configs/ and the presets hold only what differs; a bad key
fails when the config is composed, naming it; old run directories hash as they did."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipelines import schema
from pipelines.config import CONFIG_DIR, ConfigError, load_config
from pipelines.plan.checks import check

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("smoke", "tiny", "paper")


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _at(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_sets_only_what_differs(preset):
    """Every key a preset sets has another value without it (preset_name: each preset names itself)."""
    base = OmegaConf.to_container(load_config(["~preset"]))
    text = yaml.safe_load((CONFIG_DIR / "preset" / f"{preset}.yaml").read_text())
    same = [k for k, v in _leaves(text) if k != "preset_name" and _at(base, k) == v]
    assert not same, f"configs/preset/{preset}.yaml restates {same}"


def test_stage_yaml_holds_only_what_differs_from_the_library():
    defaults = OmegaConf.to_container(schema.node())
    for path in sorted(CONFIG_DIR.glob("*/default.yaml")):
        stage = path.parent.name
        same = [k for k, v in _leaves(yaml.safe_load(path.read_text()) or {})
                if _at(defaults[stage], k) == v]
        assert not same, f"{path.relative_to(ROOT)} restates the schema's defaults {same}"


def test_model_defaults_are_the_librarys():
    """A derived schema has the library dataclass's fields, defaults and bounds (written once)."""
    from unclip.models.decoder import DecoderConfig
    from unclip.options import bounds_of
    from unclip.training.loop import LoopConfig

    model = schema.node().decoder.model
    lib = {f.name: f for f in dataclasses.fields(DecoderConfig)}
    assert set(model) == set(lib) - {"resolution", "clip_dim", "text_width", "use_caption", "learn_variance"}
    for key in model:
        assert OmegaConf.to_container(model)[key] == _listed(lib[key].default), key
    train = {f.name: f for f in dataclasses.fields(OmegaConf.get_type(schema.node().decoder.train))}
    assert bounds_of(train["total_steps"]) == bounds_of({f.name: f for f in dataclasses.fields(LoopConfig)}["total_steps"])


def _listed(v):
    return list(v) if isinstance(v, tuple) else v


@pytest.mark.parametrize("overrides, named", [
    (["decoder.train.total_steps=abc"], "decoder.train.total_steps"),
    (["+decoder.train.totl_steps=5"], "decoder.train.totl_steps: unknown option"),
    (["decoder.model.foo=1"], "decoder.model.foo: unknown option"),
    (["filter.background=[1,x,3]"], "filter.background"),
    (["data.two_object_prob=often"], "data.two_object_prob"),
])
def test_a_bad_key_fails_at_composition_naming_it(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_bad_key_in_a_config_file_names_the_key_and_the_file(tmp_path, monkeypatch):
    import pipelines.config as config

    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    bad = tmp_path / "configs" / "preset" / "bad.yaml"
    bad.write_text("# @package _global_\nprior:\n  train: {totl_steps: 5}\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path / "configs")
    with pytest.raises(ConfigError, match=r"prior\.train\.totl_steps: unknown option .*preset/bad"):
        load_config(["preset=bad"])


def test_open_subtrees_take_other_open_clip_options():
    cfg = load_config(["+clip.model.quick_gelu=true", "+clip.model.vision_cfg.mlp_ratio=2.0"])
    assert cfg.clip.model.quick_gelu is True and cfg.clip.model.vision_cfg.mlp_ratio == 2.0
    with pytest.raises(ConfigError, match="clip.model.vision_cfg.width"):
        load_config(["clip.model.vision_cfg.width=wide"])  # a key the schema lists is typed


@pytest.mark.parametrize("overrides, named", [
    (["decoder.train.total_steps=0"], "decoder.train.total_steps: must be >= 1"),
    (["decoder.p_drop_clip=1.5"], "decoder.p_drop_clip: must be <= 1"),
    (["prior.kind=both"], "prior.kind: 'both' is not one of diffusion, autoregressive"),
    (["upsample2.degradation.isotropic_prob=-0.1"], "upsample2.degradation.isotropic_prob: must be >= 0"),
    (["decoder.model.channel_mult=[1,0]"], "decoder.model.channel_mult: must be >= 1"),
    (["evaluate.decoder_sampler=euler"], "evaluate.decoder_sampler"),
    (["decoder.model.norm_groups=5"], r"decoder.model: level width \d+ is not divisible by norm_groups 5"),
])
def test_a_value_out_of_range_fails_the_check_naming_it(overrides, named):
    with pytest.raises(ConfigError, match=named):
        check(load_config(overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_in_range(preset):
    check(load_config([f"preset={preset}"]))


@pytest.mark.slow  # a subprocess: make test runs it, make test-fast leaves it out
def test_run_refuses_an_ill_typed_value_within_seconds_writing_nothing(tmp_path):
    """`python -m pipelines run ... decoder.train.total_steps=abc` exits 2 with one line naming the
    key, before the run lock, Ray or MLflow: the run directory is never created."""
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipelines", "run", "preset=smoke",
                           f"run_dir={run_dir}", "decoder.train.total_steps=abc"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    # ~8 s here; the bound only tells "refused at composition" from "ran stages first" (minutes),
    # with room for a loaded machine (107 s once, beside a training run)
    assert time.monotonic() - t0 < 240
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err == ["error: decoder.train.total_steps: Value 'abc' of type 'str' could not be "
                   "converted to Integer"], err
    assert not run_dir.exists()


def test_run_refuses_a_value_out_of_range_before_any_stage(tmp_path, capsys):
    from pipelines.cli import main

    run_dir = tmp_path / "run"
    assert main(["run", "preset=smoke", f"run_dir={run_dir}", "decoder.p_drop_clip=1.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: decoder.p_drop_clip: must be <= 1, got 1.5"]
    assert not run_dir.exists()


def test_plan_prints_each_value_with_its_origin(capsys):
    from pipelines.cli import main

    assert main(["plan", "--no-measure", "preset=smoke", "decoder.train.total_steps=7", "seed=3"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("[decoder]"):out.index("[evaluate]")]
    rows = {r[0]: r[1:] for r in (re.split(r"\s{2,}", line.strip()) for line in section.splitlines()[1:])}
    assert rows["train.total_steps"] == ["7", "command line"]
    assert rows["train.seed"] == ["3", "command line"]           # through ${seed}
    assert rows["resolution"] == ["8", "preset"]
    assert rows["model.layers_per_block"] == ["1", "default.yaml"]  # the library's is 2
    assert rows["model.num_clip_tokens"] == ["4", "default"]
    assert rows["model.attention_resolutions"] == ["[4]", "preset"]
    assert "preset smoke: every stage's options check out" in out


# Each stage's config hash (HASH_VERSION 2) and legacy hash (version 1) for every preset, recorded
# before the schema: a run directory written then still finds its stages done and resumes its
# trainings under the same checkpoint names (the one change since, a preset change, is marked).
BEFORE = {
    "smoke": {
        "clip": ("05e16bdefd21d313", "1894e751530594d4"),
        "data": ("e0a083f5d79787a3", "c20e0fc128699b0b"),
        "decoder": ("4cdf9e1848d86223", "f8368342d6a8be4d"),
        "embed": ("bf51b48dde0c5a3c", "fe5408504df7c6cc"),
        "evaluate": ("946f54a2c0acf212", "9ed0ebb89382270b"),
        "filter": ("2a544da1b44c1931", "47e45790f2073898"),
        "pca": ("1c8771f7dfcb3a8a", "6a3c13866337cf6a"),
        "prior": ("9fafec65c1e4df8e", "6e6b230045bcf04b"),
        "upsample1": ("038af4da38382d3a", "8b0caf074501ae9f"),
        "upsample2": ("738366f9199ec74a", "35adb43b05a20259"),
    },
    "tiny": {
        "clip": ("a9aaa5ce17c7b3eb", "88d70bf7455b42a7"),
        "data": ("175f38de6321097c", "208e3d4707f3ae11"),
        "decoder": ("38517859ab0829f1", "9d5c7e7684004489"),
        "embed": ("bf51b48dde0c5a3c", "fe5408504df7c6cc"),
        "evaluate": ("4d480d69bce94822", "5389d01f347d15ff"),
        "filter": ("b33d4845129c9fb8", "ade0eb6259649373"),
        "pca": ("e61208e562315de8", "19fe2b9c9e61158d"),
        "prior": ("89343e5bbe5ad4b1", "e385561ab95815bf"),
        "upsample1": ("174f7134764a15c8", "7443a74e912ca67c"),
        # changed since, on purpose: upsample2 samples with DDIM 5 (was 8; bench/README.md, Quality
        # per sampling step), so a tiny run's upsample2 is stale and is retrained
        "upsample2": ("35f71a2fae70d712", "b782c55e210a8e30"),
    },
    "paper": {
        "clip": ("b5c72cec78b431a5", "6c1d6243e188eecc"),
        "data": ("7356885ff48ef034", "ceeb2ea89e06e119"),
        "decoder": ("abcacfe18fcaac07", "9fc1d08376d737ae"),
        "embed": ("bf51b48dde0c5a3c", "37bf825d348b42bf"),
        "evaluate": ("d8b59cce958ae033", "79fba7616153b09e"),
        "filter": ("1b8b949b6fd8da8e", "51ef04f40ef5abcf"),
        "pca": ("5c063a8e552c887a", "87af88f29e345f0d"),
        "prior": ("cf206c9de8f32445", "431828b5c121f5cf"),
        "upsample1": ("5602752886cdd1d8", "77e748862c5a7973"),
        "upsample2": ("99e95ffb44b856e7", "0eb4aabdc28d890d"),
    },
}


@pytest.mark.parametrize("preset", PRESETS)
def test_stage_hashes_are_those_before_the_schema(preset):
    from pipelines.graph import STAGES
    from pipelines.status import legacy_config_hash, stage_config_hash

    cfg = load_config([f"preset={preset}"])
    got = {s.name: (stage_config_hash(s, cfg), legacy_config_hash(s, cfg)) for s in STAGES}
    assert got == BEFORE[preset]


def test_an_added_key_counts_in_the_hash_only_once_set():
    """Keys the schema added (the upsamplers' min_snr_gamma, the prior's max_nonfinite_steps) are
    left out of the hash at their default, so old run directories stay done; set, they re-run."""
    from pipelines.graph import Graph
    from pipelines.status import stage_config_hash

    g = Graph()
    base = load_config(["preset=smoke"])
    for stage, key, value in (("upsample1", "diffusion.min_snr_gamma", 5.0),
                              ("prior", "train.max_nonfinite_steps", 3)):
        assert key.split(".")[-1] in base[stage][key.split(".")[0]]
        changed = load_config(["preset=smoke", f"{stage}.{key}={value}"])
        assert stage_config_hash(g[stage], changed) != stage_config_hash(g[stage], base)
    for stage in ("clip", "prior", "decoder", "upsample1", "upsample2"):  # fine-tuning's source
        assert base[stage].init_from == ""
        changed = load_config(["preset=smoke", f"{stage}.init_from=models:/unclip-{stage}@champion"])
        assert stage_config_hash(g[stage], changed) != stage_config_hash(g[stage], base)


def test_the_held_out_split_is_one_top_level_setting():
    from pipelines.plan.checks import HOLDOUT_KEYS, check

    cfg = load_config(["preset=smoke", "holdout_fraction=0.3"])
    check(cfg)
    assert {OmegaConf.select(cfg, k) for k in HOLDOUT_KEYS} == {0.3}
    with pytest.raises(ConfigError, match=r"decoder.holdout_fraction=0.5 differs from holdout_fraction=0.2"):
        check(load_config(["preset=smoke", "decoder.holdout_fraction=0.5"]))
