"""`make gpu-check` (bench/gpu_check.py) cannot rot on machines without a GPU: its CPU dry run
(smoke sizes, one step) goes through every model's builder, step, FLOP count and sampler and
writes the JSON; without CUDA the default run exits 2 with one line; a spent budget skips what
is left, each with its reason. The smoke pipeline section is not run here (it starts Ray: the
pipeline tests cover it); the dry run skips it by option. The dry run is marked slow (`make test`
runs it, `make test-fast` leaves it out); the other two take seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"diffusion prior", "AR prior", "decoder", "upsampler 8->32", "upsampler 32->128"}


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=str(ROOT),
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # 79-138 s on a loaded 2-core machine (5 models built, counted, stepped, sampled)
def test_gpu_check_cpu_dry_run_writes_every_model(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = gpu_check("--device", "cpu", "--scale", "smoke", "--skip", "pipeline", "--steps", "1",
                     "--sample-steps", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "(b) one bf16 training step" in proc.stdout and "(c) cascade latency" in proc.stdout
    r = json.loads(out.read_text())
    assert r["scale"] == "smoke" and r["device"].startswith("cpu") and r["date"]
    assert {row["model"] for row in r["steps"]} == MODELS
    for row in r["steps"]:
        assert row["step_s"] > 0 and row["gflop_per_sample"] > 0 and 0 < row["mfu"] < 1, row
        assert row["params"] > 0 and row["batch"] >= 1
    cascade = {row["stage"]: row for row in r["cascade"]}
    assert set(cascade) == {"prior", "decoder", "upsample1", "upsample2", "sum"}
    assert cascade["sum"]["seconds"] == pytest.approx(sum(
        cascade[s]["seconds"] for s in ("prior", "decoder", "upsample1", "upsample2")))
    assert r["skipped"] == [{"item": "pipeline", "reason": "--skip pipeline"}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.slow  # a subprocess: make test runs it, make test-fast leaves it out
def test_gpu_check_without_cuda_fails_in_one_line(tmp_path: Path) -> None:
    proc = gpu_check("--out", str(tmp_path / "x.json"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_gpu_check_spent_budget_skips_every_model_with_its_reason() -> None:
    from bench.gpu_check import Budget, run_models
    from pipelines.config import load_config

    result = {"steps": [], "cascade": [], "skipped": []}
    run_models(load_config(["preset=smoke"]), torch.device("cpu"), Budget(0), 1, 1, True, result)
    assert result["steps"] == [] and result["cascade"] == []
    skipped = {s["item"]: s["reason"] for s in result["skipped"]}
    assert len(skipped) == len(MODELS)
    assert all(reason.startswith("time budget spent") for reason in skipped.values())


@pytest.mark.slow  # a subprocess: make test runs it, make test-fast leaves it out
def test_gpu_check_watchdog_stops_at_the_budget_and_writes_what_it_has(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = gpu_check("--device", "cpu", "--scale", "smoke", "--budget-s", "0", "--out", str(out))
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cut off at the 0 s budget" in proc.stderr
    r = json.loads(out.read_text())
    assert any("hard limit" in s["reason"] for s in r["skipped"])
