"""`generate(..., stream=True)`: the streamed tokens are the non-streamed ones (fast and
reference engines, steered and unsteered, ragged batches with EOS), events arrive while the
generation runs, and a stream holds its engine only until it ends or is closed."""
import pytest
import torch

from svgt_fast import SVGT, Engine, EngineBusyError, GenerationStream, StreamEvent, generate
from svgt_fast.streaming import IncrementalDetokenizer
from svgt_fast.tiny import build_value_module, byte_tokenizer

from helpers import ragged_prompts

N_NEW = 10


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"]


def _collect(stream: GenerationStream, batch: int):
    """Per row: the tokens and the text the events carried; the events; the final output."""
    tokens, texts, events = [[] for _ in range(batch)], ["" for _ in range(batch)], list(stream)
    for ev in events:
        assert isinstance(ev, StreamEvent)
        for i, v in enumerate(ev.tokens):
            if v is not None:
                tokens[i].append(v)
        for i, t in enumerate(ev.texts or []):
            texts[i] += t
    assert events[-1].final and all(not e.final for e in events[:-1])
    assert events[-1].output is stream.output
    return tokens, texts, events, stream.output


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("steered", [False, True])
def test_streamed_tokens_equal_non_streamed(llama, engine, steered):
    steering = SVGT(build_value_module(llama, seed=80), refresh_interval=3) if steered else None
    rows = ragged_prompts(80, lengths=(6, 2, 9))
    plain = generate(llama, rows, steering=steering, max_new_tokens=N_NEW, engine=engine, eos_token_id=[])
    eos = int(plain.new_tokens[1, 3])  # row 1 stops at its 4th token (others may stop earlier on it too)
    kw = dict(steering=steering, max_new_tokens=N_NEW, engine=engine, eos_token_id=eos)
    plain = generate(llama, rows, **kw)
    tokens, _, events, out = _collect(generate(llama, rows, stream=True, **kw), len(rows))
    for i in range(len(rows)):
        assert tokens[i] == plain.new_tokens[i, : int(plain.num_new_tokens[i])].tolist()
    assert torch.equal(out.new_tokens, plain.new_tokens) and torch.equal(out.sequences, plain.sequences)
    assert torch.equal(out.num_new_tokens, plain.num_new_tokens)
    assert torch.equal(out.trigger_counts, plain.trigger_counts)
    assert [e.step for e in events[:-1]] == list(range(len(events) - 1))
    assert len(events) - 1 == plain.new_tokens.shape[1]  # no event after every row finished


def test_stream_text_deltas_concatenate_to_texts(llama):
    tok = byte_tokenizer()
    prompts = ["How do I", "a", "Tell me about"]
    steering = SVGT(build_value_module(llama, seed=81), refresh_interval=2, refresh="bridge")
    plain = generate(llama, prompts, tokenizer=tok, steering=steering, max_new_tokens=N_NEW)
    _, texts, events, out = _collect(generate(llama, prompts, tokenizer=tok, steering=steering,
                                              max_new_tokens=N_NEW, stream=True), 3)
    assert texts == plain.texts == out.texts
    assert all(len(e.texts) == 3 for e in events)


def test_stream_is_incremental(llama):
    """The first event comes after the prefill and at most one decode step, long before the end."""
    eng = Engine(llama, max_batch=2, max_seq_len=64)
    steps = []
    runner = eng._decode_runner

    def counting(B, plan, sampling):
        run = runner(B, plan, sampling)

        def step(*a):
            steps.append(a[1])
            return run(*a)
        return step

    eng._decode_runner = counting
    stream = generate(llama, ragged_prompts(82, lengths=(5, 3)), max_new_tokens=24, engine=eng, eos_token_id=[],
                      stream=True)
    assert steps == []  # nothing runs before the first next()
    first = next(stream)
    assert first.step == 0 and len(steps) <= 1
    with pytest.raises(RuntimeError, match="not finished"):
        stream.output
    second = next(stream)
    assert second.step == 1 and len(steps) <= 2
    rest = list(stream)
    assert len(steps) == 23 and rest[-1].final and rest[-1].output.new_tokens.shape == (2, 24)


