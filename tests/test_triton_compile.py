"""Every Triton kernel launch the engine makes at real model shapes compiles for the GPU it is
benchmarked on (sm_90: H100, H200), here, without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code the compiler may not
(types, shapes, block sizes) and never sees the real shapes' constexprs. So: run the engine in
the interpreter on the Llama-3-8B layer shape (d 4096, heads of 128 in groups of 4, SwiGLU 14336;
six layers, a quarter of the heads, small vocab, zero weights: values do not matter here), with
every steering kind in one batch, plus the paths the engine takes only on a GPU (split-K attention and its merge) and the
trigger kernel at batch 64, Qwen3's q/k norms; record each launch's argument types, constexprs and launch options;
then compile each one for sm_90 with the installed Triton in a separate process (no
interpreter), once as recorded (fp16) and once with bf16 data. Integer arguments are compiled
unspecialised (the JIT may also build versions for values 1 or multiples of 16).
"""
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
       torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


# constexprs that hold head counts -> their Llama-3-8B values (recorded on 8 / 2 heads, see above)
EIGHT_B_HEADS = {"HQ": 32, "HKV": 8}


def _launch_spec(fn, args, kwargs) -> dict:
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    sig, consts = {}, {}
    for name, p in params.items():
        v = bound[name]
        if "constexpr" in str(p.annotation) or v is None:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = PTR[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    return dict(module=fn.__module__, name=fn.__name__, signature=sig, constexprs=consts, options=options)


def _eight_b_layers(num_layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from svgt_fast.bench import SHAPES

    args = dict(SHAPES["llama3-8b"])
    # 8 of the 32 query heads and 2 of the 8 KV heads (the same group size 4 and head size 128):
    # the interpreter runs a program per head, so this keeps the recording quick; the head counts
    # are put back into the recorded constexprs before compiling (EIGHT_B_HEADS).
    args.update(num_hidden_layers=num_layers, vocab_size=512, num_attention_heads=8, num_key_value_heads=2,
                head_dim=128)
    cfg = AutoConfig.for_model(args.pop("model_type"), **args)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model = model.to_empty(device="cpu")
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.dim() >= 1 and "inv_freq" not in str(t.shape):
            t.data.zero_()
    model.model.rotary_emb.__init__(config=cfg)  # the RoPE tables are computed, not loaded
    return model.eval()


def _steering(model):
    import svgt_fast
    from svgt_fast.conva import ConVAConfig, ConVAVectors
    from svgt_fast.neva import NeVAConfig, NeVANeurons
    from svgt_fast.tiny import build_value_module

    d, L, inter = model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size
    module = build_value_module(model, seed=0, n_intervention_tokens=5)
    conva = svgt_fast.ConVA(ConVAVectors(ConVAConfig(d, L, [0]), torch.full((1, d), 0.01), torch.zeros(1),
                                         torch.full((1, d), 0.01), torch.zeros(1)))
    k = 64
    neva = svgt_fast.NeVA(NeVANeurons(NeVAConfig(d, inter, L, list(range(L)), k),
                                      torch.arange(k).repeat(L, 1), torch.ones(L, k)))
    rc = svgt_fast.REControl(svgt_fast.REControlValue(svgt_fast.REControlConfig(d, [64], "relu")), n_steps=2)
    svgt = lambda **kw: svgt_fast.SVGT(module, refresh_interval=2, **kw)
    return [[svgt(), svgt(policy="sparse", score_threshold=1e9), conva, neva],  # 1 of 2 SVGT rows fires
            [svgt(refresh="bridge"), svgt(refresh="window=2"), svgt(refresh="project"), rc]]


def _record(monkeypatch) -> list[dict]:
    from triton.runtime.interpreter import InterpretedFunction

    import svgt_fast
    from svgt_fast.kernels.prefix_attention import prefix_attention
    from svgt_fast.tiny import build_tiny_model
    from svgt_fast.kernels.trigger import trigger

    launches = {}
    run = InterpretedFunction.run
    eight_b = [True]  # head-count constexprs are the narrowed model's while it runs

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = _launch_spec(self.fn, args, kwargs)
        if eight_b[0]:
            spec["constexprs"].update({k: v for k, v in EIGHT_B_HEADS.items() if k in spec["constexprs"]})
        launches[json.dumps(spec, sort_keys=True)] = spec
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    model = _eight_b_layers(6)
    eng = svgt_fast.Engine(model, max_batch=4, max_seq_len=24, attention="triton")
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]
    for steering in _steering(model):
        svgt_fast.generate(model, prompts, max_new_tokens=3, engine=eng, steering=steering, eos_token_id=[])
    # Qwen3's q/k norms (fused into RoPE + write) over head_dim 128 (Qwen3-8B: 32/8 heads of 128)
    qwen3 = build_tiny_model("qwen3", seed=0, dtype=torch.float16, hidden_size=256, intermediate_size=512,
                             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    svgt_fast.generate(qwen3, prompts[:2], max_new_tokens=2, engine=svgt_fast.Engine(qwen3, max_batch=2, max_seq_len=16,
                                                                                       attention="triton"))

    eight_b[0] = False  # below: real 8B head counts
    # GPU-only choices: split-K over a long context (merged by the second kernel), and the
    # trigger at the batch its target names (64), value_dim 128, d 4096.
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, S = 2, 32, 8, 128, 256
    q = torch.randn(B, 1, Hq, D, generator=g).half()
    kc, vc = torch.randn(B, Hkv, S, D, generator=g).half(), torch.randn(B, Hkv, S, D, generator=g).half()
    kb, vb = torch.randn(B, Hkv, 5, D, generator=g).half(), torch.randn(B, Hkv, 5, D, generator=g).half()
    P, bl = torch.tensor([200, 100]), torch.tensor([5, 0])
    q_pos = (torch.tensor([S - 1, S - 1]) + bl)[:, None]
    prefix_attention(q, kc, vc, q_pos, P, bl, kb, vb, 0.088, n_splits=4)
    prefix_attention(q, kc, vc, q_pos, P, bl, kb, vb, 0.088, config=(64, 4))  # bench_prefix_attention's variant
    n, dv, d = 64, 128, 4096
    args = (torch.randn(n, dv, generator=g), torch.randn(n, d, generator=g).half(), torch.randn(n, d, generator=g).half(),
            torch.randn(dv // 2, dv, generator=g), torch.randn(dv // 2, generator=g), torch.randn(dv // 2, generator=g),
            torch.randn(1, generator=g), torch.tensor(4), torch.full((n,), 2), torch.ones(n, dtype=torch.long),
            torch.zeros(n), torch.full((n,), 0.5))
    trigger(*args)
    trigger(*args, config=(128, 4))  # bench_trigger's earlier configuration
    return list(launches.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile every kernel for real")
def test_engine_kernel_launches_compile_for_sm90(monkeypatch, tmp_path):
    launches = _record(monkeypatch)
    import svgt_fast.kernels as kernels

    wanted = set()  # every launched kernel of every kernel module (named _<op>_kernel, STYLE)
    for info in pkgutil.iter_modules(kernels.__path__):
        m = importlib.import_module(f"svgt_fast.kernels.{info.name}")
        wanted |= {n for n in vars(m) if n.startswith("_") and n.endswith("_kernel")}
    assert {s["name"] for s in launches} == wanted, "a kernel the engine has is not exercised here (or vice versa)"
    assert any(s["constexprs"].get("HAS_SEQ") for s in launches if s["name"] == "_prefix_attention_kernel")
    assert any(s["constexprs"].get("EDIT") for s in launches if s["name"] == "_silu_mul_kernel")
    assert any(s["constexprs"].get("QK_NORM") for s in launches if s["name"] == "_rope_cache_write_kernel")

    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches, indent=1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot_compile.py"), str(path)],
                         capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    print(res.stdout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert f"{len(launches)} launches, 0 failures" in res.stdout
