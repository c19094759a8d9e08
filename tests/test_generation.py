"""Every `unclip` command on the models the smoke pipeline registered (a real MLflow store)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from unclip.cli import main


@pytest.fixture(scope="module")
def store(smoke_run, tmp_path_factory):
    """The smoke run's store, and two of its training images as inputs."""
    from unclip.data.loading import iter_decoded
    from unclip.data.shards import list_shards

    rows = list(iter_decoded(list_shards(str(smoke_run / "filter" / "shards"))[0]))[:2]
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for i, row in enumerate(rows):
        paths.append(str(folder / f"in{i}.png"))
        Image.fromarray(row["image"]).save(paths[-1])
    return str(smoke_run), paths


def _run(store, *args):
    run_dir, _ = store
    return main([*args, "--run-dir", run_dir, "--prior-steps", "4", "--decoder-steps", "4",
                 "--upsampler-steps", "2"])


def _pngs(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".png") and "grid" not in p)


def test_generate_writes_final_and_intermediate_resolutions(store, tmp_path, capsys):
    assert _run(store, "generate", "a red circle", "--num-images", "2", "--seed", "3",
                "--out", str(tmp_path), "--all-resolutions") == 0
    names = _pngs(tmp_path)
    sizes = sorted({Image.open(tmp_path / n).size[0] for n in names})
    assert len(names) == 6 and sizes == [8, 32, 128]  # smoke: decoder 8 -> 32 -> 128
    assert (tmp_path / "a_red_circle_grid.png").exists()
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and all(os.path.exists(p) for p in printed)


def test_generate_is_deterministic_for_a_seed(store, tmp_path):
    for sub in ("a", "b"):
        assert _run(store, "generate", "a blue square", "--num-images", "1", "--seed", "5",
                    "--out", str(tmp_path / sub), "--no-upsample") == 0
    a, b = (Image.open(tmp_path / s / _pngs(tmp_path / s)[0]).tobytes() for s in ("a", "b"))
    assert a == b


def test_vary_interpolate_edit_pca(store, tmp_path):
    _, (img_a, img_b) = store
    assert _run(store, "vary", img_a, "--num-images", "3", "--out", str(tmp_path / "v")) == 0
    assert len(_pngs(tmp_path / "v")) == 3
    for noise in ("fixed", "interpolated"):
        out = tmp_path / f"i-{noise}"
        assert _run(store, "interpolate", img_a, img_b, "--frames", "4", "--noise", noise,
                    "--out", str(out), "--no-upsample") == 0
        assert len(_pngs(out)) == 4
    assert _run(store, "edit", img_a, "--from", "a red circle", "--to", "a blue square",
                "--frames", "3", "--out", str(tmp_path / "e"), "--no-upsample") == 0
    assert len(_pngs(tmp_path / "e")) == 3
    assert _run(store, "pca-reconstruct", img_a, "--dims", "1,2,4", "--out", str(tmp_path / "p"),
                "--no-upsample") == 0
    assert len(_pngs(tmp_path / "p")) == 3


def test_batch_writes_a_png_per_prompt_and_seed_and_an_index(store, tmp_path, ray_local):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\na green triangle above a blue square\n")
    out = tmp_path / "batch"
    assert _run(store, "batch", str(prompts), "--seeds", "0,1", "--out", str(out), "--no-upsample") == 0
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [(r["prompt"], r["seed"]) for r in index] == [
        ("a red circle", 0), ("a red circle", 1),
        ("a green triangle above a blue square", 0), ("a green triangle above a blue square", 1)]
    assert all(os.path.exists(r["path"]) and Image.open(r["path"]).size == (8, 8) for r in index)


@pytest.mark.parametrize("args, message", [
    (["generate", "   "], "the prompt is empty"),
    (["vary", "/no/such/image.png"], "no such file"),
    (["generate", "a red circle", "--decoder", "models:/no-such-model@champion"], "no-such-model"),
])
def test_errors_are_one_line(store, tmp_path, capsys, args, message):
    assert _run(store, *args, "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]


def test_unreadable_image_is_one_line(store, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    assert _run(store, "vary", str(bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: not a readable image")
