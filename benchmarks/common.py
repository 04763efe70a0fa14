"""Shared benchmark plumbing (BENCH.md) for the scripts in this folder: the implementation lives
in `svgt_fast.bench` (which `svgt-fast bench` uses too); results default to benchmarks/results/
(or $OUT). Figures count only on a GPU; on CPU the scripts just check their harness."""
from __future__ import annotations

import os

from svgt_fast.bench import (copy_bandwidth_gbs, environment, format_table, gpu_telemetry, percentiles,
                             print_table, time_fn, time_graphed)
from svgt_fast.bench import PartialResults
from svgt_fast.bench import write_results as _write_results

__all__ = ["copy_bandwidth_gbs", "environment", "format_table", "gpu_telemetry", "percentiles", "print_table",
           "time_fn", "time_graphed", "write_results", "RESULTS_DIR", "gpu_or_smoke", "decode_ms_per_token", "partial_results"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, rows: list[dict], extra: dict | None = None, plot=None) -> str:
    """Write <out>/<name>.json (and .png when `plot(ax)` is given and matplotlib is present);
    <out> is $OUT, else benchmarks/results/."""
    return _write_results(name, rows, extra, plot, out_dir=os.environ.get("OUT") or RESULTS_DIR)


def partial_results(name: str, extra: dict | None = None) -> PartialResults:
    """Rows of `name` saved as they come (<out>/<name>.partial.json): a step stopped by its time
    limit keeps what it measured; write_results(name, ...) at the end removes the partial file."""
    return PartialResults(name, extra, out_dir=os.environ.get("OUT") or RESULTS_DIR)


def gpu_or_smoke(smoke: bool, interpret: bool = False):
    """(device, dtype) of a benchmark: bf16 on the GPU; fp32 on CPU only for --smoke (a harness
    check: CPU times are not figures). `interpret`: the script runs Triton kernels, so a CPU
    smoke run sets TRITON_INTERPRET (call this before the kernels' modules are imported)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    if not smoke:
        raise SystemExit("no GPU: run with --smoke to check the harness on CPU")
    if interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu", torch.float32


def decode_ms_per_token(model, prompts, steering, engine, new_tokens: int, warmup: bool = False):
    """Decode time per token (ms, the engine's own decode timing: prefill excluded) of one
    generate call of `new_tokens` with EOS disabled, and the call's output. `warmup` first runs a
    short call on the same batch so compilation and graph capture stay out of the figure."""
    import svgt_fast

    if warmup:
        svgt_fast.generate(model, prompts[:, :16], max_new_tokens=8, steering=steering, engine=engine, eos_token_id=[])
    out = svgt_fast.generate(model, prompts, max_new_tokens=new_tokens, steering=steering, engine=engine,
                             eos_token_id=[])
    # the decode steps that ran (fewer than new_tokens - 1 only if every row stopped at
    # non-finite logits: out.finish_reasons says so)
    return out.timings["decode_s"] * 1e3 / max(1, out.timings["steps"] - 1), out
