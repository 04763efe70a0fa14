"""Config options of the supported families that real checkpoints set and the fixtures do not:
q/k/v and o biases (Llama's attention_bias, Qwen3), MLP biases, tied embeddings (small Qwen2.5),
a head_dim other than hidden / heads, multi-query attention, no GQA. The fast engine (our torch
path and the Triton kernels) must give the oracle's tokens, unsteered and under SVGT."""
import pytest
import torch

from svgt_fast import SVGT, generate
from svgt_fast.engine import Engine
from svgt_fast.tiny import build_tiny_model, build_value_module

from helpers import ragged_prompts

CASES = {
    "llama-attention_bias": ("llama", dict(attention_bias=True)),
    "llama-mlp_bias": ("llama", dict(mlp_bias=True)),
    "qwen3-attention_bias": ("qwen3", dict(attention_bias=True)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral-head_dim_32": ("mistral", dict(head_dim=32)),
    "llama-mqa": ("llama", dict(num_key_value_heads=1)),
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
}


# The Triton kernels see only the attention shapes (the interpreter is slow): the cases that change them.
KERNEL_CASES = ("mistral-head_dim_32", "llama-mqa", "llama-mha")
RUNS = [(case, "torch") for case in CASES] + [pytest.param(case, "triton", marks=pytest.mark.interpreter)
                                             for case in KERNEL_CASES]


@pytest.fixture(scope="module")
def variant_models(tmp_path_factory):
    built = {}

    def get(case):
        if case not in built:
            family, overrides = CASES[case]
            model = build_tiny_model(family, seed=2, directory=str(tmp_path_factory.mktemp(case)), **overrides)
            with torch.no_grad():  # HF initialises biases to zero, which would hide a bias left out
                for mod in model.modules():
                    if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                        mod.bias.normal_(0.0, 0.5)
            if overrides.get("tie_word_embeddings"):
                assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
            built[case] = model
        return built[case]
    return get


@pytest.mark.parametrize("case,attention", RUNS)
@pytest.mark.parametrize("steered", [False, True])
def test_fast_engine_equals_the_reference(variant_models, case, attention, steered):
    model = variant_models(case)
    steering = SVGT(build_value_module(model, seed=1), refresh_interval=2) if steered else None
    rows = ragged_prompts(3, lengths=(6, 11))
    ref = generate(model, rows, steering=steering, max_new_tokens=8, engine="reference")
    eng = Engine(model, max_batch=2, max_seq_len=64, attention=attention)
    fast = generate(model, rows, steering=steering, max_new_tokens=8, engine=eng)
    assert torch.equal(fast.new_tokens, ref.new_tokens)
    assert torch.equal(fast.num_new_tokens, ref.num_new_tokens)
