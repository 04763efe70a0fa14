"""Sparse value-module triggering (SVGT(policy="sparse")): the engine against the sparse eager
reference, the two limits (never fires = unsteered, always fires = policy "always"), the
per-row trigger counts, and bad options."""
import pytest
import torch

from svgt_fast import SVGT, Engine, generate
from svgt_fast.tiny import build_value_module

from helpers import ragged_prompts

N_NEW = 14


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_never_triggered_equals_unsteered(tiny_models, fam):
    model = tiny_models[fam]
    steering = SVGT(build_value_module(model, seed=50), refresh_interval=2, policy="sparse", score_threshold=1e9)
    rows = ragged_prompts(50, lengths=(6, 11, 3))
    plain = generate(model, rows, max_new_tokens=N_NEW)
    for engine in ("fast", "reference"):
        out = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine=engine)
        assert torch.equal(out.new_tokens, plain.new_tokens), engine
        assert out.trigger_counts.tolist() == [0, 0, 0]


def test_threshold_below_every_score_equals_always(tiny_models):
    model = tiny_models["mistral"]
    module = build_value_module(model, seed=51)
    rows = ragged_prompts(51, lengths=(5, 9))
    always = generate(model, rows, max_new_tokens=N_NEW, steering=SVGT(module, refresh_interval=3))
    sparse = generate(model, rows, max_new_tokens=N_NEW,
                      steering=SVGT(module, refresh_interval=3, policy="sparse", score_threshold=-1e9))
    assert torch.equal(always.new_tokens, sparse.new_tokens)
    # the prompt, then steps 3, 6, 9, 12 of 14
    assert always.trigger_counts.tolist() == sparse.trigger_counts.tolist() == [5, 5]


@pytest.mark.parametrize("refresh", ["exact", "bridge", "window=2", "project"])
def test_sparse_engine_equals_reference(tiny_models, refresh):
    """Rows start gated off (no score fires) and fire later on drift: the bridge opens mid-way."""
    model = tiny_models["llama"]
    module = build_value_module(model, seed=50)
    steering = SVGT(module, refresh_interval=2, policy="sparse", score_threshold=1e9, drift_threshold=0.5,
                    refresh=refresh)
    rows = ragged_prompts(50, lengths=(6, 11, 3, 8))
    fast = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="fast")
    ref = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="reference")
    assert torch.equal(fast.new_tokens, ref.new_tokens)
    counts = fast.trigger_counts.tolist()
    assert counts == ref.trigger_counts.tolist()
    assert min(counts) >= 1 and len(set(counts)) > 1  # every row opened its bridge, not equally often
    assert max(counts) <= 6  # never at the prompt (drift 0 there), at most every due step


def test_sparse_mixed_prefill_gates(tiny_models):
    """A score threshold in the middle: some rows open their bridge at the prompt, some not."""
    model = tiny_models["llama"]
    steering = SVGT(build_value_module(model, seed=50), refresh_interval=2, policy="sparse", score_threshold=0.0)
    rows = ragged_prompts(50, lengths=(6, 11, 3, 8))
    fast = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="fast")
    ref = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="reference")
    assert torch.equal(fast.new_tokens, ref.new_tokens)
    assert fast.trigger_counts.tolist() == ref.trigger_counts.tolist()
    assert len(set(fast.trigger_counts.tolist())) > 1


@pytest.mark.interpreter
def test_sparse_triton_backend(tiny_models, monkeypatch):
    """On our kernels the firing decision comes from the fused trigger kernel."""
    import svgt_fast.kernels.trigger as trig

    calls = []
    real = trig.trigger
    monkeypatch.setattr(trig, "trigger", lambda *a: calls.append(1) or real(*a))
    model = tiny_models["qwen3"]
    steering = SVGT(build_value_module(model, seed=52), refresh_interval=2, policy="sparse", score_threshold=1e9,
                    drift_threshold=0.4, refresh="window=2")
    rows = ragged_prompts(52, lengths=(6, 3))
    eng = Engine(model, max_batch=2, max_seq_len=32, attention="triton")
    fast = generate(model, rows, steering=steering, max_new_tokens=10, engine=eng)
    ref = generate(model, rows, steering=steering, max_new_tokens=10, engine="reference")
    assert torch.equal(fast.new_tokens, ref.new_tokens)
    assert fast.trigger_counts.tolist() == ref.trigger_counts.tolist()
    assert len(calls) == 4  # due steps 2, 4, 6, 8


