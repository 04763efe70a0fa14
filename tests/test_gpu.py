"""GPU checks (skipped without CUDA): the Triton + CUDA-graph engine against the oracle, and the
bf16 bar of issue 3 on random weights of the Llama-3-8B shape."""
import sys
from pathlib import Path

import pytest
import torch

from svgt_fast import SVGT, Engine, generate
from svgt_fast.tiny import build_tiny_model, build_value_module

from helpers import ragged_prompts

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
    """Issue 3's bf16 bar on random weights of the Llama-3-8B shape: our logits within 2x the
    error of HF's own bf16 run (both against HF fp32), and our greedy tokens equal to HF bf16
    greedy for 32 steps. Random weights give near-flat logits, so two correct bf16
    implementations can disagree where the fp32 top-2 margin is inside bf16 noise; the check is
    therefore teacher-forced on HF's tokens, and a step may differ only when it is such a tie:
    |fp32 margin| <= 4 e_t (e_t = HF bf16's logit error at that step; ours may be 2 e_t off, so
    opposite choices need a margin <= 2 e_t + 2 e_t). Ties are counted and printed."""
    from svgt_fast.sampling import SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from shapes import build_model

    n_new = 32
    model = build_model("llama3-8b", "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (64, 100)]
    hf_tokens = torch.stack([model.generate(input_ids=p[None].cuda(), max_new_tokens=n_new, min_new_tokens=n_new,
                                            do_sample=False, pad_token_id=0)[0, p.shape[0]:].cpu() for p in prompts])
    full = [torch.cat([p, t]) for p, t in zip(prompts, hf_tokens)]
    with torch.no_grad():  # step logits of the HF bf16 model on its own greedy path
        hf_bf16 = [model(input_ids=f[None].cuda()).logits[0, p.shape[0] - 1:-1].float() for f, p in zip(full, prompts)]
    eng = Engine(model, max_batch=2, max_seq_len=256)
    ours_steps = []
    eng.generate(prompts, steering=None, max_new_tokens=n_new, sampling=SamplingParams(),
                 row_seeds=torch.zeros(2, dtype=torch.long), eos_ids=frozenset(), pad_id=0,
                 forced_tokens=hf_tokens, logits_out=ours_steps)
    ours = torch.stack(ours_steps, 1).float()  # [2, n_new, V]
    free = generate(model, [p.tolist() for p in prompts], max_new_tokens=n_new, engine=eng, eos_token_id=[])
    model.float()
    with torch.no_grad():
        hf_fp32 = [model(input_ids=f[None].cuda()).logits[0, p.shape[0] - 1:-1] for f, p in zip(full, prompts)]
    ties = 0
    for i in range(2):
        e_t = (hf_bf16[i] - hf_fp32[i]).abs().amax(-1)  # [n_new]
        our_err = (ours[i] - hf_fp32[i]).abs().amax(-1)
        assert our_err.max() <= 2 * e_t.max(), f"row {i}: logit error {our_err.max()} vs HF bf16 {e_t.max()}"
        ours_arg = ours[i].argmax(-1).cpu()
        for t in range(n_new):
            a, h = int(ours_arg[t]), int(hf_tokens[i, t])
            if a != h:
                margin = (hf_fp32[i][t, a] - hf_fp32[i][t, h]).abs()
                assert margin <= 4 * e_t[t], f"row {i} step {t}: token {a} vs HF {h}, fp32 margin {margin} > 4x{e_t[t]}"
                ties += 1
        first_diff = (free.new_tokens[i].cpu() != hf_tokens[i]).nonzero()
        print(f"row {i}: HF bf16 logit error max {e_t.max():.4f}, ours {our_err.max():.4f}; free-running "
              f"greedy equals HF bf16 for {int(first_diff[0]) if len(first_diff) else n_new} steps")
    print(f"teacher-forced greedy: {2 * n_new - ties}/{2 * n_new} steps equal HF bf16, {ties} bf16 ties")


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
