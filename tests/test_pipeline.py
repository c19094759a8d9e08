"""The data + filter stages through the real pipeline: run, skip, invalidate, kill and resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from unclip.data import shapes
from unclip.data.shards import RawSample, iter_shard, list_shards

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> int:
    return main(list(args))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _actions(report: str) -> dict[str, str]:
    """stage -> action, from the table `run` prints last."""
    rows = [ln.split() for ln in report.splitlines()]
    return {r[0]: r[1] for r in rows if len(r) >= 2 and r[1] in ("ran", "skipped")}


def test_smoke_data_and_filter(tmp_path, ray_local, capfd):
    import logging

    capsys = capfd  # file-descriptor level: Ray's own log lines are caught too
    run_dir = tmp_path / "run"
    said: list[str] = []  # the runner's own lines, caught on its logger whatever pytest's do

    class Keep(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    unclip_log = logging.getLogger("unclip")
    keep, level = Keep(logging.INFO), unclip_log.level
    unclip_log.addHandler(keep)
    unclip_log.setLevel(logging.INFO)
    try:
        assert _run("run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}") == 0
    finally:
        unclip_log.removeHandler(keep)
        unclip_log.setLevel(level)
    out, err = capsys.readouterr()
    assert any(m.startswith("[1/2] stage data ") for m in said), said  # where the run stands
    assert any(m.startswith("[2/2] stage filter    finished in") for m in said), said
    # Ray Data's per-dataset execution plans stay in Ray's log files (pipeline.verbose shows them)
    assert "Execution plan of Dataset" not in out + err and "Full logs are in" not in out + err
    shards = list_shards(str(run_dir / "data" / "shards"))
    assert len(shards) == 3  # 96 samples, 32 per shard
    samples = [s for p in shards for s in iter_shard(p)]
    assert len(samples) == 96 and all(isinstance(s, RawSample) for s in samples)
    assert len({s.key for s in samples}) == 96
    meta = samples[0].meta()
    assert meta["caption"] == samples[0].caption()
    assert shapes.Scene.from_json(meta["scene"]).caption == samples[0].caption()
    rows = pq.read_table(str(run_dir / "data" / "shards" / "00000.parquet")).to_pylist()
    assert [r["key"] for r in rows] == [s.key for s in samples[:32]]
    stats = json.loads((run_dir / "data" / "shards" / "00000_stats.json").read_text())
    assert stats["count"] == 32
    m = json.loads((run_dir / "filter" / "manifest.json").read_text())
    assert m["metrics"]["kept"] + m["metrics"]["dropped"] == 96
    assert m["mlflow_run_id"]

    capsys.readouterr()
    assert _run("run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}") == 0
    assert "every stage is done" in capsys.readouterr().out

    # the data stage is deterministic for a seed
    other = tmp_path / "again"
    assert _run("stage", "data", "preset=smoke", f"run_dir={other}") == 0
    assert _tree_digest(other / "data" / "shards") == _tree_digest(run_dir / "data" / "shards")

    # a filter change re-runs the filter only; a data change re-runs both
    capsys.readouterr()
    assert _run("status", "preset=smoke", f"run_dir={run_dir}", "filter.min_side=20") == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert lines["data"][1] == "done"
    assert lines["filter"][1] == "stale" and "config changed" in " ".join(lines["filter"])
    data_mtime = (run_dir / "data" / "manifest.json").stat().st_mtime
    assert _run("run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}", "filter.min_side=20") == 0
    assert _actions(capsys.readouterr().out) == {"data": "skipped", "filter": "ran"}
    assert (run_dir / "data" / "manifest.json").stat().st_mtime == data_mtime
    assert _run("run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}", "filter.min_side=20", "seed=1") == 0
    assert _actions(capsys.readouterr().out) == {"data": "ran", "filter": "ran"}


def test_status_reports_every_stage(tmp_path, capsys):
    assert _run("status", "preset=smoke", f"run_dir={tmp_path}") == 0
    out = capsys.readouterr().out
    assert "data" in out and "filter" in out and out.count("missing") >= 2


def test_bad_override_is_one_line_error(tmp_path, capsys):
    assert _run("status", "preset=nope", f"run_dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "preset" in err and len(err.splitlines()) == 1


def test_stage_needs_its_inputs(tmp_path, ray_local, capsys):
    assert _run("stage", "filter", "preset=smoke", f"run_dir={tmp_path}") == 2
    assert "needs 'data', which is missing" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_stage_leaves_no_manifest_and_resumes_cleanly(tmp_path):
    """SIGKILL the pipeline while it writes shards; the re-run neither duplicates nor appends."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pipelines", "run", "--until", "filter", "preset=smoke", f"run_dir={run_dir}",
            "data.num_samples=1200", "data.samples_per_shard=20", "ray.num_cpus=1"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    shards = run_dir / "data" / "shards"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if shards.exists() and len(list(shards.glob("*.tar"))) >= 3:
                break
            assert proc.poll() is None, "the pipeline ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no shard appeared in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = len(list(shards.glob("*.tar")))
    assert 3 <= partial < 60
    assert not (run_dir / "data" / "manifest.json").exists()

    status = subprocess.run([sys.executable, "-m", "pipelines", "status", "preset=smoke",
                             f"run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True)
    assert status.returncode == 0 and "missing" in status.stdout

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tars = sorted(shards.glob("*.tar"))
    assert len(tars) == 60
    assert not [p for p in shards.iterdir() if ".tmp-" in p.name]
    keys = [s.key for p in tars for s in iter_shard(str(p))]
    assert len(keys) == 1200 == len(set(keys))
    assert json.loads((run_dir / "filter" / "manifest.json").read_text())["metrics"]["kept"] > 0
