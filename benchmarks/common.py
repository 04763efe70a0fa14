"""Shared benchmark plumbing (BENCH.md) for the scripts in this folder: the implementation lives
in `svgt_fast.bench` (which `svgt-fast bench` uses too); results default to benchmarks/results/
(or $OUT). Figures count only on a GPU; on CPU the scripts just check their harness."""
from __future__ import annotations

import os

from svgt_fast.bench import (copy_bandwidth_gbs, environment, format_table, gpu_telemetry, percentiles,
                             print_table, time_fn, time_graphed)
from svgt_fast.bench import write_results as _write_results

__all__ = ["copy_bandwidth_gbs", "environment", "format_table", "gpu_telemetry", "percentiles", "print_table",
           "time_fn", "time_graphed", "write_results", "RESULTS_DIR"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, rows: list[dict], extra: dict | None = None, plot=None) -> str:
    """Write <out>/<name>.json (and .png when `plot(ax)` is given and matplotlib is present);
    <out> is $OUT, else benchmarks/results/."""
    return _write_results(name, rows, extra, plot, out_dir=os.environ.get("OUT") or RESULTS_DIR)
