"""Markdown tables of the JSON files in bench/results (what bench/README.md quotes), so the README
is pasted from measurements, never typed.

    .venv/bin/python -m bench.report [training sampling sampling:ar_prior pipeline_stages ...]

``name:section`` prints the ``rows`` of that section of ``name``'s JSON; ``name-tag`` (a result
written with ``--out bench/results/name-tag.json``, e.g. ``time_to_quality-twemoji``) is printed
with ``name``'s columns.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from bench.common import RESULTS_DIR, RESULTS_ENV, fmt


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


COLUMNS = {
    "training": [("model", "model"), ("batch", "batch"), ("params", "params"),
                 ("step_s", "CPU s / step"), ("samples_per_s", "samples/s"),
                 ("gflop_per_step", "GFLOP / step"), ("achieved_gflops", "GFLOP/s"),
                 ("fraction_of_peak", "of matmul peak")],
    "sampling": [("stage", "stage"), ("setting", "setting"), ("sampler", "sampler"),
                 ("steps", "steps"), ("latency_s", "CPU s"), ("how", "how")],
    "sampling:ar_prior": [("model", "model"), ("size", "layers x width"), ("params", "params"),
                          ("tokens", "tokens"), ("buckets", "buckets"), ("guidance", "guidance"),
                          ("batch_rows", "rows per forward"), ("uncached_s", "uncached CPU s"),
                          ("cached_s", "cached CPU s"), ("speedup", "speed-up"),
                          ("cached_ms_per_token", "cached ms / token"),
                          ("same_samples", "same samples")],
    "pipeline_stages": [("stage", "stage"), ("workers", "workers"), ("items", "items"),
                        ("seconds", "wall s"), ("per_s", "per s"), ("unit", "unit"),
                        ("peak_rss_mb", "peak RSS MB"), ("rss_growth_mb", "RSS growth MB"),
                        ("traced_peak_mb", "traced peak MB"),
                        ("input_mb", "input MB")],
    "scaling": [("model", "model"), ("workers", "workers"), ("batch_per_worker", "batch / worker"),
                ("steps_per_s", "steps/s"), ("samples_per_s", "samples/s"),
                ("speedup_vs_1", "vs 1 worker"), ("wall_with_startup_s", "wall s incl. start-up")],
    "dalle2": [("what", "what"), ("batch", "batch"), ("ours", "ours"), ("theirs", "theirs"),
               ("our_params", "our params"), ("their_params", "their params"),
               ("our_gflop_per_sample", "our GFLOP / sample"),
               ("their_gflop_per_sample", "their GFLOP / sample"), ("equal_work", "within 10%"),
               ("our_s", "our CPU s"), ("their_s", "their CPU s"),
               ("speedup", "their s / our s (samples/s ratio)"), ("our_gflops", "our GFLOP/s"),
               ("their_gflops", "their GFLOP/s"), ("flops_speedup", "FLOP/s ratio")],
    "decoder_profile": [("variant", "variant"), ("what", "what"), ("step_s", "CPU s / step"),
                        ("speedup", "speed-up"), ("speedup_min", "min"), ("speedup_max", "max"),
                        ("achieved_gflops", "GFLOP/s"), ("fraction_of_peak", "of matmul peak"),
                        ("compile_s", "cold compile s"), ("skipped", "skipped")],
    "decoder_profile:profile": [("category", "category"), ("cpu_ms", "CPU ms / step"),
                                ("wall_ms", "profiler wall ms"), ("share", "share of step"),
                                ("op_calls", "op events")],
    "decoder_profile:conv_matmul": [("kind", "kind"), ("gflop", "GFLOP / step"),
                                    ("cpu_ms", "CPU ms / step"), ("share", "share of step"),
                                    ("achieved_gflops", "GFLOP/s"),
                                    ("fraction_of_peak", "of matmul peak")],
    # the prior's columns depend on the learning-rate sweep: every key of its rows, in order
    "time_to_quality": None,
    "time_to_quality_decoder": [("side", "side"), ("lr", "lr"), ("budget", "budget"),
                                ("steps", "steps"), ("clip_cosine", "CLIP cosine"),
                                ("clip_cosine_mismatched", "mismatched"), ("color", "colour"),
                                ("shape", "shape"), ("position", "position")],
    "clip_stage": [("clip stage", "CLIP stage"), ("samples", "samples"), ("epochs", "epochs"),
                   ("seconds", "wall s"), ("speedup", "speed-up"), ("val_recall_at_5", "recall@5")],
}


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(COLUMNS)
    folder = Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)
    for name in names:
        file, _, section = name.partition(":")
        path = folder / f"{file}.json"
        if not path.exists():
            print(f"<!-- {name}: no {path} -->\n")
            continue
        data = json.loads(path.read_text())
        if section:
            if section not in data:
                print(f"<!-- {name}: no {section!r} in {path} -->\n")
                continue
            data = data[section]
        m = data.get("machine", {})
        print(f"<!-- {name}: {m.get('cpu_count')} CPUs, torch {m.get('torch_threads')} thread(s), "
              f"load {fmt(m.get('load_average_1min'))} -->")
        key = name if name in COLUMNS else file.split("-")[0] + (":" + section if section else "")
        if key not in COLUMNS:
            print(f"<!-- {name}: no columns for {key!r}; known: {', '.join(COLUMNS)} -->\n")
            continue
        rows = data["rows"]
        columns = COLUMNS[key] or [(k, k) for k in (rows[0] if rows else {})]
        present = [c for c in columns if any(c[0] in r for r in rows)]  # e.g. no detector off shapes
        print(table(rows, present) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
