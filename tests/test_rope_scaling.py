"""RoPE scaling variants: the fast engine's cos/sin tables against HF and the eager oracle.

The engine reads its tables from the model's own rotary module once, for every position its
cache can hold. "dynamic" and "longrope" recompute their frequencies from the sequence length
(transformers' dynamic_rope_update), so a table asked for the whole cache got the long-sequence
frequencies at every position — even for short requests — and left the HF module in that state.
"""
import pytest
import torch

from svgt_fast import SVGT, generate
from svgt_fast.engine import Engine
from svgt_fast.tiny import build_tiny_model, build_value_module

from helpers import ragged_prompts

CONTEXT = 128
LONGROPE_FIXED = 40  # original_max_position_embeddings of the longrope models below
VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    # factors for head_dim 16 (8 frequencies), as the qwen3 and llama tiny models have
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                 "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
                 "original_max_position_embeddings": LONGROPE_FIXED},
}
CASES = [("llama", v) for v in VARIANTS] + [("qwen3", "longrope"), ("mistral", "dynamic"), ("qwen2", "yarn")]
N_NEW = 10


def _model(family, variant, tmp_path_factory, seed=3):
    return build_tiny_model(family, seed=seed, directory=str(tmp_path_factory.mktemp(f"rope_{family}_{variant}")),
                            rope_parameters=dict(VARIANTS[variant]), max_position_embeddings=CONTEXT)


def _rotary_state(model):
    rotary = model.model.rotary_emb
    return rotary.inv_freq.clone(), getattr(rotary, "max_seq_len_cached", None), float(rotary.attention_scaling)


@pytest.mark.parametrize("family,variant", CASES)
def test_fast_engine_equals_hf_and_the_reference(family, variant, tmp_path_factory):
    model = _model(family, variant, tmp_path_factory)
    assert model.model.rotary_emb.rope_type == variant
    before = _rotary_state(model)
    # Sized for the whole context: its tables span more positions than "dynamic" or "longrope"
    # keep fixed, while the requests stay inside them.
    eng = Engine(model, max_batch=3, max_seq_len=CONTEXT)
    after = _rotary_state(model)
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:], "building the engine changed HF's rotary state"

    rows = ragged_prompts(21, lengths=(9, 14, 5))
    fast = generate(model, rows, max_new_tokens=N_NEW, engine=eng)
    ref = generate(model, rows, max_new_tokens=N_NEW, engine="reference")
    assert torch.equal(fast.new_tokens, ref.new_tokens)
    assert torch.equal(fast.num_new_tokens, ref.num_new_tokens)
    for i, row in enumerate(rows):  # HF's own cached generate, one unpadded row at a time
        hf = model.generate(torch.tensor([row]), max_new_tokens=N_NEW, do_sample=False)[0, len(row):]
        n = int(fast.num_new_tokens[i])
        assert hf.shape[0] == n and torch.equal(fast.new_tokens[i, :n], hf), f"row {i}"


@pytest.mark.parametrize("variant", ["dynamic", "longrope"])
def test_svgt_exact_equals_the_reference(variant, tmp_path_factory):
    """Bridge tokens take positions P..P+K-1 of the upper stack: they count against the fixed length."""
    model = _model("llama", variant, tmp_path_factory, seed=4)
    steering = SVGT(build_value_module(model, seed=5, n_intervention_tokens=4), refresh_interval=3)
    eng = Engine(model, max_batch=2, max_seq_len=CONTEXT, max_bridge_tokens=8)
    rows = ragged_prompts(22, lengths=(12, 7))
    fast = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine=eng)
    ref = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="reference")
    assert torch.equal(fast.new_tokens, ref.new_tokens)


def test_longrope_requests_past_the_fixed_length_are_refused(tmp_path_factory):
    model = _model("llama", "longrope", tmp_path_factory, seed=6)
    eng = Engine(model, max_batch=1, max_seq_len=CONTEXT, max_bridge_tokens=8)
    prompt = ragged_prompts(23, lengths=(LONGROPE_FIXED - N_NEW,))
    fast = generate(model, prompt, max_new_tokens=N_NEW, engine=eng, eos_token_id=[])  # exactly the fixed length
    ref = generate(model, prompt, max_new_tokens=N_NEW, engine="reference", eos_token_id=[])
    assert torch.equal(fast.new_tokens, ref.new_tokens)
    for engine in (eng, "reference"):
        with pytest.raises(ValueError, match=r"needs 41 positions, beyond the 40 .*rope_type 'longrope'"):
            generate(model, prompt, max_new_tokens=N_NEW + 1, engine=engine)
    steering = SVGT(build_value_module(model, seed=7, n_intervention_tokens=2))
    with pytest.raises(ValueError, match=r"needs 42 positions, beyond the 40"):
        generate(model, prompt, steering=steering, max_new_tokens=N_NEW, engine=eng)
