"""``python -m bench`` (``make bench``): run every benchmark, print one summary table, write
bench/results/summary.json (each benchmark also writes its own bench/results/<name>.json).

    make bench                          # the full suite (~15 min on 2 CPU cores, plus
                                        # decoder_profile's two cold torch.compile runs: ~10 min)
    make bench ARGS="--quick"           # a short pass (~2-3 min)
    make bench ARGS="--only training"   # one benchmark (repeatable: --only a --only b)
    make bench ARGS="--run-dir RUN"     # and the ones that need a finished run (RUN: its run_dir):
                                        # quality per sampling step of each finished stage, the
                                        # prior's and decoder's time to quality against
                                        # dalle2-pytorch (the decoder's alone: 4 x 480 CPU s)

Benchmarks report; they never assert speeds. A failing benchmark is reported in the summary and
the others still run (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from typing import Any

from bench import common

# name -> module; cheapest first
BENCHMARKS = {
    "training": "bench.training",
    "sampling": "bench.sampling",
    "pipeline_stages": "bench.pipeline_stages",
    "scaling": "bench.scaling",
    "dalle2": "bench.dalle2",
    "decoder_profile": "bench.decoder_profile",
    "clip_stage": "bench.clip_stage",
    "text_tokens": "bench.text_tokens",
    "serving": "bench.serving",
}
# on a finished run (--run-dir): its own models and data, not synthetic ones; the time-to-quality
# pair builds dalle2-pytorch's venv on first use (bench/dalle2_env.py, ~5 min)
RUN_BENCHMARKS = {
    "step_quality": "bench.step_quality",
    "time_to_quality": "bench.time_to_quality",
    "time_to_quality_decoder": "bench.time_to_quality_decoder",
}
ALL = {**BENCHMARKS, **RUN_BENCHMARKS}
# minutes each even when short (three pipeline runs; a paper-size text tower), or over a minute
# (decoder_profile: 15 decoder steps and a profiled one, ~70 s): run with --only
QUICK_SKIP = {"clip_stage", "text_tokens", "decoder_profile"}


def summary_rows(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per measured item: benchmark, item, value, unit."""
    out = []
    for r in result.get("rows", []):
        if name == "training":
            out.append((f"{r['model']} step (batch {r['batch']})", r["samples_per_s"], "samples/s",
                        f"{r['achieved_gflops']:.1f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of peak"))
        elif name == "sampling":
            out.append((f"{r['stage']} {r['setting']} ({r['sampler']}, {r['steps']} steps)",
                        r["latency_s"], "s", r["how"]))
        elif name == "pipeline_stages":
            note = f"peak RSS {r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else ""
            out.append((f"{r['stage']}, {r['workers']} worker(s)", r["per_s"], r["unit"], note))
        elif name == "scaling":
            out.append((f"{r['model']} Ray Train, {r['workers']} worker(s)", r["samples_per_s"],
                        "samples/s", f"x{r['speedup_vs_1']:.2f} vs 1 worker"))
        elif name == "clip_stage":
            out.append((f"CLIP stage, {r['clip stage']} ({r['samples']} samples, {r['epochs']} epochs)",
                        r["seconds"], "s", f"x{r['speedup']:.2f}" if "speedup" in r else ""))
        elif name == "serving":
            out.append((f"unclip serve /generate, {r['clients']} client(s), {r['requests']} requests",
                        r["req_per_s"], "req/s", f"p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s, "
                                                  f"mean batch {r['mean_batch']:.1f} ({result['device']})"))
        elif name == "decoder_profile":
            if "speedup" in r:
                note = (f"{r['step_s']:.3g} CPU s/step, {r['achieved_gflops']:.1f} GFLOP/s = "
                        f"{100 * r['fraction_of_peak']:.0f}% of matmul peak")
                if r.get("compile_s"):
                    note += f", cold compile {r['compile_s']:.0f} s"
                out.append((f"decoder step: {r['variant']} ({r['what']})", r["speedup"],
                            "x vs baseline", note))
            else:
                out.append((f"decoder step: {r['variant']} ({r['what']})", None, "",
                            f"skipped: {r.get('skipped', '')}"))
        elif name == "dalle2":
            out.append((f"{r['what']}: {r['ours']} vs {r['theirs']}", r["speedup"],
                        "x (their s / our s)", f"ours {r['our_s']:.3g} s, theirs {r['their_s']:.3g} s"))
    if name == "step_quality":
        out += step_quality_rows(result)
    elif name == "time_to_quality":
        for r in result["rows"]:
            lr, best = max(((k.split()[-1], v) for k, v in r.items() if k.startswith("theirs lr")),
                           key=lambda kv: kv[1])
            out.append((f"prior time to quality, {r['budget']} of {result['budget_s']:g} CPU s", r["ours"],
                        "held-out cosine", f"theirs {best:.3f} (best of lrs, {lr}); "
                                           f"z_t {result['baselines']['z_t']:.3f}; our steps {r['our_steps']}"))
    elif name == "time_to_quality_decoder":
        for budget in dict.fromkeys(r["budget"] for r in result["rows"]):
            at = [r for r in result["rows"] if r["budget"] == budget]
            ours = next(r for r in at if r["side"] == "ours")
            best = max((r for r in at if r["side"] == "theirs"), key=lambda r: r["clip_cosine"])
            note = f"theirs {best['clip_cosine']:.3f} (best of lrs, {best['lr']:g})"
            if "color" in ours:
                note += f"; colour {ours['color']:.2f} vs {best['color']:.2f}"
            out.append((f"decoder time to quality, {budget} of {result['budget_s']:g} CPU s",
                        ours["clip_cosine"], "held-out CLIP cosine", note + f"; steps {ours['steps']} vs {best['steps']}"))
    if name == "sampling":
        for r in result.get("ar_prior", {}).get("rows", []):
            out.append((f"AR prior {r['model']} sampling, {r['tokens']} tokens, guidance {r['guidance']:g}: "
                        f"cache vs none", r["speedup"], "x (uncached s / cached s)",
                        f"cached {r['cached_s']:.3g} s, uncached {r['uncached_s']:.3g} s"
                        + ("" if r["same_samples"] else ", samples DIFFER")))
    for res in result.get("results", []):  # text_tokens
        for r in res["rows"]:
            out.append((f"{res['config']} {r['option']}", r["ms_per_sample"], "ms/sample", ""))
    return [{"benchmark": name, "item": i, "value": v, "unit": u, "note": n} for i, v, u, n in out]


