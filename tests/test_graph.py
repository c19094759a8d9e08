"""Stage-graph logic on real manifests: done / stale / missing and what a change invalidates."""

from __future__ import annotations

import pathlib

import pytest
from omegaconf import OmegaConf

from pipelines.graph import Graph, StageSpec
from pipelines.manifest import Manifest, code_version, write_manifest
from pipelines.status import DONE, MISSING, STALE, evaluate_all, stage_config_hash

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOY = (
    StageSpec("a", (), ("a",), "x:y"),
    StageSpec("b", ("a",), ("b",), "x:y"),
    StageSpec("c", ("b",), ("c",), "x:y"),
    StageSpec("d", ("a",), ("d",), "x:y"),
)


def _cfg(tmp_path, **vals):
    base = {"run_dir": str(tmp_path), "pipeline": {"code_version_invalidates": False},
            "a": {"v": 1}, "b": {"v": 1}, "c": {"v": 1}, "d": {"v": 1}}
    for k, v in vals.items():
        base[k] = {"v": v}
    return OmegaConf.create(base)


def _finish(graph, cfg, name):
    spec = graph[name]
    statuses = evaluate_all(graph, cfg)
    m = Manifest(stage=name, config_hash=stage_config_hash(spec, cfg),
                 inputs={u: statuses[u].manifest.digest for u in spec.inputs},
                 code_version=code_version(), outputs={"out": f"{cfg.run_dir}/{name}"})
    write_manifest(cfg.run_dir, m)


def _states(graph, cfg):
    return {k: v.state for k, v in evaluate_all(graph, cfg).items()}


def test_graph_order_and_neighbours():
    g = Graph(TOY)
    assert g.downstream("b") == ["b", "c"]
    assert g.downstream("a") == ["a", "b", "c", "d"]
    assert g.upstream("c") == ["a", "b"]
    with pytest.raises(ValueError):
        Graph((StageSpec("b", ("a",), (), "x:y"),))
    with pytest.raises(KeyError, match="unknown stage"):
        g["nope"]


def test_config_change_invalidates_only_downstream(tmp_path):
    g = Graph(TOY)
    cfg = _cfg(tmp_path)
    assert set(_states(g, cfg).values()) == {MISSING}
    for name in "abcd":
        _finish(g, cfg, name)
    assert set(_states(g, cfg).values()) == {DONE}
    changed = _cfg(tmp_path, b=2)
    assert _states(g, changed) == {"a": DONE, "b": STALE, "c": STALE, "d": DONE}
    assert evaluate_all(g, changed)["c"].reasons == ["input b is stale"]
    _finish(g, changed, "b")   # re-running b changes its digest: c must re-run too
    st = evaluate_all(g, changed)
    assert st["c"].state == STALE and st["c"].reasons == ["input b changed"]
    _finish(g, changed, "c")
    assert set(_states(g, changed).values()) == {DONE}


def test_code_version_flag(tmp_path, monkeypatch):
    g = Graph(TOY)
    cfg = _cfg(tmp_path)
    for name in "abcd":
        _finish(g, cfg, name)
    import pipelines.status as status

    monkeypatch.setattr(status, "code_version", lambda: {"source_sha": "something-else"})
    assert set(_states(g, cfg).values()) == {DONE}          # recorded, not enforced by default
    cfg.pipeline.code_version_invalidates = True
    assert set(_states(g, cfg).values()) == {STALE}


def test_unreadable_manifest_counts_as_missing(tmp_path):
    g = Graph(TOY)
    cfg = _cfg(tmp_path)
    _finish(g, cfg, "a")
    (tmp_path / "a" / "manifest.json").write_text("{not json")
    assert _states(g, cfg)["a"] == MISSING


OPS = (
    StageSpec("a", (), ("a",), "x:y", operational=("log_every", "train.threads")),
    StageSpec("b", ("a",), ("b",), "x:y"),
)


def _ops_cfg(tmp_path, v=1, log_every=5, threads=2):
    return OmegaConf.create({"run_dir": str(tmp_path), "pipeline": {"code_version_invalidates": False},
                             "a": {"v": v, "log_every": log_every, "train": {"threads": threads, "lr": 1}},
                             "b": {"v": 1}})


def test_operational_keys_do_not_invalidate(tmp_path):
    """Logging cadence or threads cannot change a result: the stage stays done. A result key
    re-runs it and everything downstream."""
    g = Graph(OPS)
    cfg = _ops_cfg(tmp_path)
    for name in "ab":
        _finish(g, cfg, name)
    assert set(_states(g, _ops_cfg(tmp_path, log_every=50, threads=8)).values()) == {DONE}
    assert _states(g, _ops_cfg(tmp_path, v=2)) == {"a": STALE, "b": STALE}
    assert stage_config_hash(g["a"], cfg) == stage_config_hash(g["a"], _ops_cfg(tmp_path, threads=1))
    assert stage_config_hash(g["a"], cfg) != stage_config_hash(g["a"], _ops_cfg(tmp_path, v=3))


