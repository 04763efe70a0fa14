"""End-to-end generation benchmark (BENCH.md) and the plumbing the benchmark scripts share.

`svgt-fast bench` and `benchmarks/bench_generate.py` both run `generate_bench`; the other
scripts under benchmarks/ import the timing and output helpers through benchmarks/common.py.
Figures count only on a GPU; on a CPU the run checks that the harness works.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time

import torch

# ---- backbone shapes with random weights (timing does not depend on weight values) -------------
SHAPES = {
    # Llama-3-8B: d 4096, 32 layers, 32/8 heads, head 128, SwiGLU 14336, vocab 128256; the RoPE and
    # context of Llama-3.1-8B's config (llama3 scaling of an 8192-position original to 131072; HF
    # warns when the two are equal). The frequencies do not depend on the context; engines are
    # sized by their max_seq_len, never by it.
    "llama3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen2.5-0.5B-like: the small shape where launch overhead dominates.
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, sliding_window=None),
    # CPU harness checks only.
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=257, max_position_embeddings=1024),
    "tiny8": dict(model_type="llama", hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=257, max_position_embeddings=1024),
}
CPU_SHAPES = ("tiny", "tiny8")


def build_random_model(shape: str, device, dtype, **overrides):
    """A causal LM of a named shape (SHAPES), config fields overridden by `overrides` (e.g.
    num_hidden_layers), with seeded random weights, built on `device`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; named shapes: {', '.join(SHAPES)}")
    return random_model(dict(SHAPES[shape], **overrides), device, dtype)


def random_model(config_args: dict, device, dtype):
    """A causal LM from config arguments (model_type and the config's fields) with seeded random
    weights, built on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    args = dict(config_args)
    cfg = AutoConfig.for_model(args.pop("model_type"), **args)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


# ---- environment record ------------------------------------------------------------------------
def environment() -> dict:
    """Device, versions, commit and GPU telemetry of this run."""
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
                                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        env["commit"] = None
    env.update(gpu_telemetry())
    return env


def gpu_telemetry() -> dict:
    """SM clock, power and memory in use from NVML (nvidia-ml-py) when there is a GPU; otherwise
    {"gpu_telemetry": "absent: <why>"}, so a result file always says whether it was recorded."""
    if not torch.cuda.is_available():
        return {"gpu_telemetry": "absent: no CUDA device"}
    try:
        import pynvml
    except ImportError:
        return {"gpu_telemetry": "absent: nvidia-ml-py (pynvml) not installed"}
    try:
        pynvml.nvmlInit()
        h, matched = _nvml_handle(pynvml, torch.cuda.current_device())
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return {
            "gpu_telemetry": "nvml",
            "nvml_device_matched_by": matched,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "gpu_mem_used_gb": mem.used / 1e9,
            "gpu_mem_total_gb": mem.total / 1e9,
        }
    except Exception as exc:  # telemetry must never break a benchmark run
        return {"gpu_telemetry": f"absent: NVML error {exc!r}"}


def _nvml_handle(pynvml, device: int):
    """NVML's handle of torch's CUDA device `device`, matched by UUID: NVML numbers every GPU of
    the machine while torch numbers only those CUDA_VISIBLE_DEVICES lets it see, so the index is
    the fallback only (the JSON says which matched)."""
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"), "uuid"
    except Exception:  # an old torch without .uuid, or NVML does not know it
        return pynvml.nvmlDeviceGetHandleByIndex(device), "index"


# ---- timing ------------------------------------------------------------------------------------
def measured_on(device):
    """Make CUDA `device` current for a block (a no-op off CUDA): the helpers here (events, syncs,
    copy bandwidth, peak memory, telemetry, the environment's device name) measure the current
    device, so a model on cuda:1 is timed on cuda:1, not on whichever device was current."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
    return percentiles(times, "_ms", median_key="median_ms")


def percentiles(values: list[float], suffix: str = "", median_key: str | None = None) -> dict:
    """{"p10"+suffix, median, "p90"+suffix} of a list (nearest-rank percentiles)."""
    v = sorted(values)
    q = lambda f: v[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
    return {median_key or f"median{suffix}": statistics.median(v), f"p10{suffix}": q(0.1), f"p90{suffix}": q(0.9)}


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


# ---- output ------------------------------------------------------------------------------------
def write_results(name: str, rows: list[dict], extra: dict | None = None, plot=None, out_dir: str | None = None) -> str:
    """Write <out_dir>/<name>.json (environment + rows + extra) and <name>.png when `plot(ax)` is
    given and matplotlib is installed. out_dir defaults to $OUT, else the current directory."""
    out_dir = out_dir or os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"environment": environment(), "rows": rows, **(extra or {})}, f, indent=2)
    partial = os.path.join(out_dir, f"{name}.partial.json")
    if os.path.exists(partial):  # superseded by the complete result
        os.remove(partial)
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no PNG written")
            return path
        fig, ax = plt.subplots(figsize=(7, 4))
        plot(ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=120)
        plt.close(fig)
    return path