def test_unsteered_output_has_zero_trigger_counts(tiny_models):
    model = tiny_models["llama"]
    out = generate(model, ragged_prompts(53, lengths=(4, 7)), max_new_tokens=3)
    assert out.trigger_counts.tolist() == [0, 0]


@pytest.mark.parametrize("kw, match", [
    (dict(policy="sometimes"), "policy must be one of"),
    (dict(drift_threshold=3.0), "drift_threshold"),
    (dict(drift_threshold=-0.1), "drift_threshold"),
    (dict(score_threshold=float("nan")), "score_threshold"),
])
def test_bad_policy_options(tiny_models, kw, match):
    module = build_value_module(tiny_models["llama"], seed=54)
    with pytest.raises(ValueError, match=match):
        SVGT(module, **kw)


@pytest.mark.parametrize("attention,emulate,batch,n_new,drift", [
    ("torch", False, 8, N_NEW, (0.8, 0.95)),
    pytest.param("triton", True, 4, 7, (0.7,), marks=pytest.mark.interpreter),  # emulated graphs on the interpreter: a smaller case
])
def test_sparse_refresh_compacts_fired_rows(tiny_models, monkeypatch, attention, emulate, batch, n_new, drift):
    """Under policy="sparse" the upper stack of a due step runs on the rows that fire only:
    none fire -> one plain [B, 1] decode; a few -> one pass over the decode rows of the rest and
    the [c, M] chunks of the fired rows (c a power of two <= B/2, cache rows mapped by index);
    more than B/2 -> the full block. Tokens and trigger counts still equal the eager reference."""
    from svgt_fast.engine import Engine as E

    shapes, in_refresh = [], []  # upper-stack passes of refresh steps: ((B, M, mapped), ...) per segment
    real_stack, real_refresh = E._stack, E.refresh_step

    def spy(self, x, layer_ids, segs, *a, **kw):
        layer_ids = list(layer_ids)
        if in_refresh and layer_ids and layer_ids[0] > 0:
            shapes.append(tuple((sg.B, sg.M, sg.seq is not None) for sg in segs))
        return real_stack(self, x, layer_ids, segs, *a, **kw)

    def refresh(self, *a, **kw):
        in_refresh.append(1)
        try:
            return real_refresh(self, *a, **kw)
        finally:
            in_refresh.pop()

    model = tiny_models["llama"]
    rows = ragged_prompts(55, lengths=(6, 11, 3, 8, 5, 9, 4, 7)[:batch])
    monkeypatch.setattr(E, "_stack", spy)
    monkeypatch.setattr(E, "refresh_step", refresh)
    for d in drift:  # thresholds at which some due steps fire none, some a few, some most rows
        steering = SVGT(build_value_module(model, seed=50), refresh_interval=2, policy="sparse", score_threshold=1e9,
                        drift_threshold=d, refresh="window=2")
        ref = generate(model, rows, steering=steering, max_new_tokens=n_new, engine="reference")
        eng = Engine(model, max_batch=batch, max_seq_len=40, attention=attention)
        eng.graph_emulation = emulate
        fast = generate(model, rows, steering=steering, max_new_tokens=n_new, engine=eng)
        assert torch.equal(fast.new_tokens, ref.new_tokens)
        assert fast.trigger_counts.tolist() == ref.trigger_counts.tolist()
    K, W = 5, 2
    compacted = [segs for segs in shapes if len(segs) == 2]
    assert compacted and all(segs[0] == (batch, 1, False) and segs[1][0] in (1, 2, 4) and segs[1][0] <= batch // 2
                             and segs[1][1:] == (K + W + 1, True) for segs in compacted)
    assert ((batch, K + W + 1, False),) in shapes  # more than half fired: the full block
    if n_new == N_NEW:
        assert ((batch, 1, False),) in shapes  # a due step where none fired: the plain decode
