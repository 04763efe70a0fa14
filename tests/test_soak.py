"""Soak: 1,000+ generate calls of mixed batch sizes, prompt lengths, max_new_tokens, steering,
sampling and streaming on a tiny model. Nothing may grow with the number of calls: live tensors,
Python objects, resident memory, Engines built, graphs captured (the CUDA-graph runners run
emulated on CPU). Runs in about a minute on one CPU thread (the torch attention path)."""
import gc
import itertools
import os
import random

import pytest
import torch

import svgt_fast.api as api
from svgt_fast import SVGT, Engine, generate
from svgt_fast.tiny import build_tiny_model, build_value_module

N_CALLS = 1000
MAX_BATCH, MAX_PROMPT, MAX_NEW = 4, 20, 6


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no __class__ lookups


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def test_soak_no_growth(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and immune to a busy machine
    try:
        _soak(monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _soak(monkeypatch):
    model = build_tiny_model("llama", seed=7)  # its own model: its own cached engine
    module = build_value_module(model, seed=7)
    steerings = [None, SVGT(module, refresh_interval=2), SVGT(module, refresh_interval=3, refresh="bridge"),
                 SVGT(module, refresh_interval=2, policy="sparse", score_threshold=0.0, drift_threshold=0.3)]
    samplings = [dict(), dict(temperature=0.8, top_k=20, top_p=0.9)]
    built = []
    init = Engine.__init__

    def counting_init(self, *a, **kw):
        built.append(kw.get("max_batch"))
        init(self, *a, **kw)

    monkeypatch.setattr(Engine, "__init__", counting_init)
    graphed = Engine(model, max_batch=MAX_BATCH, max_seq_len=MAX_PROMPT + MAX_NEW)
    graphed.graph_emulation = True  # the CUDA-graph bookkeeping, run on CPU
    rng = random.Random(0)
    calls = [0]

    def call(B, st, sp, n, engine, stream=False, lengths=None):
        lengths = lengths or [rng.randint(1, MAX_PROMPT) for _ in range(B)]
        prompts = [[rng.randrange(256) for _ in range(p)] for p in lengths]
        kw = dict(steering=st, max_new_tokens=n, engine=engine, eos_token_id=[] if n % 2 else None,
                  seed=calls[0], **sp)
        if stream:
            out = [e for e in generate(model, prompts, stream=True, **kw)][-1].output
        else:
            out = generate(model, prompts, **kw)
        assert out.new_tokens.shape[0] == B and all(c <= n for c in out.num_new_tokens.tolist())
        calls[0] += 1

    # Warm-up: every (batch, steering, sampling) layout once at the longest request, on the
    # graphed engine and on the per-model cached one; nothing new may appear after this.
    call(MAX_BATCH, None, samplings[0], MAX_NEW, "fast", lengths=[MAX_PROMPT] * MAX_BATCH)
    for B, st, sp in itertools.product(range(1, MAX_BATCH + 1), steerings, samplings):
        call(B, st, sp, MAX_NEW, graphed)
    engines, graphs = len(built), len(graphed.graphs)
    cached = api._ENGINES.get(model)
    tensors, objects, rss = _live_tensors(), len(gc.get_objects()), _rss_mb()

    while calls[0] < N_CALLS:
        i = calls[0]
        call(rng.randint(1, MAX_BATCH), rng.choice(steerings), rng.choice(samplings), rng.choice([0, 1, 2, 3, 4, 6]),
             graphed if i % 3 == 0 else "fast", stream=i % 5 == 0)

    assert calls[0] >= 1000
    assert len(built) == engines == 2  # no Engine rebuilt: the cached one was sized by the first call
    assert api._ENGINES.get(model) is cached
    assert len(graphed.graphs) == graphs  # no graph captured after the warm-up
    assert not graphed.guard.busy and not cached.guard.busy
    grown = _live_tensors() - tensors
    print(f"soak: {calls[0]} calls; live tensors {grown:+d}, objects {len(gc.get_objects()) - objects:+d}, "
          f"rss {(_rss_mb() or 0) - (rss or 0):+.1f} MB, graphs {graphs}, engines {len(built)}")
    assert grown <= 4, f"{grown} more live tensors after {N_CALLS} calls"
    objs = len(gc.get_objects()) - objects
    assert objs < 2000, f"{objs} more Python objects after {N_CALLS} calls"
    if rss is not None:
        assert _rss_mb() - rss < 64, f"resident memory grew by {_rss_mb() - rss:.0f} MB"


@pytest.mark.parametrize("vary", ["re_control_object", "temperature", "top_p"])
def test_graph_cache_does_not_grow_per_call(vary):
    """A steering object rebuilt for every call (equal by value: same artifact, same options),
    or a temperature / top_p that changes with every call, replays the graphs of the first call
    (cuda_graphs.py: what the graph keys hold)."""
    from svgt_fast import REControl, REControlConfig, REControlValue

    model = build_tiny_model("llama", seed=8)
    eng = Engine(model, max_batch=1, max_seq_len=16)
    eng.graph_emulation = True
    vf = REControlValue(REControlConfig(model.config.hidden_size, [8]))
    sizes = []
    for i in range(4):
        if vary == "re_control_object":
            generate(model, [[1, 2, 3]], max_new_tokens=2, engine=eng, steering=REControl(vf, n_steps=1))
        elif vary == "temperature":
            generate(model, [[1, 2, 3]], max_new_tokens=2, engine=eng, temperature=0.5 + 0.01 * i, seed=0)
        else:
            generate(model, [[1, 2, 3]], max_new_tokens=2, engine=eng, temperature=0.8, top_p=0.5 + 0.1 * i, seed=0)
        sizes.append(len(eng.graphs))
    assert sizes[0] >= 1 and sizes[-1] == sizes[0]


def test_prefill_logits_holds_the_engine():
    """prefill_logits writes the caches, so it takes the engine's call lock like generate: from
    the thread whose stream still holds the engine it is refused, not interleaved."""
    from svgt_fast.guard import EngineBusyError

    model = build_tiny_model("llama", seed=9)
    eng = Engine(model, max_batch=1, max_seq_len=16)
    want = eng.prefill_logits([torch.tensor([1, 2, 3])])
    stream = generate(model, [[4, 5]], max_new_tokens=4, engine=eng, stream=True)
    next(iter(stream))  # the stream now holds the engine
    with pytest.raises(EngineBusyError):
        eng.prefill_logits([torch.tensor([1, 2, 3])])
    stream.close()
    assert not eng.guard.busy
    assert torch.equal(eng.prefill_logits([torch.tensor([1, 2, 3])]), want)


@pytest.mark.parametrize("stream", [False, True])
def test_a_dropped_engine_is_freed_at_once(stream):
    """An Engine that captured graphs (decode and refresh runners) is freed when its last
    reference goes, without waiting for a garbage collection: a reference cycle through it
    (a runner holding the engine; a closure reading its own attribute) kept its caches and
    graphs — GPU memory — alive, so replacing a cached engine by a larger one held both."""
    import weakref

    model = build_tiny_model("llama", seed=3)
    steering = SVGT(build_value_module(model, seed=3), refresh_interval=2, refresh="exact")
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        eng = Engine(model, max_batch=2, max_seq_len=48)
        eng.graph_emulation = True
        out = generate(model, [[1, 2, 3], [4, 5]], steering=steering, max_new_tokens=7, engine=eng, stream=stream)
        if stream:
            out = list(out)[-1].output
        assert out.timings["graph_steps"] > 0 and out.timings["refresh_steps"] > 0
        ref = weakref.ref(eng)
        del eng, out
        assert ref() is None
    finally:
        if was_enabled:
            gc.enable()
