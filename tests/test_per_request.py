"""Per-request steering: one batch mixes rows without steering and rows with different value
modules (same backbone), K, strengths, refresh intervals, refresh modes and policies. Each row's
tokens (and trigger count) must equal running that request alone."""
import pytest
import torch

from svgt_fast import SVGT, Engine, generate
from svgt_fast.tiny import build_value_module

from helpers import ragged_prompts

N_NEW = 13


def _mixed(model):
    a = build_value_module(model, seed=60)                                      # VLP, K=5
    b = build_value_module(model, seed=61, generator="mlp", n_intervention_tokens=3)
    c = build_value_module(model, seed=62, n_intervention_tokens=7)
    return [
        None,
        SVGT(a, refresh_interval=2),                                             # exact
        SVGT(b, refresh_interval=3, refresh="window=2", gradient_step_size=0.5),
        SVGT(a, refresh_interval=1, refresh="bridge", beta=0.5),
        SVGT(c, refresh_interval=2, refresh="project"),
        SVGT(a, refresh_interval=2, policy="sparse", score_threshold=1e9, drift_threshold=0.4, refresh="exact"),
        SVGT(b, refresh_interval=4, trigger="prompt"),
    ]


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_mixed_batch_rows_equal_running_alone(tiny_models, fam):
    model = tiny_models[fam]
    steerings = _mixed(model)
    rows = ragged_prompts(60, lengths=(6, 9, 3, 11, 5, 7, 4))
    eng = Engine(model, max_batch=len(rows), max_seq_len=40)
    mixed = generate(model, rows, steering=steerings, max_new_tokens=N_NEW, engine=eng)
    for i, (row, st) in enumerate(zip(rows, steerings)):
        alone = generate(model, [row], steering=st, max_new_tokens=N_NEW, engine="reference")
        n = int(alone.num_new_tokens[0])
        assert mixed.new_tokens[i, :n].tolist() == alone.new_tokens[0, :n].tolist(), f"row {i}: {st}"
        assert int(mixed.trigger_counts[i]) == int(alone.trigger_counts[0]), f"row {i}"
    # the same call through the reference engine (which runs each row alone) agrees too
    ref = generate(model, rows, steering=steerings, max_new_tokens=N_NEW, engine="reference")
    assert torch.equal(ref.new_tokens, mixed.new_tokens)
    assert mixed.trigger_counts[0] == 0 and (mixed.trigger_counts[1:] > 0).any()
    plain = generate(model, rows, max_new_tokens=N_NEW, engine=eng)
    assert torch.equal(plain.new_tokens[0], mixed.new_tokens[0])  # the unsteered row
    assert (plain.new_tokens[1:] != mixed.new_tokens[1:]).any(1).sum() >= 3  # steering really acts


@pytest.mark.interpreter
def test_mixed_batch_triton_backend(tiny_models):
    model = tiny_models["mistral"]
    steerings = _mixed(model)[:4]
    rows = ragged_prompts(61, lengths=(5, 8, 3, 6))
    eng = Engine(model, max_batch=4, max_seq_len=32, attention="triton")
    mixed = generate(model, rows, steering=steerings, max_new_tokens=9, engine=eng)
    ref = generate(model, rows, steering=steerings, max_new_tokens=9, engine="reference")
    assert torch.equal(mixed.new_tokens, ref.new_tokens)
    assert torch.equal(mixed.trigger_counts, ref.trigger_counts)


def test_mixed_batch_sampled_rows_equal_alone(tiny_models):
    """Seeded sampling: row i draws with seed + i, alone or in the batch."""
    model = tiny_models["llama"]
    steerings = _mixed(model)[:3]
    rows = ragged_prompts(62, lengths=(4, 7, 5))
    mixed = generate(model, rows, steering=steerings, max_new_tokens=N_NEW, temperature=0.9, top_p=0.9, seed=11)
    for i, (row, st) in enumerate(zip(rows, steerings)):
        alone = generate(model, [row], steering=st, max_new_tokens=N_NEW, temperature=0.9, top_p=0.9, seed=11 + i,
                         engine="reference")
        assert mixed.new_tokens[i].tolist() == alone.new_tokens[0].tolist()


def test_bad_steering_lists(tiny_models):
    model = tiny_models["llama"]
    a = build_value_module(model, seed=63)
    other_layer = build_value_module(model, seed=64, extract_layer=1)
    rows = ragged_prompts(63, lengths=(4, 5))
    with pytest.raises(ValueError, match="2 prompts"):
        generate(model, rows, steering=[SVGT(a)], max_new_tokens=2)
    with pytest.raises(TypeError, match="row 1"):
        generate(model, rows, steering=[SVGT(a), a], max_new_tokens=2)
    with pytest.raises(ValueError, match="extract layer"):
        generate(model, rows, steering=[SVGT(a), SVGT(other_layer)], max_new_tokens=2)
    with pytest.raises(TypeError, match="steering must be"):
        generate(model, rows, steering=a, max_new_tokens=2)
    big = build_value_module(model, seed=65, n_intervention_tokens=9)
    eng = Engine(model, max_batch=2, max_seq_len=16, max_bridge_tokens=8)
    with pytest.raises(ValueError, match="max_bridge_tokens"):
        generate(model, rows, steering=[None, SVGT(big)], max_new_tokens=2, engine=eng)
