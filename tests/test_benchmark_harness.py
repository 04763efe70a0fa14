"""The GPU check's benchmark commands, each run with --smoke (tiny model or shapes, CPU): a GPU
session is short and rare, so a script that would fail on an argument, an import or a renamed
helper must fail here first. Checks the harness only (exit status, the JSON rows each writes,
the arguments gpu_check.sh passes); CPU times are not figures."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _steps() -> dict[str, list[str]]:
    """name -> argv of each `step NAME LIMIT CMD...` line of gpu_check.sh (continuations joined)."""
    text = GPU_CHECK.read_text().replace("\\\n", " ")
    steps = {}
    for line in text.splitlines():
        if line.startswith("step "):
            name, _limit, *cmd = shlex.split(line)[1:]
            steps[name] = cmd
    return steps


def test_gpu_check_is_valid_bash_and_lists_its_steps():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    steps = _steps()
    for name, cmd in steps.items():  # every file a step names exists
        for arg in cmd:
            if arg.startswith(("tests/", "benchmarks/")):
                assert (ROOT / arg).exists(), f"step {name}: {arg} does not exist"


def _run_gpu_check(tmp_path, **env):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, OUT=str(out), **env))
    return res, (out / "summary.txt").read_text()


def test_gpu_check_skips_what_the_budget_cannot_hold(tmp_path):
    """No budget left: no step starts, every one is listed for the next call, and the pack comes back."""
    res, summary = _run_gpu_check(tmp_path, BUDGET_S="0")
    assert res.returncode == 0, res.stdout + res.stderr
    names = list(_steps())
    for name in names:
        assert f"== {name} not run" in summary
    assert f'next call: STEPS="{" ".join(names)}" bash benchmarks/gpu_check.sh' in summary
    assert list((tmp_path / "out").glob("gpu_check_*.tar.gz"))


def test_gpu_check_caps_each_step_at_the_budget_left(tmp_path):
    """Two steps that fail at once without a GPU (no --smoke): each runs with its limit cut to the
    budget left, a failure makes the call fail, and nothing is listed as not run."""
    res, summary = _run_gpu_check(tmp_path, BUDGET_S="40", MIN_STEP_S="1", STEPS="trigger generate")
    assert res.returncode == 1, res.stdout + res.stderr
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"== (\w+) rc=1 in \d+ s \(limit (\d+)\)", summary)}
    assert set(limits) == {"trigger", "generate"}, summary
    assert limits["trigger"] <= 20 and limits["generate"] < 40 < 180, limits  # own limits: 20 and 180
    assert "not run: (none)" in summary and "next call" not in summary


BENCH_STEPS = sorted(n for n, cmd in _steps().items() if cmd[1].startswith("benchmarks/"))


@pytest.mark.parametrize("name", BENCH_STEPS)
def test_benchmark_step_runs_its_smoke_harness(name, tmp_path):
    cmd = _steps()[name]
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, *cmd[1:], "--smoke"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    if name == "profile":  # prints the ranked ops of a profiled generate call
        assert "per step" in res.stdout and "us/step" in res.stdout
        return
    written = list(tmp_path.glob("*_smoke.json"))
    assert len(written) == 1, written
    assert not list(tmp_path.glob("*.partial.json*")), "the complete result replaces the partial one"
    data = json.loads(written[0].read_text())
    assert data["rows"] and "torch" in data["environment"]
    if name.startswith("generate"):  # the modes and intervals gpu_check passes are the ones run
        modes = cmd[cmd.index("--modes") + 1].split(",")
        intervals = cmd[cmd.index("--intervals") + 1].split(",")
        whats = {r["what"] for r in data["rows"]}
        for m in modes:
            for i in intervals:
                assert any(w.startswith(f"engine_svgt_{m}_") and w.endswith(f"_r{i}") for w in whats), (m, i, whats)


def test_decode_launch_count_is_the_fused_step():
    """benchmarks/count_decode_launches.py on the tiny Llama (5 layers): per decode step, per
    layer 4 GEMMs (fused QKV, O, fused gate/up, down) and 5 Triton kernels (norm, RoPE + cache
    write, attention, add + norm, SwiGLU), plus the final norm and the logits GEMM — the graph a
    GPU replays per token (a structural count, not a timing)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "benchmarks/count_decode_launches.py"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = {line.split()[1]: float(line.split()[0]) for line in res.stdout.splitlines()[1:]}
    L = 5
    assert counts["mm.default"] == 4 * L + 1
    assert counts["_rms_norm_kernel"] == 2 * L + 1
    for k in ("_rope_cache_write_kernel", "_prefix_attention_kernel", "_silu_mul_kernel"):
        assert counts[k] == L, (k, counts)
    total = float(res.stdout.split(" kernels = ")[0].split()[-1])
    assert total <= 9 * L + 15, res.stdout  # 14 per step besides the layers (embedding, final norm, logits, sampling, stops)


def test_generate_bench_measures_the_models_device(monkeypatch):
    """Events, syncs, copy bandwidth, peak memory and NVML telemetry all read the current CUDA
    device, so generate_bench runs with the model's device current (a model on cuda:1 with cuda:0
    current is timed on cuda:1), and the caller's device is back afterwards."""
    import types

    import torch

    from helpers import FakeCudaDevice
    from svgt_fast import bench

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    FakeCudaDevice.current[0] = 0
    monkeypatch.setattr(bench, "_generate_bench", lambda model, **kw: FakeCudaDevice.current[0])
    on_gpu1 = types.SimpleNamespace(parameters=lambda: iter([types.SimpleNamespace(device=torch.device("cuda", 1))]))
    assert bench.generate_bench(on_gpu1) == 1 and FakeCudaDevice.current[0] == 0
    on_cpu = types.SimpleNamespace(parameters=lambda: iter([torch.empty(0)]))
    assert bench.generate_bench(on_cpu) == 0
