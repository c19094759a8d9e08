"""``python -m pipelines``: run the whole pipeline, one stage, show the status of every stage, or
check a preset and size its models without a GPU (plan)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from pipelines.config import ConfigError, load_config
from pipelines.executor import StageError
from pipelines.graph import Graph
from pipelines.runner import StageRun, run
from pipelines.status import StageStatus, evaluate_all
from pipelines.tracking import TrackingError
from unclip.storage import StorageError

EPILOG = """\
overrides are Hydra key=value pairs applied on top of configs/config.yaml, for example:
  preset=smoke|tiny|paper      scale of every stage (default tiny)
  run_dir=URI                  where the run writes everything (default runs/<preset>)
  data.source=shapes|URI       synthetic shapes, or a folder of img2dataset shards (local or s3://)
  filter.min_side=64           any stage setting: `plan` lists every key, its value and its origin
                               (the schema in pipelines/schema/, configs/<stage>/default.yaml, the
                               preset); an unknown key or a bad value exits 2 naming it

environment:
  RAY_ADDRESS          submit each stage as a Ray job to this cluster (default: local Ray)
  MLFLOW_TRACKING_URI  log to this MLflow server (default: sqlite store inside run_dir)
  AWS_*                credentials / endpoint for s3:// URIs (never logged)
"""

PLAN_DESCRIPTION = """\
Check every stage's options against the schema's ranges and each model's own validator (exit 2 with
one line naming the bad key), print each stage's effective config with where each value came from
(default, default.yaml, preset, command line), build every model on the meta device (no memory, no
download, no GPU) and print its parameters beside the paper's Table 3, and its training memory per
GPU (fp32 weights, gradients, AdamW moments, EMA) under DDP and FSDP, with the stage's global batch
and iterations. Then each trained model's step runs on fake tensors for the memory plan: activations
per sample, the per-GPU batch that fits, FLOPs and GPU-hours (--no-measure skips it).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,stage,status,plan,stages}")
    r = sub.add_parser("run", help="run every stage that is not done (make pipeline)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--force", action="store_true", help="re-run every stage, done or not")
    r.add_argument("--until", metavar="STAGE", help="stop after this stage (and its inputs)")
    r.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    s = sub.add_parser("stage", help="run one stage (make stage STAGE=name)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("name", help="stage name (see `stages`)")
    s.add_argument("--force", action="store_true", help="re-run it even when it is done")
    s.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    st = sub.add_parser("status", help="print every stage as done / stale / missing (make status)")
    st.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    pl = sub.add_parser("plan", help="check every stage's options, print each model's size and training "
                        "memory per GPU; no GPU, no download (make plan)", epilog=EPILOG,
                        description=PLAN_DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("--no-measure", action="store_true",
                    help="check and size only: skip the activation memory plan and FLOPs, which run "
                         "each trained model's step on fake tensors (about a minute for preset=paper "
                         "on 2 cores)")
    pl.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    sub.add_parser("stages", help="list the stages, their inputs and what they do")
    return p


def _status_table(statuses: dict[str, StageStatus]) -> str:
    rows = [("stage", "state", "finished", "seconds", "why / artifacts")]
    for st in statuses.values():
        m = st.manifest
        detail = "; ".join(st.reasons) if st.reasons else ""
        if m is not None and not detail:
            detail = ", ".join(f"{k}={v}" for k, v in m.outputs.items())
        rows.append((st.name, st.state, m.finished_at if m else "-",
                     f"{m.duration_s:.1f}" if m else "-", detail))
    return _table(rows)


def _report_table(report: list[StageRun]) -> str:
    rows = [("stage", "action", "seconds", "why")]
    rows += [(r.name, r.action, f"{r.seconds:.1f}", r.note) for r in report]
    rows.append(("total", "", f"{sum(r.seconds for r in report):.1f}", ""))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + str(r[-1]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`stage embed --force key=value`): argparse leaves them over
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="[unclip] %(message)s", stream=sys.stdout)
    for noisy in ("botocore", "aiobotocore", "s3fs", "urllib3", "alembic", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # credential lookups, SQL migrations
    warnings.filterwarnings("ignore", category=FutureWarning)
    graph = Graph()
    if args.command == "stages":
        for s in graph.stages:
            print(f"{s.name:10s} reads {', '.join(s.inputs) or '-':18s} {s.description}")
        return 0
    try:
        cfg = load_config(args.overrides)
        if args.command == "status":
            print(f"run_dir: {cfg.run_dir}")
            print(_status_table(evaluate_all(graph, cfg)))
            return 0
        if args.command == "plan":
            from pipelines.plan import format_plan, make_plan
            from pipelines.plan.origins import format_origins, origins

            plan = make_plan(cfg, measure=not args.no_measure)  # a bad option fails here, before anything is printed
            print(format_origins(origins(args.overrides)), "", format_plan(plan), sep="\n")
            return 0
        if args.command == "stage":
            report = run(graph, cfg, args.overrides, stages=[args.name], force=args.force)
        else:
            stages = None
            if args.until:
                stages = [*graph.upstream(args.until), graph[args.until].name]
            report = run(graph, cfg, args.overrides, stages=stages, force=args.force)
    except (ConfigError, StageError, KeyError, StorageError, TrackingError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(_report_table(report))
    if all(r.action == "skipped" for r in report):
        print("every stage is done: nothing to do")
    return 0
