"""The CUDA-graph runners (batch buckets with dummy rows, static buffers copied in and out,
refresh graphs per plan / due groups / exact row bucket, capture before the prefill) run on CPU
with an emulated graph (cuda_graphs.capture), so their bookkeeping is tested without a GPU."""
import pytest
import torch

from svgt_fast import SVGT, Engine, generate
from svgt_fast.tiny import build_value_module

from helpers import intervention, random_artifact, ragged_prompts


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


# ---- graph keys (issue 8): shared across calls by value, never across artifacts ---------------
@pytest.fixture(scope="module")
def model7():
    from svgt_fast.tiny import build_tiny_model

    return build_tiny_model("llama", seed=75, num_hidden_layers=7)  # ConVA steers layers 0..1 of 7


@pytest.mark.parametrize("kind", ["re_control", "conva", "neva"])
def test_emulated_graphs_never_replay_another_artifacts_weights(model7, kind):
    """Two artifacts of one kind through one engine's graphs: each call's tokens are its own
    artifact's (= the reference), and a steering object built anew around an artifact already
    seen reuses its graphs."""
    a, b = random_artifact(model7, kind, 1), random_artifact(model7, kind, 2)
    rows = ragged_prompts(75, lengths=(5, 8, 3))
    eng = _engine(model7, max_batch=4, max_seq_len=24)
    ref = {}
    for art in (a, b):
        ref[id(art)] = generate(model7, rows, steering=intervention(kind, art), max_new_tokens=8, engine="reference")
    assert not torch.equal(ref[id(a)].new_tokens, ref[id(b)].new_tokens)  # the artifacts really differ
    sizes = []
    for art in (a, b, a, b):  # a new steering object every call
        out = generate(model7, rows, steering=intervention(kind, art), max_new_tokens=8, engine=eng)
        assert torch.equal(out.new_tokens, ref[id(art)].new_tokens)
        assert out.timings["graph_steps"] == 7
        sizes.append(len(eng.graphs))
    assert sizes[0] < sizes[1] == sizes[2] == sizes[3]  # b: graphs of its own; then only reuse


def test_emulated_graph_key_follows_the_artifacts_storage(tiny_models):
    """A parameter replaced (not updated in place) since the capture: a graph holds the old
    address, so the key differs and a new graph is captured; an update in place is read where
    it lies by the graph that exists."""
    from svgt_fast import REControl

    model = tiny_models["qwen2"]
    vf = random_artifact(model, "re_control", 3)
    rows = ragged_prompts(76, lengths=(4, 6))
    eng = _engine(model, max_batch=2, max_seq_len=20)
    generate(model, rows, steering=REControl(vf, n_steps=2), max_new_tokens=6, engine=eng)
    n = len(eng.graphs)
    with torch.no_grad():
        vf.layers[0].weight.mul_(-1.0)  # in place: same graphs
    out = generate(model, rows, steering=REControl(vf, n_steps=2), max_new_tokens=6, engine=eng)
    ref = generate(model, rows, steering=REControl(vf, n_steps=2), max_new_tokens=6, engine="reference")
    assert torch.equal(out.new_tokens, ref.new_tokens) and len(eng.graphs) == n
    vf.layers[0].weight = torch.nn.Parameter(vf.layers[0].weight.detach() * 2.0)  # a new tensor: a new graph
    out = generate(model, rows, steering=REControl(vf, n_steps=2), max_new_tokens=6, engine=eng)
    ref = generate(model, rows, steering=REControl(vf, n_steps=2), max_new_tokens=6, engine="reference")
    assert torch.equal(out.new_tokens, ref.new_tokens) and len(eng.graphs) == n + 1


def test_emulated_graphs_take_each_calls_temperature_and_top_p(tiny_models):
    """Temperature and top_p are graph inputs: one graph per (greedy, top_k, top_p < 1), each
    call's values replayed (tokens = the reference's for every setting)."""
    model = tiny_models["llama"]
    steering = SVGT(build_value_module(model, seed=77), refresh_interval=2)
    rows = ragged_prompts(77, lengths=(5, 2, 7))
    eng = _engine(model, max_batch=4, max_seq_len=24)
    sizes, outs = [], []
    for temperature, top_p in ((0.7, 0.9), (1.3, 0.6), (0.7, 0.9), (2.0, 0.95)):
        kw = dict(steering=steering, max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=40, seed=5)
        out = generate(model, rows, engine=eng, **kw)
        assert torch.equal(out.new_tokens, generate(model, rows, engine="reference", **kw).new_tokens)
        sizes.append(len(eng.graphs))
        outs.append(out.new_tokens)
    assert sizes[0] == sizes[-1]
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])