def step_quality_rows(result: dict[str, Any]) -> list[tuple]:
    """One line per stage x sampler x step count: the stage's first metric, the rest in the note."""
    from bench.step_quality import METRICS

    out = []
    for r in result["rows"]:
        if "note" in r:
            out.append((f"{r['stage']}: {r['note']}", None, "", ""))
            continue
        (key, label), *rest = [(k, lab) for k, lab in METRICS[r["stage"]] if k in r]
        out.append((f"{r['stage']} {r['sampler']} {r['steps']} steps" + (" (configured)" if r["configured"] else ""),
                    r[key], label, ", ".join(f"{lab} {r[k]:.3f}" for k, lab in rest) + f"; {r['n']} held out"))
    for stage in result.get("not_finished", []):
        out.append((f"{stage}: not finished in this run", None, "", ""))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    p.add_argument("--quick", action="store_true", help="a short pass of every benchmark")
    p.add_argument("--only", action="append", choices=sorted(ALL),
                   help="run only this benchmark (repeatable)")
    p.add_argument("--run-dir", metavar="RUN", default=None,
                   help="a finished run (a pipeline's run_dir): also run " + ", ".join(RUN_BENCHMARKS)
                        + " on its models and data")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.run_dir is not None:
        from pipelines.manifest import read_manifest

        if read_manifest(a.run_dir, "filter") is None:
            p.error(f"--run-dir {a.run_dir}: no finished filter stage there; give the run_dir of a "
                    "pipeline run (python -m pipelines run ... run_dir=RUN)")
    names = a.only or ([n for n in BENCHMARKS if not (a.quick and n in QUICK_SKIP)]
                       + (list(RUN_BENCHMARKS) if a.run_dir else []))
    needs_run = [n for n in names if n in RUN_BENCHMARKS]
    if needs_run and a.run_dir is None:
        p.error(f"{', '.join(needs_run)}: measures a finished run; give --run-dir RUN")
    rows, status = [], {}
    t_all = time.perf_counter()
    for name in names:
        mod = importlib.import_module(ALL[name])
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            if name == "text_tokens":
                mod.main(["--threads", str(a.threads)] + (["--skip-paper"] if a.quick else []))
                import json

                result = json.loads(mod.RESULTS.read_text())
            elif name in RUN_BENCHMARKS:
                result = mod.run_on(a.run_dir, quick=a.quick, threads=a.threads)
            else:
                result = mod.run(quick=a.quick, threads=a.threads)
            status[name] = {"ok": True, "seconds": time.perf_counter() - t0}
            rows += summary_rows(name, result)
        except SystemExit as exc:  # a run this benchmark does not apply to (e.g. an AR prior)
            status[name] = {"ok": True, "seconds": time.perf_counter() - t0, "skipped": str(exc)}
            rows.append({"benchmark": name, "item": "skipped", "value": None, "unit": "",
                         "note": str(exc)[:160]})
        except Exception as exc:  # noqa: BLE001 - report and carry on with the others
            traceback.print_exc()
            status[name] = {"ok": False, "seconds": time.perf_counter() - t0, "error": repr(exc)}
            rows.append({"benchmark": name, "item": "FAILED", "value": None, "unit": "",
                         "note": repr(exc)[:120]})
    if a.run_dir is None and not a.only:
        rows += [{"benchmark": n, "item": "not run", "value": None, "unit": "",
                  "note": "measures a finished run: make bench ARGS=\"--run-dir RUN\""} for n in RUN_BENCHMARKS]
    common.print_table(rows, ["benchmark", "item", "value", "unit", "note"],
                       f"summary ({'quick' if a.quick else 'full'}; torch {a.threads} thread(s); "
                       f"{time.perf_counter() - t_all:.0f} s)")
    path = common.write_result("summary", {"quick": a.quick, "run_dir": a.run_dir,
                                           "machine": common.machine(a.threads),
                                           "benchmarks": status, "rows": rows})
    print(f"wrote {path}")
    return 0 if all(s["ok"] for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
