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


def test_unknown_benchmark_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nope"], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope" in proc.stderr
