"""GPU checks (skipped without CUDA): the Triton + CUDA-graph engine against the oracle, and the
bf16 bar of issue 3 on random weights of the Llama-3-8B shape."""
import sys
from pathlib import Path

import pytest
import torch

from svgt_fast import SVGT, Engine, generate
from svgt_fast.tiny import build_tiny_model, build_value_module

from helpers import check_bf16_bar, intervention, random_artifact, ragged_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("steered", [False, "exact", "window=3", "bridge", "project", "sparse"])
def test_graphed_triton_engine_equals_reference_fp32(steered):
    """Decode and refresh steps replayed from CUDA graphs, fp32 on the GPU, against the oracle
    (exact) or the mode's own eager reference (generate routes there); "sparse": bridges that
    open mid-way (policy="sparse", drift rule), window=3."""
    model = build_tiny_model("qwen3", seed=30).cuda()
    steering = None
    if steered == "sparse":
        steering = SVGT(build_value_module(model, seed=30), refresh_interval=3, refresh="window=3", policy="sparse",
                        score_threshold=1e9, drift_threshold=0.4)
    elif steered:
        steering = SVGT(build_value_module(model, seed=30), refresh_interval=3, refresh=steered)
    rows = ragged_prompts(30, lengths=(5, 9, 14))
    ref = generate(model, rows, steering=steering, max_new_tokens=16, engine="reference")
    eng = Engine(model, max_batch=4, max_seq_len=64)
    assert eng.attention == "triton" and eng.cuda_graphs
    for _ in range(2):  # second call replays the captured graphs
        fast = generate(model, rows, steering=steering, max_new_tokens=16, engine=eng)
        assert torch.equal(fast.new_tokens.cpu(), ref.new_tokens.cpu())
        assert torch.equal(fast.trigger_counts, ref.trigger_counts)
        assert fast.timings["graph_steps"] > 0


def test_graphed_sparse_compaction_conditional_nodes_fp32():
    """policy="sparse" at batch 8: due steps where none, a few or most rows fire replay one
    captured refresh graph whose branches are CUDA-graph conditional nodes (when this torch has
    them); the tokens equal the reference row by row either way."""
    from svgt_fast.cuda_graphs import conditional_nodes_supported

    model = build_tiny_model("llama", seed=31).cuda()
    steering = SVGT(build_value_module(model, seed=50), refresh_interval=2, refresh="window=2", policy="sparse",
                    score_threshold=1e9, drift_threshold=0.8)
    rows = ragged_prompts(55, lengths=(6, 11, 3, 8, 5, 9, 4, 7))
    ref = generate(model, rows, steering=steering, max_new_tokens=14, engine="reference")
    eng = Engine(model, max_batch=8, max_seq_len=40)
    print(f"conditional graph nodes: {conditional_nodes_supported()}")
    for _ in range(2):
        fast = generate(model, rows, steering=steering, max_new_tokens=14, engine=eng)
        assert torch.equal(fast.new_tokens.cpu(), ref.new_tokens.cpu())
        assert torch.equal(fast.trigger_counts, ref.trigger_counts)
        assert fast.timings["graph_steps"] > 0
    assert len(set(ref.trigger_counts.tolist())) > 1  # rows fired unequally: the branches differ


