"""``unclip export-diffusers``: our registered cascade as diffusers' ``UnCLIPPipeline`` folders.

Imported models (``import-diffusers``) hold diffusers' and transformers' modules and round-trip:
the tiny random pipelines of ``test_diffusers_interop`` are imported into a run's MLflow, exported
from its registry, loaded with diffusers' own ``from_pretrained`` and sampled; the exported
pipelines sample what the original pipelines and our cascade sample, stage by stage. Our own
model kinds do not map onto the pipeline's classes (see ``unclip.interop.diffusers_export``): the
export refuses them, naming each component and the reason, and writes nothing.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from test_diffusers_interop import (ATOL, GUIDANCE, STEPS, TEXT, VARIATION, _close, _recorded,
                                    _settings, _to_unit, tiny_components)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny pipelines saved, imported into a run through the CLI, and exported from its
    registry through the CLI (``export-diffusers OUT --alias karlo``)."""
    import mlflow
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline
    from mlflow.tracking import fluent

    from unclip.cli import main

    root = tmp_path_factory.mktemp("export")
    c = tiny_components(str(root))
    pipe = UnCLIPPipeline(**{k: c[k] for k in TEXT})
    var = UnCLIPImageVariationPipeline(**{k: c[k] for k in VARIATION})
    text_dir, var_dir = str(root / "karlo"), str(root / "karlo-variations")
    pipe.save_pretrained(text_dir, safe_serialization=True)
    var.save_pretrained(var_dir, safe_serialization=True)
    run, out = str(root / "run"), str(root / "exported" / "karlo")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv("UNCLIP_CACHE_DIR", str(root / "cache"))
    mp.setattr(fluent, "_active_experiment_id", None)
    previous = mlflow.get_tracking_uri()
    try:
        assert main(["import-diffusers", text_dir, "--image-encoder", var_dir, "--run-dir", run,
                     "--alias", "karlo"]) == 0
        assert main(["export-diffusers", out, "--run-dir", run, "--alias", "karlo"]) == 0
        from unclip.generation.models import ModelRefs, resolve

        mlflow.set_tracking_uri(f"sqlite:///{os.path.join(run, 'mlflow.db')}")
        refs = ModelRefs.registered("karlo", upsampler2=None)
        folders = {k: resolve(getattr(refs, k)) for k in ("clip", "prior", "decoder", "upsampler1")}
    finally:
        mlflow.set_tracking_uri(previous)
        mp.undo()
    for p in (pipe, var):
        p.set_progress_bar_config(disable=True)
    return dict(pipe=pipe, var=var, out=out, var_out=out + "-image-variations", folders=folders,
                root=root)


def _load(folder, cls_name):
    """diffusers' own loading; text_proj passed in, as diffusers 0.42.1 needs for any unCLIP
    folder (see ``diffusers_export.TEXT_PROJ_ENTRY``)."""
    from diffusers.pipelines.deprecated import unclip as mod

    kw = dict(use_safetensors=True, local_files_only=True)
    text_proj = mod.UnCLIPTextProjModel.from_pretrained(folder, subfolder="text_proj", **kw)
    p = getattr(mod, cls_name).from_pretrained(folder, text_proj=text_proj, **kw)
    p.set_progress_bar_config(disable=True)
    return p


def test_export_is_pickle_free_and_loads_in_diffusers(exported):
    for folder in (exported["out"], exported["var_out"]):
        names = [os.path.join(d, n) for d, _, files in os.walk(folder) for n in files]
        assert names and all(n.endswith((".json", ".txt", ".safetensors")) for n in names), names
    pipe = _load(exported["out"], "UnCLIPPipeline")
    assert type(pipe).__name__ == "UnCLIPPipeline"
    for name, module in exported["pipe"].components.items():  # the very weights and configs
        if isinstance(module, torch.nn.Module):
            ours = pipe.components[name].state_dict()
            for key, value in module.state_dict().items():
                assert torch.equal(ours[key], value), f"{name}.{key}"
        elif hasattr(module, "config") and name.endswith("scheduler"):
            public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
            assert public(pipe.components[name].config) == public(module.config), name


# Two loads of the same weights can differ in the last bit (oneDNN picks kernels by buffer
# alignment): 2.4e-7 seen on the image embedding, 1.9e-5 after the decoder's steps. A wrong or
# missing weight moves outputs by more than 1e-2.
SAME = 1e-4


def test_exported_pipeline_samples_as_the_original_and_as_ours(exported):
    """(a) diffusers on the export == diffusers on the original == our cascade, stage by stage."""
    from unclip.generation import ModelRefs, UnCLIP

    kw = dict(prompt="a red circle", num_images_per_prompt=2,
              prior_num_inference_steps=STEPS["prior"], decoder_num_inference_steps=STEPS["decoder"],
              super_res_num_inference_steps=STEPS["super_res"],
              prior_guidance_scale=GUIDANCE["prior"], decoder_guidance_scale=GUIDANCE["decoder"])
    back = _recorded(_load(exported["out"], "UnCLIPPipeline"), generator=torch.Generator().manual_seed(0), **kw)
    ref = _recorded(exported["pipe"], generator=torch.Generator().manual_seed(0), **kw)
    assert float(ref["embedding"].std()) > 0.05 and float(ref["decoder"].std()) > 0.05
    for stage in ("embedding", "decoder", "final"):
        # the same modules, loaded twice: equal up to the BLAS's alignment-dependent rounding
        assert _close(back[stage], ref[stage]) <= SAME, stage

    cascade = UnCLIP(ModelRefs(**exported["folders"]), device="cpu")
    g = torch.Generator().manual_seed(0)
    s = _settings()
    prompts = [kw["prompt"]] * 2
    assert _close(cascade.prior_sample(prompts, s, g), back["embedding"]) < ATOL
    assert _close(cascade.decode(back["embedding"], prompts, s, g), back["decoder"]) < ATOL
    assert _close(_to_unit(cascade.upsample(back["decoder"], s, g)[-1]), back["final"]) < ATOL
    # (that each comparison can fail, and `generate` end to end, test_diffusers_interop shows on
    # the original pipeline, which the export reproduces bit for bit)