class PartialResults:
    """<out_dir>/<name>.partial.json rewritten with every row as it is measured, so a run stopped
    by its time limit (gpu_check.sh's steps) still leaves what it had; write_results of the same
    name removes it. Call the object with the rows so far."""

    def __init__(self, name: str, extra: dict | None = None, out_dir: str | None = None):
        out_dir = out_dir or os.environ.get("OUT") or "."
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, f"{name}.partial.json")
        self.extra = dict(extra or {})
        self.env = environment()  # once: telemetry at the start of the run

    def __call__(self, rows: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:  # write then rename: a kill mid-write leaves the previous file
            json.dump({"environment": self.env, "partial": True, "rows": rows, **self.extra}, f, indent=2)
        os.replace(tmp, self.path)


def format_table(rows: list[dict], cols: list[str]) -> str:
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(format_table(rows, cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ---- the end-to-end benchmark ------------------------------------------------------------------
TABLE_COLUMNS = ["what", "batch", "rep", "ms_per_token", "ms_p10", "ms_median", "ms_p90", "tokens_per_s",
                 "prefill_ms", "peak_mem_gb", "pct_of_floor", "ratio_vs_unsteered", "engine_speedup",
                 "engine_svgt_speedup", "refresh_steps", "refresh_ms", "graph_steps", "nonfinite_rows"]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _engine_run(model, eng, prompts, n_new: int, steering) -> dict:
    from .api import generate

    out = generate(model, prompts, max_new_tokens=n_new, steering=steering, engine=eng, eos_token_id=[])
    t = out.timings
    # the decode steps that ran: n_new - 1, unless every row stopped early at non-finite logits
    # (random weights or a strength that overflows), which nonfinite_rows then shows
    steps = max(1, t["steps"] - 1)
    return {"ms_per_token": t["decode_s"] * 1e3 / steps, "prefill_ms": t["prefill_s"] * 1e3,
            "refresh_steps": t["refresh_steps"], "graph_steps": t.get("graph_steps", 0),
            "refresh_ms": t["refresh_s"] * 1e3, "nonfinite_rows": out.finish_reasons.count("nonfinite")}


def _step_ms(model, eng, prompts, n_new: int, steering) -> list[float]:
    """Per-step latencies of one streamed run: the gaps between consecutive steps' arrival on
    the host (the stream hands out one step per sync, the device one step ahead on CUDA)."""
    from .api import generate

    arrivals = [time.perf_counter() for ev in generate(model, prompts, max_new_tokens=n_new, steering=steering,
                                                       engine=eng, eos_token_id=[], stream=True) if not ev.final]
    return [(b - a) * 1e3 for a, b in zip(arrivals[:-1], arrivals[1:])] or [0.0]


def _hf_ms_per_token(model, ids, n_new: int) -> float:
    def run(n):
        _sync()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        _sync()
        return time.perf_counter() - t
    run(2)
    return (run(n_new + 1) - run(1)) * 1e3 / n_new


def generate_bench(model, *, module=None, batches=(1, 16), prompt: int = 512, new_tokens: int = 256,
                   modes=("exact",), intervals=(5,), baselines: bool = True, step_percentiles: bool = True,
                   smoke: bool = False, log=print, checkpoint=None) -> tuple[list[dict], dict]:
    """The BENCH.md end-to-end table: per batch, the engine unsteered and with SVGT (K of
    `module`, default a random K=5 module) for every refresh mode x interval, each timed twice
    after a warm-up; HF `generate` and (batch 1) the eager recompute loop beside. Returns
    (rows, extra) ready for write_results; `checkpoint(rows)` (e.g. a PartialResults) is called
    after every row. Runs with the model's device current (measured_on)."""
    with measured_on(next(model.parameters()).device):
        return _generate_bench(model, module=module, batches=batches, prompt=prompt, new_tokens=new_tokens,
                               modes=modes, intervals=intervals, baselines=baselines,
                               step_percentiles=step_percentiles, smoke=smoke, log=log, checkpoint=checkpoint)


def _generate_bench(model, *, module, batches, prompt, new_tokens, modes, intervals, baselines, step_percentiles,
                    smoke, log, checkpoint):
    checkpoint = checkpoint or (lambda rows: None)
    from .api import generate
    from .engine import Engine
    from .steering import SVGT
    from .tiny import build_value_module

    cuda = next(model.parameters()).device.type == "cuda"
    if module is None:
        module = build_value_module(model, seed=0, n_intervention_tokens=5)
    k = module.config.n_intervention_tokens
    eng = Engine(model, max_batch=max(batches), max_seq_len=prompt + new_tokens + 8)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # A decode step reads every weight but the input embedding, of which it gathers B rows (unless
    # it is tied to the LM head, which reads it whole): the floor counts the bytes read. 16.06 GB
    # at the 8B shape (BENCH.md's anchor, every parameter) is 15.01 GB read.
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    unread_bytes = 0 if tied else embed.numel() * embed.element_size()
    bw = copy_bandwidth_gbs()
    vocab = model.config.vocab_size
    rows = []
    g = torch.Generator().manual_seed(0)
    for B in batches:
        prompts = torch.randint(0, vocab, (B, prompt), generator=g)
        kv_bytes_avg = (2 * len(eng.w.layers) * B * eng.w.n_kv_heads * eng.w.head_dim * model.dtype.itemsize
                        * (prompt + new_tokens / 2))
        read_bytes = weight_bytes - unread_bytes + (0 if tied else B * embed.shape[1] * embed.element_size())
        floor_ms = (read_bytes + kv_bytes_avg) / (bw * 1e9) * 1e3 if bw else None
        floor_all_ms = (weight_bytes + kv_bytes_avg) / (bw * 1e9) * 1e3 if bw else None
        configs = [("engine_unsteered", None)] + [
            (f"engine_svgt_{m}_k{k}_r{r}", SVGT(module, refresh_interval=r, refresh=m))
            for m in modes for r in intervals]
        plain_ms = None
        for what, steering in configs:
            _engine_run(model, eng, prompts, 8, steering)  # warm-up: compiles and captures graphs
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for rep in (1, 2):
                res = _engine_run(model, eng, prompts, new_tokens, steering)
                row = dict(what=what, batch=B, rep=rep, **res, tokens_per_s=B * 1e3 / res["ms_per_token"])
                if cuda:
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
                if steering is None:
                    row["pct_of_floor"] = floor_ms / res["ms_per_token"] * 100 if floor_ms else None
                    # against BENCH.md's anchor floor, which counts the input embedding as read
                    row["pct_of_floor_all_params"] = floor_all_ms / res["ms_per_token"] * 100 if floor_ms else None
                    plain_ms = res["ms_per_token"] if plain_ms is None else min(plain_ms, res["ms_per_token"])
                else:
                    row["ratio_vs_unsteered"] = res["ms_per_token"] / plain_ms
                if rep == 2 and step_percentiles:
                    p = percentiles(_step_ms(model, eng, prompts, new_tokens, steering))
                    row.update(ms_p10=p["p10"], ms_median=p["median"], ms_p90=p["p90"])
                rows.append(row)
                checkpoint(rows)
                log(f"  {what} batch {B} rep {rep}: {row['ms_per_token']:.3f} ms/token")
        if not baselines:
            continue
        hf = _hf_ms_per_token(model, prompts.to(eng.device), 8 if smoke else 32)
        rows.append(dict(what="hf_generate", batch=B, rep=1, ms_per_token=hf, tokens_per_s=B * 1e3 / hf,
                         engine_speedup=hf / plain_ms))
        checkpoint(rows)
        if B == 1:  # the authors' recompute loop (our eager oracle), a few tokens
            n = 4 if smoke else 16
            steering = SVGT(module, refresh_interval=5)
            _sync()
            t = time.perf_counter()
            generate(model, prompts[:1], max_new_tokens=n, steering=steering, engine="reference", eos_token_id=[])
            _sync()
            ref_ms = (time.perf_counter() - t) * 1e3 / n
            st = [r["ms_per_token"] for r in rows if r["what"] == f"engine_svgt_exact_k{k}_r5" and r["batch"] == 1]
            rows.append(dict(what="eager_svgt_reference_r5", batch=1, rep=1, ms_per_token=ref_ms,
                             engine_svgt_speedup=ref_ms / min(st) if st else None,
                             ratio_vs_unsteered=ref_ms / plain_ms))
            checkpoint(rows)
    extra = {"modes": list(modes), "intervals": list(intervals), "prompt": prompt, "new_tokens": new_tokens,
             "batches": list(batches), "bridge_tokens": k, "weight_bytes": weight_bytes,
             "weight_bytes_read_per_step": weight_bytes - unread_bytes, "copy_bandwidth_gbs": bw,
             "dtype": str(model.dtype).replace("torch.", ""),
             "ms_percentiles": "ms_p10 / ms_median / ms_p90: per-step gaps of one streamed run (rep 2 rows)"}
    return rows, extra


def plot_generate(rows: list[dict], title: str):
    """plot(ax) for write_results: ms/token of every configuration (rep 1), log scale."""
    def plot(ax):
        sel = [r for r in rows if r["rep"] == 1]
        ax.bar([f"{r['what']}\nB={r['batch']}" for r in sel], [r["ms_per_token"] for r in sel])
        ax.set_yscale("log")
        ax.set_ylabel("ms / token")
        ax.tick_params(axis="x", labelsize=5)
        ax.set_title(title)
    return plot