def test_bf16_8b_shape_logits_and_greedy():
    """Issue 3's bf16 bar on random weights of the Llama-3-8B shape (helpers.check_bf16_bar; the
    same check runs on CPU on a tiny model in tests/test_engine.py, so its logic is tested there)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from shapes import build_model

    check_bf16_bar(build_model("llama3-8b", "cuda", torch.bfloat16), n_new=32, lengths=(64, 100))


def test_graphed_mixed_batch_equals_reference_fp32():
    """Per-request steering through the CUDA graphs: rows mixing modules, K, intervals, modes
    and policies (and an unsteered row), against each row run alone by the reference."""
    model = build_tiny_model("llama", seed=31).cuda()
    a = build_value_module(model, seed=31)
    b = build_value_module(model, seed=32, generator="mlp", n_intervention_tokens=3)
    steerings = [None, SVGT(a, refresh_interval=2), SVGT(b, refresh_interval=3, refresh="window=2"),
                 SVGT(a, refresh_interval=1, refresh="bridge", policy="sparse", score_threshold=1e9,
                      drift_threshold=0.4),
                 SVGT(b, refresh_interval=2, refresh="project")]
    rows = ragged_prompts(31, lengths=(5, 9, 14, 3, 7))
    ref = generate(model, rows, steering=steerings, max_new_tokens=20, engine="reference")
    eng = Engine(model, max_batch=8, max_seq_len=64)
    for _ in range(2):
        fast = generate(model, rows, steering=steerings, max_new_tokens=20, engine=eng)
        assert torch.equal(fast.new_tokens.cpu(), ref.new_tokens.cpu())
        assert torch.equal(fast.trigger_counts, ref.trigger_counts)
        assert fast.timings["graph_steps"] > 0


def test_graphed_re_control_equals_reference_fp32():
    from svgt_fast import REControl, REControlConfig, REControlValue

    model = build_tiny_model("qwen2", seed=33).cuda()
    torch.manual_seed(33)
    vf = REControlValue(REControlConfig(model.config.hidden_size, [32], "silu")).cuda()
    with torch.no_grad():
        for p in vf.parameters():
            p.mul_(3.0)
    steerings = [REControl(vf, n_steps=5, step_size=2.0), None, SVGT(build_value_module(model, seed=33))]
    rows = ragged_prompts(33, lengths=(6, 4, 9))
    ref = generate(model, rows, steering=steerings, max_new_tokens=12, engine="reference")
    fast = generate(model, rows, steering=steerings, max_new_tokens=12, engine=Engine(model, max_batch=4, max_seq_len=48))
    assert torch.equal(fast.new_tokens.cpu(), ref.new_tokens.cpu())


def test_conva_edit_kernel_bf16_on_gpu():
    """The fused edit in bf16 against its fp32-math reference (one rounding at the end)."""
    from svgt_fast.kernels.conva_edit import conva_edit
    from svgt_fast.kernels.reference import conva_edit_ref

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4096, generator=g).cuda().bfloat16()
    delta = torch.randn(64, 4096, generator=g).cuda().bfloat16()
    w = torch.randn(4096, generator=g).cuda() * 0.02
    v = w / w.norm()
    u = torch.randn(4096, generator=g).cuda() * 0.02
    on = torch.ones(64, dtype=torch.bool, device="cuda")
    got = conva_edit(x, delta, w, 0.1, v, u, 0.0, 0.9, 0.5, on, float(w @ v)).float()
    want = conva_edit_ref(x, delta, w, 0.1, v, u, 0.0, 0.9, 0.5, on, float(w @ v)).float()
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


def test_train_svgt_on_gpu_follows_the_cpu_run(tmp_path):
    """Issue 7: the three-stage trainer runs on the GPU (fp32, the same code path as on CPU).
    Its per-stage losses follow the CPU run's — only float summation order differs, so they agree
    to ~1e-3 over these few steps — and the trained module is left on the GPU and steers there."""
    import copy
    import json

    from svgt_fast.train_svgt import train_svgt

    model = build_tiny_model("llama", seed=7)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": torch.randint(0, 256, (5 + i % 4,), generator=g).tolist(),
             "response": torch.randint(0, 256, (3 + i % 5,), generator=g).tolist(), "label": i % 2} for i in range(24)]
    kw = dict(config=dict(value_dim=16, n_heads=2, n_intervention_tokens=2, vlp_n_heads=4), stage1_steps=4,
              stage2_steps=4, stage3_steps=6, batch_size=4, progress=False, resume=False)
    train_svgt(model, None, rows, tmp_path / "cpu", **kw)
    gpu_model = copy.deepcopy(model)
    module = train_svgt(gpu_model, None, rows, tmp_path / "gpu", device="cuda", **kw)
    assert next(module.parameters()).is_cuda
    logs = [json.loads((tmp_path / d / "training_log.json").read_text())["history"] for d in ("cpu", "gpu")]
    assert [(h["stage"], h["step"]) for h in logs[0]] == [(h["stage"], h["step"]) for h in logs[1]]
    for a, b in zip(*logs):
        for k in a:
            if k not in ("stage", "step"):
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), (a["stage"], k)
    out = generate(gpu_model, [[1, 2, 3, 4]], steering=SVGT(module), max_new_tokens=4, engine="reference")
    assert out.new_tokens.shape == (1, 4)


def test_graphed_every_kind_in_one_batch_fp32():
    """Every steering kind in one batch through the real CUDA graphs and our Triton kernels (the
    CPU runs the same batch under emulated graphs, tests/test_graph_runners.py): SVGT exact /
    window / project / sparse bridge, ConVA, NeVA, RE-Control and an unsteered row; the second
    call replays the first's graphs. Tokens and trigger counts equal the reference's."""
    model = build_tiny_model("llama", seed=75, num_hidden_layers=7).cuda()  # ConVA steers layers 0..1 of 7
    module = build_value_module(model, seed=77)
    mlp = build_value_module(model, seed=78, generator="mlp", n_intervention_tokens=3)
    steerings = [
        None,
        SVGT(module, refresh_interval=2),
        SVGT(mlp, refresh_interval=3, refresh="window=2"),
        SVGT(module, refresh_interval=2, refresh="project"),
        SVGT(module, refresh_interval=2, refresh="bridge", policy="sparse", score_threshold=1e9, drift_threshold=0.3),
        intervention("conva", random_artifact(model, "conva", 4).to("cuda")),
        intervention("neva", random_artifact(model, "neva", 5)),  # NeVA places its edits itself
        intervention("re_control", random_artifact(model, "re_control", 6).cuda()),
    ]
    rows = ragged_prompts(77, lengths=(3, 5, 2, 4, 3, 4, 2, 3))
    ref = generate(model, rows, steering=steerings, max_new_tokens=16, engine="reference")
    eng = Engine(model, max_batch=8, max_seq_len=40)
    assert eng.attention == "triton" and eng.cuda_graphs
    for _ in range(2):
        fast = generate(model, rows, steering=steerings, max_new_tokens=16, engine=eng)
        assert torch.equal(fast.new_tokens.cpu(), ref.new_tokens.cpu())
        assert torch.equal(fast.trigger_counts, ref.trigger_counts)
        assert fast.timings["graph_steps"] == 15


def test_streaming_through_graphs_equals_non_streamed():
    """stream=True on the GPU hands out step t-1's tokens while step t runs (pinned copy + event,
    streaming.TokenFeed's lag path, which only a GPU takes): the streamed tokens are the
    non-streamed ones row by row, steps in order, none after every row's EOS."""
    model = build_tiny_model("qwen3", seed=34).cuda()
    steering = SVGT(build_value_module(model, seed=34), refresh_interval=3)
    rows = ragged_prompts(34, lengths=(6, 2, 9))
    eng = Engine(model, max_batch=4, max_seq_len=48)
    plain = generate(model, rows, steering=steering, max_new_tokens=12, engine=eng, eos_token_id=[])
    eos = int(plain.new_tokens[1, 4])  # row 1 stops at its 5th token
    kw = dict(steering=steering, max_new_tokens=12, engine=eng, eos_token_id=eos)
    plain = generate(model, rows, **kw)
    events = list(generate(model, rows, stream=True, **kw))
    tokens = [[v for ev in events[:-1] if (v := ev.tokens[i]) is not None] for i in range(len(rows))]
    for i in range(len(rows)):
        assert tokens[i] == plain.new_tokens[i, : int(plain.num_new_tokens[i])].tolist()
    assert [e.step for e in events[:-1]] == list(range(len(events) - 1))
    assert len(events) - 1 == plain.new_tokens.shape[1] and events[-1].final
    assert torch.equal(events[-1].output.new_tokens.cpu(), plain.new_tokens.cpu())
    assert events[-1].output.timings["graph_steps"] > 0


