"""The CUDA-graph runners (batch buckets with dummy rows, static buffers copied in and out,
refresh graphs per plan / due groups / exact row bucket, capture before the prefill) run on CPU
with an emulated graph (cuda_graphs.capture), so their bookkeeping is tested without a GPU."""
import pytest
import torch

from svgt_fast import SVGT, Engine, generate
from svgt_fast.tiny import build_value_module

from helpers import ragged_prompts


def _engine(model, **kw):
    eng = Engine(model, **kw)
    eng.graph_emulation = True
    return eng


@pytest.mark.parametrize("steer", [None, "exact", "window=2", "bridge", "project", "sparse"])
def test_emulated_graph_runners_equal_reference(tiny_models, steer):
    model = tiny_models["llama"]
    module = build_value_module(model, seed=70)
    steering = None
    if steer == "sparse":
        steering = SVGT(module, refresh_interval=2, policy="sparse", score_threshold=1e9, drift_threshold=0.4)
    elif steer:
        steering = SVGT(module, refresh_interval=2, refresh=steer)
    rows = ragged_prompts(70, lengths=(6, 1, 9))  # batch 3 replays the bucket-4 graphs (a dummy row)
    ref = generate(model, rows, steering=steering, max_new_tokens=12, engine="reference")
    eng = _engine(model, max_batch=4, max_seq_len=48)
    for _ in range(2):  # the second call replays graphs captured by the first
        out = generate(model, rows, steering=steering, max_new_tokens=12, engine=eng)
        assert torch.equal(out.new_tokens, ref.new_tokens)
        assert torch.equal(out.trigger_counts, ref.trigger_counts)
        assert out.timings["graph_steps"] == 11  # every decode and refresh step from a "graph"


def test_emulated_exact_row_buckets_past_32(tiny_models):
    """An exact refresh at t > 32 replays the 64-row graph (rows 0..t-1 plus repeats)."""
    model = tiny_models["qwen2"]
    steering = SVGT(build_value_module(model, seed=71), refresh_interval=11)
    rows = ragged_prompts(71, lengths=(4, 7))
    ref = generate(model, rows, steering=steering, max_new_tokens=40, engine="reference")
    eng = _engine(model, max_batch=2, max_seq_len=64)
    out = generate(model, rows, steering=steering, max_new_tokens=40, engine=eng)
    assert torch.equal(out.new_tokens, ref.new_tokens)
    keys = [k for k in eng.graphs if k[0] == "refresh"]
    assert sorted(k[-1] for k in keys) == [32, 64]  # t = 11, 22 -> 32 rows; t = 33 -> 64 rows


def test_emulated_mixed_plan(tiny_models):
    model = tiny_models["mistral"]
    a = build_value_module(model, seed=72)
    b = build_value_module(model, seed=73, generator="mlp", n_intervention_tokens=3)
    steerings = [SVGT(a, refresh_interval=2), None, SVGT(b, refresh_interval=3, refresh="project"),
                 SVGT(a, refresh_interval=1, refresh="bridge", policy="sparse", score_threshold=0.0)]
    rows = ragged_prompts(72, lengths=(5, 8, 3, 6))
    ref = generate(model, rows, steering=steerings, max_new_tokens=10, engine="reference")
    eng = _engine(model, max_batch=8, max_seq_len=40)  # batch 4 -> bucket 4; then a batch of 3 -> bucket 4
    out = generate(model, rows, steering=steerings, max_new_tokens=10, engine=eng)
    assert torch.equal(out.new_tokens, ref.new_tokens)
    assert torch.equal(out.trigger_counts, ref.trigger_counts)
    out3 = generate(model, rows[:3], steering=steerings[:3], max_new_tokens=10, engine=eng)
    ref3 = generate(model, rows[:3], steering=steerings[:3], max_new_tokens=10, engine="reference")
    assert torch.equal(out3.new_tokens, ref3.new_tokens)


def test_emulated_graphs_with_re_control_rows(tiny_models):
    from svgt_fast import REControl, REControlConfig, REControlValue

    model = tiny_models["qwen2"]
    torch.manual_seed(5)
    vf = REControlValue(REControlConfig(model.config.hidden_size, [32], "tanh"))
    with torch.no_grad():
        for p in vf.parameters():
            p.mul_(3.0)
    rc = REControl(vf, n_steps=3, step_size=2.0)
    steerings = [rc, SVGT(build_value_module(model, seed=74), refresh_interval=2), None]
    rows = ragged_prompts(74, lengths=(5, 8, 3))
    ref = generate(model, rows, steering=steerings, max_new_tokens=9, engine="reference")
    eng = _engine(model, max_batch=4, max_seq_len=32)
    out = generate(model, rows, steering=steerings, max_new_tokens=9, engine=eng)
    assert torch.equal(out.new_tokens, ref.new_tokens)
    # an RE-Control-only batch uses a decode graph of its own (the edit is part of the step)
    only = generate(model, rows, steering=rc, max_new_tokens=9, engine=eng)
    assert torch.equal(only.new_tokens, generate(model, rows, steering=rc, max_new_tokens=9,
                                                 engine="reference").new_tokens)