def test_exported_variation_pipeline_samples_as_the_original(exported):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    kw = dict(image=image, num_images_per_prompt=1, decoder_num_inference_steps=STEPS["decoder"],
              super_res_num_inference_steps=STEPS["super_res"], decoder_guidance_scale=GUIDANCE["decoder"])
    back = _recorded(_load(exported["var_out"], "UnCLIPImageVariationPipeline"),
                     generator=torch.Generator().manual_seed(1), **kw)
    ref = _recorded(exported["var"], generator=torch.Generator().manual_seed(1), **kw)
    for stage in ("embedding", "decoder", "final"):
        assert _close(back[stage], ref[stage]) <= SAME, stage


def test_reimporting_the_export_gives_the_same_checkpoints(exported, tmp_path):
    """import -> export -> import: the same weights and diffusers configs."""
    from unclip import checkpoint
    from unclip.interop.diffusers_import import convert

    again = convert(exported["out"], str(tmp_path / "again"), image_encoder=exported["var_out"])
    assert set(again) == set(exported["folders"])
    for stage, folder in again.items():
        new, meta = checkpoint.load(folder)
        old, old_meta = checkpoint.load(exported["folders"][stage])
        assert sorted(new) == sorted(old) and all(torch.equal(new[k], old[k]) for k in old), stage
        assert _public(meta["config"]) == _public(old_meta["config"]), stage


def _public(d):
    """A config without its bookkeeping (``_name_or_path``: where it was loaded from)."""
    if isinstance(d, dict):
        return {k: _public(v) for k, v in d.items() if not k.startswith("_")}
    return d


def test_export_refuses_a_folder_that_is_not_empty(exported, capsys):
    from unclip.cli import main

    f = exported["folders"]
    args = ["--clip", f["clip"], "--prior", f["prior"], "--decoder", f["decoder"], "--upsampler1", f["upsampler1"]]
    assert main(["export-diffusers", exported["out"], *args]) == 2
    assert "not empty" in capsys.readouterr().err


def _native(tmp_path) -> dict[str, str]:
    """Our own tiny models, one per stage, saved as checkpoint folders."""
    from bench.serving import build_tiny_models

    return build_tiny_models(tmp_path, upsamplers=1, sampling=False)


def _args(folders: dict[str, str]) -> list[str]:
    return [a for k, v in folders.items() for a in (f"--{k}", v)]


def test_our_own_models_are_refused_with_each_reason(tmp_path, capsys):
    """(b) none of our model kinds maps onto the pipeline's classes: every one is named, with the
    diffusers class it would have to become and why it does not, and nothing is written."""
    from unclip.cli import main

    out = tmp_path / "out"
    assert main(["export-diffusers", str(out), *_args(_native(tmp_path)), "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot export to diffusers' UnCLIPPipeline" in err
    for stage, target, reason in (
            ("prior", "PriorTransformer", "unit-norm z_t"),
            ("decoder", "UNet2DConditionModel + UnCLIPTextProjModel", "LayerNorms every context token"),
            ("upsampler1", "super_res_first", "noise-augmentation level"),
            ("clip", "CLIPTextModelWithProjection", "open_clip")):
        line = next((l for l in err.splitlines() if l.strip().startswith(stage + " (")), "")
        assert target in line and reason in line, (stage, err)
    assert not out.exists()


def test_a_mixed_cascade_names_only_what_does_not_map(exported, tmp_path, capsys):
    """Imported CLIP, prior and decoder with our own upsampler: only the upsampler is refused."""
    from unclip.cli import main

    folders = {**exported["folders"], "upsampler1": _native(tmp_path)["upsampler1"]}
    out = tmp_path / "out"
    assert main(["export-diffusers", str(out), *_args(folders)]) == 2
    problems = [l.strip() for l in capsys.readouterr().err.splitlines() if l.startswith("  ")]
    assert len(problems) == 1 and problems[0].startswith("upsampler1 (") and "'upsampler'" in problems[0]
    assert not out.exists()


def test_export_to_s3_writes_the_same_files(exported, s3_server, monkeypatch):
    """An s3:// destination gets the files a local export has (written locally, then uploaded)."""
    import s3fs

    from conftest import make_bucket
    from unclip.generation.models import ModelRefs
    from unclip.interop.diffusers_export import DiffusersExportError, export_diffusers

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    make_bucket(s3_server, "exports")
    refs = ModelRefs(**exported["folders"])
    written = export_diffusers("s3://exports/karlo", refs, progress=lambda _m: None)
    assert written == {"text": "s3://exports/karlo", "variations": "s3://exports/karlo-image-variations"}
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing",
                           secret=s3_server["AWS_SECRET_ACCESS_KEY"])
    for local, remote in ((exported["out"], "exports/karlo"),
                          (exported["var_out"], "exports/karlo-image-variations")):
        want = sorted(os.path.relpath(os.path.join(d, n), local) for d, _, files in os.walk(local) for n in files)
        got = sorted(os.path.relpath(p, remote) for p in fs.find(remote))
        assert got == want
        assert fs.cat(remote + "/model_index.json") == open(os.path.join(local, "model_index.json"), "rb").read()
    with pytest.raises(DiffusersExportError, match="already there"):
        export_diffusers("s3://exports/karlo", refs, progress=lambda _m: None)