def test_nonfinite_rows_stop_on_cuda_as_on_the_cpu():
    """CUDA's argmax must treat NaN as the largest value, as the CPU's does: sample_next then
    finds every undefined row (bf16 and fp32, greedy and sampled), and a graphed engine whose
    steering overflows stops the same rows at the same steps as the reference."""
    from svgt_fast.sampling import NONFINITE, SamplingParams, sample_next

    logits = torch.randn(4, 1000)
    logits[0, 777], logits[1, 3], logits[2] = float("nan"), float("inf"), float("-inf")
    seeds = torch.arange(4)
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9)):
        for dtype in (torch.float32, torch.bfloat16):
            cpu = sample_next(logits.to(dtype), params, seeds, 2)
            gpu = sample_next(logits.to(dtype).cuda(), params, seeds.cuda(), 2).cpu()
            assert cpu[:3].tolist() == [NONFINITE] * 3 and torch.equal(gpu, cpu)
    model = build_tiny_model("qwen3", seed=19).cuda()
    module = build_value_module(model, seed=19)
    rows = ragged_prompts(21, lengths=(7, 2, 4, 5))
    steering = [SVGT(module, refresh_interval=2, gradient_step_size=1e30), None,
                SVGT(module, refresh_interval=3, refresh="window=2", gradient_step_size=1e30)] + [None]
    kw = dict(steering=steering, max_new_tokens=8, eos_token_id=[])
    with pytest.warns(RuntimeWarning, match="not finite"):
        ref = generate(model, rows, engine="reference", **kw)
    with pytest.warns(RuntimeWarning, match="not finite"):
        fast = generate(model, rows, engine=Engine(model, max_batch=4, max_seq_len=32), **kw)
    assert fast.finish_reasons == ref.finish_reasons and torch.equal(fast.new_tokens, ref.new_tokens)
    assert fast.timings["graph_steps"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_engine_on_a_second_gpu():
    """A model on cuda:1 while cuda:0 is current: Triton would launch on cuda:0 and a graph would
    capture cuda:0's stream unless each call makes the engine's device current (guard.on_device,
    the capture's own stream). Tokens equal the oracle's, streamed too, and cuda:0 stays current
    for the caller."""
    model = build_tiny_model("llama", seed=31).to("cuda:1")
    steering = SVGT(build_value_module(model, seed=31), refresh_interval=3)
    rows = ragged_prompts(31, lengths=(4, 9))
    ref = generate(model, rows, steering=steering, max_new_tokens=12, engine="reference")
    with torch.cuda.device(0):
        eng = Engine(model, max_batch=2, max_seq_len=48)
        for _ in range(2):  # the second call replays the graphs captured in the first
            fast = generate(model, rows, steering=steering, max_new_tokens=12, engine=eng)
            assert torch.equal(fast.new_tokens.cpu(), ref.new_tokens.cpu())
            assert fast.timings["graph_steps"] > 0 and torch.cuda.current_device() == 0
        events = list(generate(model, rows, steering=steering, max_new_tokens=12, engine=eng, stream=True))
        assert torch.equal(events[-1].output.new_tokens.cpu(), ref.new_tokens.cpu())


@pytest.mark.parametrize("temperature", [0.55, 0.8, 0.85, 1.1, 1.7])
def test_graph_temperature_matches_cuda_division(temperature):
    """A graph scales logits by DeviceSampling.inv_temperature; eager CUDA (the first token, the
    reference) divides by the Python number: bit for bit the same on the GPU."""
    from svgt_fast.sampling import DeviceSampling, SamplingParams, filter_logits

    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(4, 4096, device="cuda", generator=g) * 20
    params = SamplingParams(temperature=temperature, top_p=1.0)
    dev = DeviceSampling(params, "cuda")
    assert torch.equal(x * dev.inv_temperature, x / temperature)
    assert torch.equal(filter_logits(x, dev), filter_logits(x, params))


def test_every_graph_of_an_engine_is_captured_on_its_own_stream(monkeypatch):
    """One capture stream per engine, used for nothing else (cuda_graphs.capture_stream): the
    pool's freed blocks are reused only on their stream, so the graphs share memory."""
    real = torch.cuda.graph
    streams = []

    def recording(*args, **kwargs):
        streams.append(kwargs.get("stream"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", recording)
    model = build_tiny_model("llama", seed=32).cuda()
    steering = SVGT(build_value_module(model, seed=32), refresh_interval=2, refresh="exact")
    engines = [Engine(model, max_batch=2, max_seq_len=96) for _ in range(2)]
    for eng in engines:
        streams.clear()
        out = generate(model, [[1, 2, 3], [4, 5]], steering=steering, max_new_tokens=40, engine=eng)
        assert out.timings["graph_steps"] > 0
        assert len(streams) >= 3 and all(s == eng.graph_stream for s in streams)  # decode + refresh buckets
        assert eng.graph_stream.priority == 0 and eng.graph_stream.device == eng.device
    assert engines[0].graph_stream.cuda_stream != engines[1].graph_stream.cuda_stream


def test_graphs_dropped_from_the_cache_leave_the_others_intact():
    """A GraphCache of 2 drops graphs call after call while the decode graph and the cuBLAS
    workspace of the capture stream (shared by every graph of the engine) live on: each call's
    tokens still equal the reference's, fp32 (the sources say reset() frees neither the shared
    workspace nor a block in use; this is that claim on the GPU)."""
    from svgt_fast.cuda_graphs import GraphCache

    model = build_tiny_model("llama", seed=33).cuda()
    module = build_value_module(model, seed=33)
    rows = ragged_prompts(33, lengths=(3, 4))
    eng = Engine(model, max_batch=2, max_seq_len=96)
    eng.graphs = GraphCache(capacity=2)
    for i, steering in enumerate([SVGT(module, refresh_interval=3, refresh="bridge", beta=0.2), None,
                                  SVGT(module, refresh_interval=11), SVGT(module, refresh_interval=3, refresh="project"),
                                  None, SVGT(module, refresh_interval=5, refresh="bridge", beta=0.4),
                                  SVGT(module, refresh_interval=11)]):
        out = generate(model, rows, steering=steering, max_new_tokens=40, engine=eng)
        ref = generate(model, rows, steering=steering, max_new_tokens=40, engine="reference")
        assert out.timings["graph_steps"] > 0
        assert torch.equal(out.new_tokens, ref.new_tokens), i
        assert len(eng.graphs) <= 3
