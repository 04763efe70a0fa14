"""Shared benchmark plumbing (BENCH.md): environment record, CUDA-event timing, copy bandwidth,
JSON + PNG output. Figures count only on a GPU; on CPU the scripts just check their harness."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import torch


def environment() -> dict:
    env = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})",
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        env["commit"] = None
    env.update(gpu_telemetry())
    return env


def gpu_telemetry() -> dict:
    """SM clock, power and memory in use from NVML (nvidia-ml-py), when there is a GPU."""
    if not torch.cuda.is_available():
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return {
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "gpu_mem_used_gb": mem.used / 1e9,
        }
    except Exception as exc:  # telemetry must never break a benchmark run
        return {"nvml_error": repr(exc)}


def time_fn(fn, warmup: int = 3, reps: int = 20) -> dict:
    """Median / p10 / p90 milliseconds of fn(); CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9)}


def time_graphed(fn, calls: int, warmup: int = 3, reps: int = 20) -> dict:
    """Like time_fn, for GPU time without launch gaps: `fn` (which makes `calls` calls, e.g. one
    per rotated input set) is captured once in a CUDA graph and its replays are timed; the
    figures are per call. Falls back to time_fn off CUDA."""
    if not torch.cuda.is_available():
        t = time_fn(fn, warmup=1, reps=3)
        return {k: v / calls for k, v in t.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    t = time_fn(graph.replay, warmup=warmup, reps=reps)
    return {k: v / calls for k, v in t.items()}


def copy_bandwidth_gbs(n_bytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth (read + write bytes / time), the roofline's base."""
    if not torch.cuda.is_available():
        return None
    a = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), warmup=3, reps=10)["median_ms"]
    return 2 * a.numel() / (t * 1e-3) / 1e9


def write_results(name: str, rows: list[dict], extra: dict | None = None, plot=None) -> str:
    """Write <out>/<name>.json (and .png when `plot(ax)` is given and matplotlib is present)."""
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"environment": environment(), "rows": rows, **(extra or {})}, f, indent=2)
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4))
            plot(ax)
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=120)
            plt.close(fig)
        except ImportError:
            print("matplotlib not installed: no PNG written")
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