def test_run_directory_from_before_the_rule_stays_done(tmp_path):
    """Manifests written when the hash covered the whole subtree (no hash_version) keep their
    digests and stay done while that subtree is unchanged; a changed result key is still stale."""
    import hashlib
    import json
    from dataclasses import asdict

    from pipelines.manifest import read_manifest
    from pipelines.status import legacy_config_hash

    g = Graph(OPS)
    cfg = _ops_cfg(tmp_path)
    old = Manifest(stage="a", config_hash=legacy_config_hash(g["a"], cfg), inputs={},
                   code_version=code_version(), outputs={})
    record = {k: v for k, v in asdict(old).items() if k != "hash_version"}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(record))
    back = read_manifest(str(tmp_path), "a")
    assert back.hash_version == 1
    assert back.digest == hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()
                                         ).hexdigest()[:16]  # what downstream manifests recorded
    assert _states(g, cfg)["a"] == DONE
    assert _states(g, _ops_cfg(tmp_path, v=2))["a"] == STALE


def test_every_declared_operational_key_exists():
    """A typo in a stage's operational list would silently put a key back into the hash."""
    from omegaconf import OmegaConf

    from pipelines import schema
    from pipelines.graph import STAGES

    d = OmegaConf.to_container(schema.node())
    for spec in STAGES:
        for dotted in spec.operational:
            node = d[spec.config_keys[0]]
            for part in dotted.split("."):
                assert isinstance(node, dict) and part in node, (spec.name, dotted)
                node = node[part]


# ---- the stage contract --------------------------------------------------------------------------


def test_reads_must_name_declared_outputs_of_inputs():
    a = StageSpec("a", (), ("a",), "x:y", outputs=("shards",))
    assert Graph((a, StageSpec("b", ("a",), ("b",), "x:y", reads=("a.shards",))))
    with pytest.raises(ValueError, match=r"reads a.model, but 'a' declares only the outputs \['shards'\]"):
        Graph((a, StageSpec("b", ("a",), ("b",), "x:y", reads=("a.model",))))
    with pytest.raises(ValueError, match="'c' is not one of its inputs"):
        Graph((a, StageSpec("c", (), ("c",), "x:y"), StageSpec("b", ("a",), ("b",), "x:y", reads=("c.x",))))


def test_every_stage_declares_its_outputs_and_what_it_reads():
    """The real graph builds (every read is a declared output of an input) and every stage module
    reads only what its spec declares: each ``ctx.input(stage, output)`` in its source is listed."""
    import re

    g = Graph()
    for spec in g.stages:
        assert spec.outputs, spec.name
        source = (ROOT / (spec.entry.split(":")[0].replace(".", "/") + ".py")).read_text()
        used = {f"{s}.{o}" for s, o in re.findall(r"ctx\.input\(\"(\w+)\", \"(\w+)\"\)", source)}
        assert used <= set(spec.reads), (spec.name, used - set(spec.reads))


def test_context_refuses_an_undeclared_read():
    from stages.contract import StageContext

    up = Manifest(stage="a", config_hash="h", inputs={}, code_version="v", outputs={"shards": "s3://x"})
    ctx = StageContext(OmegaConf.create({}), "b", "/tmp/b", {"a": up}, reads=("a.shards",))
    assert ctx.input("a", "shards") == "s3://x"
    with pytest.raises(KeyError, match="does not declare"):
        ctx.input("a", "model")


def test_a_stage_returning_other_outputs_than_declared_fails_naming_them():
    from pipelines.executor import StageError, _check_outputs
    from stages.contract import StageResult

    spec = StageSpec("a", (), ("a",), "x:y", outputs=("model", "registered"))
    _check_outputs(spec, StageResult({"model": "m", "registered": "r"}))
    with pytest.raises(StageError, match=r"missing \['registered'\], undeclared \['extra'\]"):
        _check_outputs(spec, StageResult({"model": "m", "extra": "e"}))


def test_stages_never_import_the_orchestrator():
    """pipelines -> stages -> unclip: no module under stages/ imports pipelines, none under unclip/
    imports stages or pipelines (checked on the source, imports inside functions included)."""
    import re

    for folder, banned in (("stages", ("pipelines",)), ("unclip", ("pipelines", "stages"))):
        for path in (ROOT / folder).rglob("*.py"):
            for mod in re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.M):
                assert mod.split(".")[0] not in banned, f"{path} imports {mod}"