def test_device_sampling_is_bit_identical_to_python_numbers():
    """The graphs' DeviceSampling filters and samples exactly as the eager SamplingParams (on
    CUDA too, where ATen divides by a Python number through its reciprocal)."""
    from svgt_fast.sampling import DeviceSampling, SamplingParams, filter_logits, sample_next

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 300, generator=g) * 4).to(dev)
    seeds = torch.arange(16, device=dev)
    dsamp = None
    for params in (SamplingParams(0.7, 0.9, 0), SamplingParams(0.3, 0.45, 0), SamplingParams(1.0 / 3, 0.999, 0),
                   SamplingParams(1.7, 0.1, 0), SamplingParams(0.123456789, 0.8, 0)):
        dsamp = DeviceSampling(params, dev) if dsamp is None else dsamp.set(params)  # one object, refilled
        assert torch.equal(filter_logits(logits, dsamp), filter_logits(logits, params))
        for step in (0, 3):
            assert torch.equal(sample_next(logits, dsamp, seeds, step), sample_next(logits, params, seeds, step))
    with pytest.raises(ValueError, match="does not fit"):
        dsamp.set(SamplingParams(0.7, 1.0, 0))  # no top-p: another graph


def test_graph_cache_is_bounded_and_keeps_the_current_calls_graphs(tiny_models):
    """Past its capacity the cache drops least recently used graphs, never one of the running
    call: a call needing more graphs than the capacity keeps them all (tokens = reference)."""
    from svgt_fast.cuda_graphs import GraphCache

    model = tiny_models["llama"]
    module = build_value_module(model, seed=78)
    rows = ragged_prompts(78, lengths=(3, 4))
    eng = _engine(model, max_batch=2, max_seq_len=80)
    eng.graphs = GraphCache(capacity=3)
    for beta in (0.1, 0.2, 0.3, 0.4, 0.5):  # each a new plan: 1 decode graph (shared) + 1 refresh graph
        generate(model, rows, steering=SVGT(module, refresh_interval=3, refresh="bridge", beta=beta),
                 max_new_tokens=4, engine=eng)
        assert len(eng.graphs) <= 3
    # exact refresh at t = 11, 22, 33, 44, 55: the 32- and 64-row graphs, plus the decode graph
    steering = SVGT(module, refresh_interval=11)
    eng.graphs.capacity = 2
    out = generate(model, rows, steering=steering, max_new_tokens=60, engine=eng)
    assert torch.equal(out.new_tokens, generate(model, rows, steering=steering, max_new_tokens=60,
                                                engine="reference").new_tokens)
    assert len(eng.graphs) == 3  # all of the call's graphs, one past capacity
    generate(model, rows, steering=SVGT(module, refresh_interval=3, refresh="bridge"), max_new_tokens=4, engine=eng)
    assert len(eng.graphs) == 2  # a later call drops the earlier call's


