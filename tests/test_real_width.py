"""The fast engine at the Llama-3-8B layer width (d 4096, 32/8 heads of 128, SwiGLU 14336,
llama3 RoPE) on the CPU: two full-width layers, a 4096-token vocabulary, fp32. The other tests
use tiny widths, where every row fits one tile; here the kernels (under the Triton interpreter)
and the torch path meet the shapes the GPU benchmarks run. tests/real_width.py runs the longer
version (seven layers, the 128256 vocabulary, every steering kind, sampled and greedy, bf16)."""
from __future__ import annotations

import os

import pytest
import torch

from svgt_fast import SVGT, Engine, generate
from svgt_fast.bench import build_random_model
from svgt_fast.tiny import build_value_module

PROMPTS = [[11, 2047, 9], [4095, 5, 17, 640, 3, 3, 2800]]


@pytest.fixture(scope="module")
def model():
    return build_random_model("llama3-8b", "cpu", torch.float32, num_hidden_layers=2, vocab_size=4096)


def _steering(model):
    vm = build_value_module(model, seed=900)
    return [SVGT(vm, refresh="exact", refresh_interval=1), SVGT(vm, refresh="bridge", refresh_interval=1)]


def test_unsteered_equals_hf_generate(model):
    n = 4
    want = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    eng = Engine(model, max_batch=2, max_seq_len=16, attention="torch")
    got = generate(model, PROMPTS, engine=eng, max_new_tokens=n, eos_token_id=[])
    assert got.new_tokens.tolist() == want


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_svgt_rows_equal_reference(model, attention):
    if attention == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton path runs on the CPU only under TRITON_INTERPRET=1 (conftest sets it)")
    steering = _steering(model)
    kw = dict(steering=steering, max_new_tokens=3, eos_token_id=[])
    ref = generate(model, PROMPTS, engine="reference", **kw)
    plain = generate(model, PROMPTS, engine="reference", max_new_tokens=3, eos_token_id=[])
    assert not torch.equal(ref.new_tokens, plain.new_tokens), "the steering changes no token: it would not be seen"
    eng = Engine(model, max_batch=2, max_seq_len=16, attention=attention)
    # a recorded step replayed, as a CUDA graph would be (the torch path; under the interpreter the
    # captures of every refresh bucket cost half a minute at this width)
    eng.graph_emulation = attention == "torch"
    out = generate(model, PROMPTS, engine=eng, **kw)
    assert out.new_tokens.tolist() == ref.new_tokens.tolist()
    assert out.trigger_counts.tolist() == ref.trigger_counts.tolist()
