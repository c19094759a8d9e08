"""Shared helpers of the benchmark suite: timing, FLOP counting, the machine's matmul peak, tables
and the JSON files under bench/results/.

Every benchmark module exposes ``run(quick: bool, threads: int) -> dict`` (the JSON it wrote, with
a ``rows`` list for the summary table) and ``main(argv)`` for running it alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "UNCLIP_BENCH_RESULTS"  # another folder for the JSON files (tests write to a temp dir)


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (timings on a shared machine are only stable this way)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def machine(threads: int | None = None) -> dict[str, Any]:
    """What ran the benchmark: recorded next to every number."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "load_average_1min": load}


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median (and min, max) wall seconds of ``fn`` after ``warmup`` calls (CUDA synchronized), and
    the median CPU seconds of this process. On a shared, busy machine a 1-thread run's CPU seconds
    are the stable figure (wall time there includes waiting for a core); on an idle machine or a
    GPU, wall time is what counts."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "cpu_median_s": statistics.median(cpu), "repeats": repeats}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_attention_flops() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas for the CPU flash-attention kernels that
    ``F.scaled_dot_product_attention`` dispatches to on CPU: torch (2.14) has none, so attention
    would count as 0 FLOPs on CPU while the same attention written with matmuls counts."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)  # shapes: FlopCounterMode passes tensor shapes

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention, as torch's FlopCounterMode
    counts them, with the CPU attention kernels it misses added)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as fc:
        fn()
    return float(fc.get_total_flops())


_PEAK: dict[tuple[int, str, int], float] = {}


def matmul_peak_gflops(threads: int, device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 matmul throughput (GFLOP/s, median of ``repeats`` n x n products):
    the ceiling the achieved FLOP/s of the training steps are compared against. On the CPU it is
    per CPU-second of ``threads`` threads (contention-free), like the steps' own figures."""
    key = (threads, device, n)
    if key not in _PEAK:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        r = timed(lambda: torch.mm(a, b), repeats, warmup=2)
        t = r["median_s"] if device != "cpu" else r["cpu_median_s"] / threads
        _PEAK[key] = 2 * n**3 / t / 1e9
    return _PEAK[key]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A fresh in-process Ray with explicit CPUs (never attaches to a running cluster unless
    RAY_ADDRESS is set: then the suite measures that cluster); shut down afterwards."""
    import logging

    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        for attempt in range(3):  # a very busy machine can miss Ray's fixed 30 s start-up wait
            try:
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=True,
                         logging_level=logging.WARNING)
                break
            except Exception:  # noqa: BLE001 - retried, then raised
                ray.shutdown()
                if attempt == 2:
                    raise
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()


def results_path(name: str) -> Path:
    """Where ``write_result`` puts benchmark ``name``'s JSON by default."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR) / f"{name}.json"


def write_result(name: str, data: dict[str, Any], out: str | Path | None = None) -> Path:
    path = Path(out) if out else results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def fmt(v: Any) -> str:
    """A table cell: yes / no, thousands separated, floats to 3 significant digits (2 decimals
    from 1, none from 100)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return "" if v is None else str(v)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """A plain fixed-width table of ``columns`` (missing values blank)."""
    if title:
        print(f"\n{title}")
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def description(doc: str) -> str:
    """A module docstring's first paragraph, on one line: ``--help``'s description."""
    return " ".join(doc.split("\n\n")[0].split())


def add_common_args(p) -> None:
    p.add_argument("--quick", action="store_true", help="a short pass (fewer repeats, smaller data)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: stable timings on a shared machine)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json)")


def seconds(t: dict[str, float], threads: int, device: str = "cpu") -> float:
    """The figure rates are computed from: CPU seconds per thread on the CPU, wall on a GPU."""
    return t["median_s"] if device != "cpu" else t["cpu_median_s"] / threads