@pytest.mark.interpreter
def test_gpu_configuration_every_kind_in_one_batch(model7):
    """What a GPU runs by default — our Triton kernels inside CUDA graphs — here on the
    interpreter inside emulated graphs (a real graph's replay semantics), with every steering
    kind in one batch: the tokens and trigger counts equal the reference's, through the capture
    and the replays. (Short rows, one call: the interpreter runs every Triton program in Python.)"""
    model = model7
    module = build_value_module(model, seed=77)
    mlp = build_value_module(model, seed=78, generator="mlp", n_intervention_tokens=3)
    steerings = [
        None,
        SVGT(module, refresh_interval=2),                                   # exact
        SVGT(mlp, refresh_interval=3, refresh="window=2"),
        SVGT(module, refresh_interval=2, refresh="project"),
        SVGT(module, refresh_interval=2, refresh="bridge", policy="sparse", score_threshold=1e9, drift_threshold=0.3),
        intervention("conva", random_artifact(model, "conva", 4)),
        intervention("neva", random_artifact(model, "neva", 5)),
        intervention("re_control", random_artifact(model, "re_control", 6)),
    ]
    rows = ragged_prompts(77, lengths=(3, 5, 2, 4, 3, 4, 2, 3))
    eng = Engine(model, max_batch=8, max_seq_len=16, attention="triton")
    eng.graph_emulation = True
    ref = generate(model, rows, steering=steerings, max_new_tokens=4, engine="reference")
    out = generate(model, rows, steering=steerings, max_new_tokens=4, engine=eng)
    assert torch.equal(out.new_tokens, ref.new_tokens)
    assert torch.equal(out.trigger_counts, ref.trigger_counts)
    assert out.timings["graph_steps"] == 3


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_decode_loop_reads_the_device_once_every_8_steps(model7, graphs):
    """On the GPU a host read of a device value (.item(), bool(t), .tolist(), nonzero, a mask
    index) is a sync: the host stops queueing work until the device catches up. With graphs, the
    decode loop of a batch with every steering kind makes one, the early-stop check every 8th
    step: 24 more steps cost exactly 3 more reads (t = 16, 24, 32). Eager, the sparse row's due
    steps also read its fired count once each (the branch a graph picks on the device): 12 more
    (t = 10, 12, ..., 32; refresh every 2)."""
    from svgt_fast.emulated_graph import HostReads

    model = model7
    module = build_value_module(model, seed=79)
    steerings = [
        None,
        SVGT(module, refresh_interval=2),
        SVGT(module, refresh_interval=3, refresh="project"),
        SVGT(module, refresh_interval=2, refresh="bridge", policy="sparse", score_threshold=0.0),
        intervention("conva", random_artifact(model, "conva", 7)),
        intervention("neva", random_artifact(model, "neva", 8)),
        intervention("re_control", random_artifact(model, "re_control", 9)),
    ]
    rows = ragged_prompts(79, lengths=(3, 5, 2, 4, 3, 4, 2))
    eng = Engine(model, max_batch=8, max_seq_len=48, cuda_graphs=graphs)
    eng.graph_emulation = graphs
    generate(model, rows, steering=steerings, max_new_tokens=33, engine=eng, eos_token_id=[])  # captures
    reads = {}
    for n in (9, 33):
        with HostReads() as seen:
            out = generate(model, rows, steering=steerings, max_new_tokens=n, engine=eng, eos_token_id=[])
        assert out.new_tokens.shape == (7, n)
        reads[n] = seen.reads
    assert int(out.trigger_counts[3]) > 0  # the sparse row fired: its refresh steps ran
    extra = list(reads[33])
    for r in reads[9]:
        extra.remove(r)
    assert extra == ["aten._local_scalar_dense"] * (3 if graphs else 3 + 12), (reads[9], reads[33])


def test_live_engines_get_distinct_capture_streams(monkeypatch):
    """torch hands out a device's pooled streams in turn (32 per priority), so the 33rd stream
    asked for is the 1st again: capture_stream skips the streams of the engines alive (two
    engines captured on one stream share its cuBLAS workspace), and a dropped engine's stream
    is free again. A stand-in pool of 4 streams, as no CUDA is here."""
    import gc
    import weakref

    from svgt_fast import cuda_graphs

    class PooledStream:
        handed = [0]

        def __init__(self, device):
            self.device, self.cuda_stream = device, 1000 + PooledStream.handed[0] % 4
            PooledStream.handed[0] += 1

    monkeypatch.setattr(torch.cuda, "Stream", PooledStream)
    monkeypatch.setattr(cuda_graphs, "STREAM_POOL_SIZE", 4)
    monkeypatch.setattr(cuda_graphs, "_CAPTURING_ENGINES", weakref.WeakSet())

    class FakeEngine:
        device = torch.device("cuda", 0)

    engines = [FakeEngine() for _ in range(3)]
    ids = [cuda_graphs.capture_stream(e).cuda_stream for e in engines]
    assert ids == [1000, 1001, 1002]
    assert cuda_graphs.capture_stream(engines[0]).cuda_stream == 1000  # kept for the engine's life
    PooledStream.handed[0] = 0  # the pool comes round again: 1000-1002 are taken, 1003 is not
    e3 = FakeEngine()
    assert cuda_graphs.capture_stream(e3).cuda_stream == 1003
    del engines[1]
    gc.collect()
    e4 = FakeEngine()  # all four were taken until engine 1 went: its stream is free again
    assert cuda_graphs.capture_stream(e4).cuda_stream == 1001
    e5 = FakeEngine()  # more live engines than pooled streams: one must share
    assert cuda_graphs.capture_stream(e5).cuda_stream in {1000, 1001, 1002, 1003}
