"""The benchmark suite runs end to end: `python -m bench --quick --only sampling` (its cheapest
benchmark) writes the per-benchmark JSON and the summary with the expected keys. Benchmarks never
assert speeds; this checks the plumbing and that every number is a real, positive measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_sampling_bench_writes_json(tmp_path: Path) -> None:
    env = {**os.environ, "UNCLIP_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "sampling"],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "summary" in proc.stdout

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"quick", "machine", "benchmarks", "rows"}
    assert summary["quick"] is True
    assert summary["benchmarks"]["sampling"]["ok"] is True
    assert summary["machine"]["torch_threads"] == 1

    result = json.loads((tmp_path / "sampling.json").read_text())
    assert set(result) >= {"name", "machine", "network_call_s", "configured", "rows"}
    stages = {r["stage"] for r in result["rows"]}
    assert {"prior", "decoder", "cascade"} <= stages
    assert any(s.startswith("upsampler") for s in stages)
    for r in result["rows"]:
        assert set(r) >= {"stage", "setting", "sampler", "steps", "latency_s", "how"}
        assert r["latency_s"] > 0 and r["steps"] > 0
    # the cascade is the sum of its stages for each setting
    for setting in {r["setting"] for r in result["rows"]}:
        part = [r["latency_s"] for r in result["rows"] if r["setting"] == setting and r["stage"] != "cascade"]
        cascade = next(r for r in result["rows"] if r["setting"] == setting and r["stage"] == "cascade")
        assert cascade["latency_s"] == pytest.approx(sum(part))
    # the AR prior section: cached vs uncached sampling at both sizes, same samples either way
    ar = result["ar_prior"]["rows"]
    assert {(r["model"], r["guidance"]) for r in ar} == {(m, g) for m in ("tiny", "mid") for g in (1.0, 3.0)}
    for r in ar:
        assert r["cached_s"] > 0 and r["uncached_s"] > 0 and r["tokens"] > 0
        assert r["speedup"] == pytest.approx(r["uncached_s"] / r["cached_s"])
        assert r["same_samples"] is True
    assert any(r["item"].startswith("AR prior mid") for r in summary["rows"])


def test_unknown_benchmark_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nope"], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope" in proc.stderr


def test_sampling_ar_section_alone_keeps_the_stage_table(tmp_path: Path, monkeypatch) -> None:
    """``--section ar_prior`` re-measures only the AR prior section: the stage table and the
    machine it was measured on stay as the last run wrote them (the measurement is stubbed here;
    the quick run above measures it)."""
    from bench import report, sampling

    out = tmp_path / "sampling.json"
    old = {"name": "sampling", "machine": {"cpu_count": 7}, "rows": [{"stage": "prior"}],
           "ar_prior": {"rows": [{"model": "stale"}]}}
    out.write_text(json.dumps(old))
    row = {"model": "tiny", "tokens": 16, "guidance": 1.0, "uncached_s": 2.0, "cached_s": 1.0,
           "speedup": 2.0, "same_samples": True}
    monkeypatch.setattr(sampling, "ar_prior_rows", lambda *a: [row])
    import torch

    threads = torch.get_num_threads()
    try:
        sampling.main(["--section", "ar_prior", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the bench fixes 1 thread for the process
    new = json.loads(out.read_text())
    assert new["rows"] == old["rows"] and new["machine"] == old["machine"]
    assert new["ar_prior"]["rows"] == [row]
    monkeypatch.setenv("UNCLIP_BENCH_RESULTS", str(tmp_path))
    assert report.main(["sampling:ar_prior"]) == 0


def test_bench_run_dir_scores_every_finished_stage_at_each_step_count(smoke_run, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """``python -m bench --quick --run-dir RUN --only step_quality`` on the smoke run (its quick
    grid shrunk to 2 steps): every finished stage, one row per sampler x step count plus the stage's
    own (configured) setting, marked, at the step count its checkpoint records; real, finite scores,
    in step_quality.json and in the summary. A bench that needs a run is refused without one."""
    import math

    import torch

    from bench import step_quality
    from bench.__main__ import main
    from pipelines.manifest import read_manifest
    from unclip import checkpoint

    monkeypatch.setenv("UNCLIP_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(step_quality, "QUICK", {"steps": [2], "samplers": ["ddim", "dpm"], "captions": 8,
                                                "images": 2, "up_images": 1})
    threads = torch.get_num_threads()
    try:
        assert main(["--quick", "--run-dir", str(smoke_run), "--only", "step_quality"]) == 0
    finally:
        torch.set_num_threads(threads)  # the bench fixes 1 thread for the process
    result = json.loads((tmp_path / "step_quality.json").read_text())
    by_stage: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_stage.setdefault(r["stage"], []).append(r)
    assert set(by_stage) == set(step_quality.STAGES) and result["not_finished"] == []
    recorded = checkpoint.read_config(read_manifest(str(smoke_run), "decoder").outputs["model"])["sampling"]
    for stage, rows in by_stage.items():
        assert [(r["sampler"], r["steps"]) for r in rows[:2]] == [("ddim", 2), ("dpm", 2)]
        configured = [r for r in rows if r["configured"]]
        assert len(configured) == 1, rows
        if stage == "decoder":
            assert (configured[0]["sampler"], configured[0]["steps"]) == (recorded["sampler"], recorded["steps"])
    for r in by_stage["prior"]:
        assert -1 <= r["cosine"] <= 1 and math.isfinite(r["baseline_text"]) and r["n"] == 8
    for r in by_stage["decoder"]:
        assert -1 <= r["val_clip_cosine"] <= 1 and 0 <= r["val_shape"] <= 1  # shapes: a ground truth
    for stage in ("upsample1", "upsample2"):
        for r in by_stage[stage]:
            assert 5 < r["val_psnr"] < 100 and 0 < r["val_ssim"] <= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run_dir"] == str(smoke_run) and summary["benchmarks"]["step_quality"]["ok"]
    assert len(summary["rows"]) == len(result["rows"])
    assert all(math.isfinite(r["value"]) for r in summary["rows"])
    with pytest.raises(SystemExit) as exc:
        main(["--only", "time_to_quality_decoder"])
    assert exc.value.code == 2


def test_decoder_time_to_quality_trains_ours_on_the_runs_own_pairs(smoke_run) -> None:
    """bench.time_to_quality_decoder's side of ours (theirs needs the dalle2-pytorch venv): the
    stage's decoder trained from scratch on the run's training pairs for a CPU budget, its EMA's
    decodes of held-out z_i scored at each fraction; FLOPs per sample counted on a real batch."""
    import math

    from bench.time_to_quality import FRACTIONS, batch_order
    from bench.time_to_quality_decoder import evaluator, load_pairs, our_flops_per_sample, train_ours

    pairs = load_pairs(str(smoke_run), 4)
    assert pairs["images"].dtype.name == "uint8" and len(pairs["images"]) == len(pairs["zi"])
    assert pairs["states"].shape[:2] == pairs["mask"].shape and len(pairs["held"]["captions"]) == 4
    first = next(batch_order(len(pairs["images"]), int(pairs["cfg"]["train"]["batch_size"]), 0))
    assert our_flops_per_sample(pairs, first) > 1e6
    points = train_ours(pairs, 1.5, 0, evaluator(pairs, 2))
    assert [p["fraction"] for p in points] == list(FRACTIONS)
    assert 0 < points[0]["steps"] <= points[-1]["steps"] and math.isfinite(points[-1]["loss"])
    for p in points:
        assert -1 <= p["z"]["val_clip_cosine"] <= 1 and 0 <= p["z"]["val_shape"] <= 1


def test_decoder_time_to_quality_refuses_an_unfinished_run(tmp_path: Path) -> None:
    from bench.time_to_quality_decoder import load_pairs

    with pytest.raises(SystemExit, match="not finished"):
        load_pairs(str(tmp_path), 4)


@pytest.mark.slow  # a benchmark pass (~10 s): make test runs it, make test-fast leaves it out
def test_decoder_profile_quick_on_a_small_decoder(tmp_path: Path) -> None:
    """bench.decoder_profile --quick on a decoder shrunk to the smoke preset's 8 px (seconds): every
    variant is in the JSON, measured (positive time) or skipped with its reason (quick leaves
    compile out); the profile's categories cover the whole step; FLOPs were counted."""
    import torch

    from bench import decoder_profile
    from bench import models as M

    # the smoke decoder's shapes, written out (composing the tiny preset's config takes seconds)
    small = M.Sizes(clip_dim=16, text_width=16, context=8, caption_tokens=4, prior={}, prior_batch=0,
                    decoder={"resolution": 8, "use_caption": True, "base_channels": 16,
                             "channel_mult": [1, 2], "layers_per_block": 1, "attention_resolutions": [4],
                             "head_channels": 16, "context_dim": 32, "norm_groups": 8},
                    decoder_batch=2, decoder_diffusion={"learn_variance": True,
                                                        "prediction_type": "v_prediction",
                                                        "min_snr_gamma": 5.0},
                    decoder_sampling={}, prior_sampling={}, up_scale=4, up_sides=(32, 128),
                    up_batch=1, ar_prior={})
    out = tmp_path / "decoder_profile.json"
    threads = torch.get_num_threads()
    try:
        decoder_profile.run(quick=True, out=str(out), sizes=small, peak_n=256)
    finally:
        torch.set_num_threads(threads)  # the bench fixes 1 thread for the process
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["model"]["batch"] == 2
    assert result["gflop_per_step"] > 0 and result["matmul_peak_gflops"] > 0
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == list(decoder_profile.VARIANTS)
    assert "skipped" in rows["compile"] and "step_s" not in rows["compile"]
    for name in ("baseline", "no_sdpa", "channels_last", "fused_optim", "all"):
        r = rows[name]
        assert r["step_s"] > 0 and r["wall_step_s"] > 0 and r["speedup"] > 0, r
        assert r["fraction_of_peak"] > 0
    assert rows["baseline"]["speedup"] == 1.0
    assert rows["all"]["compiled"] is False
    prof = result["profile"]
    assert [r["category"] for r in prof["rows"]] == list(decoder_profile.CATEGORIES)
    assert sum(r["share"] for r in prof["rows"]) == pytest.approx(1.0)
    assert all(r["share"] >= 0 for r in prof["rows"])
    assert prof["copy_calls_per_step"] > 0
    kinds = {r["kind"]: r for r in result["conv_matmul"]["rows"]}
    assert set(kinds) >= {"conv forward", "conv backward", "attention (SDPA)", "conv + matmul + attention"}
    assert kinds["conv + matmul + attention"]["gflop"] > 0
    assert kinds["attention (SDPA)"]["gflop"] > 0  # the CPU kernels torch's counter has no formula for
    from bench.__main__ import summary_rows

    summary = summary_rows("decoder_profile", result)
    assert len(summary) == len(decoder_profile.VARIANTS)
    assert [r["value"] is None for r in summary] == [v == "compile" for v in decoder_profile.VARIANTS]