def test_stream_checks_inputs_at_the_call(llama):
    eng = Engine(llama, max_batch=1, max_seq_len=16)
    with pytest.raises(ValueError, match="max_batch=1"):
        generate(llama, [[1, 2], [3]], max_new_tokens=2, engine=eng, stream=True)
    with pytest.raises(TypeError, match="stream"):
        generate(llama, [[1, 2]], max_new_tokens=2, stream="yes")


def test_closed_or_dropped_stream_releases_the_engine(llama):
    eng = Engine(llama, max_batch=2, max_seq_len=64)
    rows = ragged_prompts(83, lengths=(4, 6))
    want = generate(llama, rows, max_new_tokens=8, engine=eng)
    stream = generate(llama, rows, max_new_tokens=8, engine=eng, stream=True)
    next(stream)
    with pytest.raises(EngineBusyError, match="unfinished stream"):  # same thread: refused, no deadlock
        generate(llama, rows, max_new_tokens=8, engine=eng)
    stream.close()
    assert torch.equal(generate(llama, rows, max_new_tokens=8, engine=eng).new_tokens, want.new_tokens)
    stream = generate(llama, rows, max_new_tokens=8, engine=eng, stream=True)
    next(stream)
    del stream  # garbage collection closes it
    with generate(llama, rows, max_new_tokens=8, engine=eng, stream=True) as s:
        out = [e for e in s][-1].output
    assert torch.equal(out.new_tokens, want.new_tokens)
    assert not eng.guard.busy


def test_stream_through_graph_runners(tiny_models):
    """The CUDA-graph runners (emulated on CPU) stream too: tokens handed out between replays."""
    model = tiny_models["llama"]
    steering = SVGT(build_value_module(model, seed=84), refresh_interval=2, refresh="window=2")
    rows = ragged_prompts(84, lengths=(6, 1, 9))
    ref = generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine="reference")
    eng = Engine(model, max_batch=4, max_seq_len=48)
    eng.graph_emulation = True
    for _ in range(2):
        tokens, _, _, out = _collect(generate(model, rows, steering=steering, max_new_tokens=N_NEW, engine=eng,
                                              stream=True), 3)
        assert torch.equal(out.new_tokens, ref.new_tokens)
        assert out.timings["graph_steps"] == N_NEW - 1


def test_timing_breakdown(llama):
    steering = SVGT(build_value_module(llama, seed=85), refresh_interval=3)
    out = generate(llama, ragged_prompts(85, lengths=(3, 5)), steering=steering, max_new_tokens=N_NEW,
                   eos_token_id=[])
    t = out.timings
    assert t["steps"] == N_NEW and t["refresh_steps"] == (N_NEW - 1) // 3
    assert t["prefill_s"] > 0 and t["decode_s"] > 0 and 0 < t["refresh_s"] <= t["decode_s"]
    assert t["total_s"] >= t["prefill_s"] + t["decode_s"] - 1e-3
    assert out.trigger_counts.tolist() == [1 + (N_NEW - 1) // 3] * 2
    s = generate(llama, [[1, 2, 3]], steering=steering, max_new_tokens=N_NEW, eos_token_id=[], stream=True)
    st = [e for e in s][-1].output.timings
    assert st["steps"] == N_NEW and st["refresh_steps"] == (N_NEW - 1) // 3 and st["total_s"] > 0


def test_incremental_detokenizer_holds_incomplete_characters():
    tok = byte_tokenizer()
    ids = tok("héllo ✓ wörld")["input_ids"]
    d = IncrementalDetokenizer(tok)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == "héllo ✓ wörld"
    assert all("\ufffd" not in x for x in deltas)  # a multi-byte character comes out whole
    d = IncrementalDetokenizer(tok)
    assert d.push(ids[1]) == "" and d.flush() == "\ufffd"  # a lone first byte, flushed at the end
